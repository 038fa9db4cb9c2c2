#!/usr/bin/env bash
# Evaluate one fine-tuned expert checkpoint per LIBERO suite: the "FT experts" row of the paper's table
# (EXPERT_ARCH=self_attn: the baseline's row, "Baseline FT experts (self-attn)").
# Protocol: docs/DESIGN.md §5 (50 trials per task, seed 7). Every path and knob is a variable below; override any
# from the environment, e.g.
#   CKPT_SPATIAL=runs/ckpt/spatial SUITES="libero_spatial" bash bash_scripts/eval.sh
#   DRY_RUN=1 bash bash_scripts/eval.sh      # check paths, print the plan, run nothing
#   QUICK=1 bash bash_scripts/eval.sh        # CPU smoke run: 1 task, 1 trial, 16 steps, fast 128-px rendering,
#                                            # into runs/libero-quick (each knob still overridable)
# Re-running resumes: finished episodes in RESULTS_DIR are skipped.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

source bash_scripts/common.sh
QUICK="${QUICK:-0}"
if [[ "$QUICK" == 1 ]]; then  # smoke-run defaults, each still overridable, in a results directory of their own
  : "${NUM_TRIALS=1}" "${TASK_IDS=[0]}" "${MAX_STEPS=16}" "${FAST_RENDER=true}" "${ENV_IMG_RES=128}"
  : "${RESULTS_DIR=runs/libero-quick}"
fi
# Default checkpoints: the newest finished one that finetune_libero.sh wrote for each suite
# (OUT_ROOT/<suite>-<config>-<expert_arch>-seed<train seed>/checkpoints/step_N, finished = holding its manifest.json).
OUT_ROOT="${OUT_ROOT:-runs}"
CONFIG_NAME="${CONFIG_NAME:-qwen25-dinosiglip-224px}"
EXPERT_ARCH="${EXPERT_ARCH:-cross_attn}"  # self_attn: the baseline's runs
TRAIN_SEED="${TRAIN_SEED:-${SEED:-7}}"   # the seed the experts trained with (finetune_libero.sh's SEED)
default_experts                          # CKPT_SPATIAL, CKPT_OBJECT, CKPT_GOAL, CKPT_10
SUITES="${SUITES:-libero_spatial libero_object libero_goal libero_10}"
RESULTS_DIR="${RESULTS_DIR:-runs/libero}"
SUMMARY_DIR="${SUMMARY_DIR:-$RESULTS_DIR/summary}"
NUM_TRIALS="${NUM_TRIALS:-50}"
TASK_IDS="${TASK_IDS:-}"            # e.g. "[0,1]"; empty: all tasks
MAX_STEPS="${MAX_STEPS:-}"          # empty: per-suite limits (220 / 280 / 300 / 520)
NUM_ENVS="${NUM_ENVS:-1}"           # parallel simulators (worker processes)
EVAL_SEED="${EVAL_SEED:-7}"         # the rollouts' seed (the protocol's 7)
DEVICE="${DEVICE:-auto}"
ENV_IMG_RES="${ENV_IMG_RES:-256}"
FAST_RENDER="${FAST_RENDER:-false}" # true only for smoke runs: images differ slightly
SAVE_VIDEOS="${SAVE_VIDEOS:-}"      # "", "all", "first" or globs such as "libero_goal/3/*"
export MUJOCO_GL="${MUJOCO_GL:-egl}" # headless rendering: egl (GPU or Mesa) or osmesa
DRY_RUN="${DRY_RUN:-0}"


# a real run starts nothing unless every path is right; a dry run still prints the plan of the good ones
problems=0
check_experts $SUITES || problems=1
(( problems == 0 )) || [[ "$DRY_RUN" == 1 ]] || exit 2

common=(--results_dir "$RESULTS_DIR" --summary_dir "$SUMMARY_DIR" --num_trials_per_task "$NUM_TRIALS"
        --num_envs "$NUM_ENVS" --seed "$EVAL_SEED" --device "$DEVICE" --env_img_res "$ENV_IMG_RES"
        --fast_render "$FAST_RENDER" --mujoco_gl "$MUJOCO_GL")
[[ -n "$TASK_IDS" ]] && common+=(--task_ids "$TASK_IDS")
[[ -n "$MAX_STEPS" ]] && common+=(--max_steps "$MAX_STEPS")
[[ -n "$SAVE_VIDEOS" ]] && common+=(--save_videos "$SAVE_VIDEOS")
[[ "$DRY_RUN" == 1 ]] && common+=(--dry_run true)

for suite in "${READY[@]}"; do
  var="$(expert_var "$suite")"
  ckpt="${!var}"
  # the baseline's experts get results files of their own, as they get a row of their own
  arch="$(manifest_field "$ckpt" config expert_arch)"
  run_prefix="ft"
  [[ "$arch" == cross_attn || -z "$arch" ]] || run_prefix="ft-$arch"
  echo "== $suite: $ckpt"
  HF_HUB_OFFLINE=1 "$PYTHON" -m experiments.robot.libero.run_libero_eval --pretrained_checkpoint "$ckpt" \
    --task_suites "[$suite]" --run_name "$run_prefix--$suite" "${common[@]}"
done
[[ "$DRY_RUN" == 1 ]] && exit $(( problems ? 2 : 0 ))
echo "results table: $SUMMARY_DIR/results.md"
