#!/usr/bin/env bash
# Evaluate one merged checkpoint on every LIBERO suite; the router picks each episode's task mask and expert
# head from its first observation (docs/DESIGN.md §5-6), and the routing decision and scores go into each row.
# Every path and knob is a variable below; override any from the environment, e.g.
#   MERGED_CKPT=runs/merged/ties bash bash_scripts/eval_merged.sh
#   DRY_RUN=1 bash bash_scripts/eval_merged.sh   # check paths, print the plan, run nothing
#   QUICK=1 bash bash_scripts/eval_merged.sh     # CPU smoke run: 1 task per suite, 1 trial, 16 steps, fast
#                                                # 128-px rendering, into runs/libero-quick (overridable)
# Re-running resumes: finished episodes in RESULTS_DIR are skipped. Runs sharing RESULTS_DIR (e.g. eval.sh's
# FT experts and several merge methods) end up in one table.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

source bash_scripts/common.sh
QUICK="${QUICK:-0}"
if [[ "$QUICK" == 1 ]]; then  # smoke-run defaults, each still overridable, in a results directory of their own
  : "${NUM_TRIALS=1}" "${TASK_IDS=[0]}" "${MAX_STEPS=16}" "${FAST_RENDER=true}" "${ENV_IMG_RES=128}"
  : "${RESULTS_DIR=runs/libero-quick}"
fi
MERGED_CKPT="${MERGED_CKPT:-runs/merged/ties}"
METHOD="${METHOD:-}"                # table row label; empty: the merge method recorded in the artifact
SUITES="${SUITES:-libero_spatial libero_object libero_goal libero_10}"
RESULTS_DIR="${RESULTS_DIR:-runs/libero}"
SUMMARY_DIR="${SUMMARY_DIR:-$RESULTS_DIR/summary}"
NUM_TRIALS="${NUM_TRIALS:-50}"
TASK_IDS="${TASK_IDS:-}"            # e.g. "[0,1]"; empty: all tasks
MAX_STEPS="${MAX_STEPS:-}"          # empty: per-suite limits (220 / 280 / 300 / 520)
NUM_ENVS="${NUM_ENVS:-1}"           # parallel simulators (worker processes)
EVAL_SEED="${EVAL_SEED:-7}"         # the rollouts' seed (the protocol's 7)
if [[ -n "${SEED:-}" ]]; then  # a SEED exported for finetune_libero.sh is not the rollouts' seed
  echo "note: SEED=$SEED is finetune_libero.sh's training seed, not used here; the rollouts' seed is EVAL_SEED=$EVAL_SEED" >&2
fi
DEVICE="${DEVICE:-auto}"
ENV_IMG_RES="${ENV_IMG_RES:-256}"
FAST_RENDER="${FAST_RENDER:-false}" # true only for smoke runs: images differ slightly
SAVE_VIDEOS="${SAVE_VIDEOS:-}"      # "", "all", "first" or globs such as "libero_goal/3/*"
# value | key | key_value | value_update; exemplar after `python -m model_merging.exemplar_router --merged ...`;
# empty: the artifact's default (value, as published)
ROUTER_VARIANT="${ROUTER_VARIANT:-}"
export MUJOCO_GL="${MUJOCO_GL:-egl}" # headless rendering: egl (GPU or Mesa) or osmesa
DRY_RUN="${DRY_RUN:-0}"


# (a dry run of a missing artifact has no plan to print)
check_checkpoint MERGED_CKPT mergevla-merged "a merged artifact directory, written by mergy.py" || exit 2

suites_list="[$(echo $SUITES | tr ' ' ',')]"
args=(--pretrained_checkpoint "$MERGED_CKPT" --task_suites "$suites_list" --results_dir "$RESULTS_DIR"
      --summary_dir "$SUMMARY_DIR" --num_trials_per_task "$NUM_TRIALS" --num_envs "$NUM_ENVS" --seed "$EVAL_SEED"
      --device "$DEVICE" --env_img_res "$ENV_IMG_RES" --fast_render "$FAST_RENDER" --mujoco_gl "$MUJOCO_GL")
[[ -n "$METHOD" ]] && args+=(--method "$METHOD")
[[ -n "$TASK_IDS" ]] && args+=(--task_ids "$TASK_IDS")
[[ -n "$MAX_STEPS" ]] && args+=(--max_steps "$MAX_STEPS")
[[ -n "$SAVE_VIDEOS" ]] && args+=(--save_videos "$SAVE_VIDEOS")
[[ -n "$ROUTER_VARIANT" ]] && args+=(--router_variant "$ROUTER_VARIANT")
[[ "$DRY_RUN" == 1 ]] && args+=(--dry_run true)

echo "== merged checkpoint $MERGED_CKPT on $suites_list"
HF_HUB_OFFLINE=1 "$PYTHON" -m experiments.robot.libero.run_libero_eval "${args[@]}"
[[ "$DRY_RUN" == 1 ]] && exit 0
echo "results table: $SUMMARY_DIR/results.md"
