#!/usr/bin/env bash
# Merge the four fine-tuned LIBERO experts with each algorithm of the paper's table (docs/DESIGN.md §4), one
# artifact per algorithm in MERGED_ROOT/<algorithm>, each ready for eval_merged.sh:
#   bash bash_scripts/merge_libero.sh
#   for a in task_arithmetic ties tsv knots wudi emr; do MERGED_CKPT=runs/merged/$a bash bash_scripts/eval_merged.sh; done
#   DRY_RUN=1 bash bash_scripts/merge_libero.sh                  # check the experts, print the merges, run nothing
#   ALGORITHMS=ties MERGE_FLAGS="--ties.k 100 --ties.merge_func sum" MERGED_ROOT=runs/merged-release \
#     bash bash_scripts/merge_libero.sh                          # the MergeVLA release's TIES
# Every path and knob is a variable below; override any from the environment. The experts are named after their
# suites (the router's accuracy compares the routed expert's name with the episode's suite). An artifact that
# already exists is never replaced: the script stops before merging anything and names it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

source bash_scripts/common.sh
# The experts: CKPT_SPATIAL, CKPT_OBJECT, CKPT_GOAL, CKPT_10, else each suite's newest finished checkpoint in
# OUT_ROOT/<suite>-<config>-<expert_arch>-seed<train seed> (as finetune_libero.sh names its runs)
OUT_ROOT="${OUT_ROOT:-runs}"
CONFIG_NAME="${CONFIG_NAME:-qwen25-dinosiglip-224px}"
EXPERT_ARCH="${EXPERT_ARCH:-cross_attn}"  # self_attn: the baseline's runs (merge with MASKS=false EXPERT_HEAD_LAYERS=0)
TRAIN_SEED="${TRAIN_SEED:-${SEED:-7}}"   # the seed the experts trained with (finetune_libero.sh's SEED)
default_experts
SUITES="${SUITES:-libero_spatial libero_object libero_goal libero_10}"  # the experts merged, in task order
ALGORITHMS="${ALGORITHMS:-task_arithmetic ties tsv knots wudi emr}"      # any of mergy.py's --algorithm
MERGED_ROOT="${MERGED_ROOT:-runs/merged}"
MASKS="${MASKS:-true}"                # task masks (TALL; EMR's own for emr)
MASK_LAMBDA="${MASK_LAMBDA:-0.6}"     # TALL mask λ
K_GATE="${K_GATE:-8}"                 # router subspace size
EXPERT_HEAD_LAYERS="${EXPERT_HEAD_LAYERS:-1}"  # L_h: last action-expert blocks kept per task
MERGE_SEED="${MERGE_SEED:-0}"         # DARE's drops
MERGE_DEVICE="${MERGE_DEVICE:-cpu}"   # cpu | cuda: where the merge arithmetic runs
MERGE_FLAGS="${MERGE_FLAGS:-}"        # more mergy.py flags for every merge, e.g. "--ties.k 100"
DRY_RUN="${DRY_RUN:-0}"

problems=0
check_experts $SUITES || problems=1
experts=()
for suite in "${READY[@]}"; do
  var="$(expert_var "$suite")"
  experts+=("$suite=${!var}")
done
known=$(HF_HUB_OFFLINE=1 "$PYTHON" -c 'from model_merging.algorithms import METHODS; print(" ".join(sorted(METHODS)))') \
  || { echo "error: $PYTHON cannot import model_merging (run 'make install' first)" >&2; exit 2; }
existing=()
for algorithm in $ALGORITHMS; do
  if [[ " $known " != *" $algorithm "* ]]; then
    echo "error: ALGORITHMS has '$algorithm'; expected some of: $known" >&2
    problems=1
  fi
  [[ ! -e "$MERGED_ROOT/$algorithm" ]] || existing+=("$MERGED_ROOT/$algorithm")
done
if (( ${#existing[@]} )); then
  echo "error: already merged (never replaced): ${existing[*]}; delete, or leave their algorithms out of ALGORITHMS" >&2
  problems=1
fi
(( problems == 0 )) || exit 2

read -r -a extra <<< "$MERGE_FLAGS"
for algorithm in $ALGORITHMS; do
  cmd=("$PYTHON" -m model_merging.mergy --experts "${experts[@]}" --algorithm "$algorithm" --masks "$MASKS"
       --mask_lambda "$MASK_LAMBDA" --k_gate "$K_GATE" --expert_head_layers "$EXPERT_HEAD_LAYERS" --seed "$MERGE_SEED"
       --device "$MERGE_DEVICE" --out "$MERGED_ROOT/$algorithm" "${extra[@]}")
  echo "== $algorithm → $MERGED_ROOT/$algorithm"
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo
  else
    HF_HUB_OFFLINE=1 "${cmd[@]}"
  fi
done
