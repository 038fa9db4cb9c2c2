#!/usr/bin/env bash
# Merge the four fine-tuned LIBERO experts with each algorithm of the paper's table (docs/DESIGN.md §4), one
# artifact per algorithm in MERGED_ROOT/<algorithm>, each ready for eval_merged.sh:
#
#   bash bash_scripts/merge_libero.sh [extra mergy.py flags...]
#   for a in task_arithmetic ties tsv knots wudi emr; do MERGED_CKPT=runs/merged/$a bash bash_scripts/eval_merged.sh; done
#   DRY_RUN=1 bash bash_scripts/merge_libero.sh      # check the experts, print the merges, run nothing
#   ALGORITHMS=ties MERGED_ROOT=runs/merged-release bash bash_scripts/merge_libero.sh --ties.k 100 --ties.merge_func sum
#                                                    # the MergeVLA release's TIES (evaluate it with its own METHOD=)
#
# Extra flags go to every merge and come last, so they override the settings here. Every path and knob is a
# variable below; override any from the environment. The experts are named after their suites (the router's
# accuracy compares the routed expert's name with the episode's suite). Re-running skips each artifact this script
# already made with the same command (MERGED_ROOT/<algorithm>.command records it); any other existing artifact
# stops the script before it merges anything.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

source bash_scripts/common.sh
# The experts: CKPT_SPATIAL, CKPT_OBJECT, CKPT_GOAL, CKPT_10, else each suite's newest finished checkpoint in
# OUT_ROOT/<suite>-<config>-<expert_arch>-seed<train seed> (as finetune_libero.sh names its runs)
OUT_ROOT="${OUT_ROOT:-runs}"
CONFIG_NAME="${CONFIG_NAME:-qwen25-dinosiglip-224px}"
# self_attn: the baseline's runs; its naive merge: MASKS=false EXPERT_HEAD_LAYERS=0 ALGORITHMS=task_arithmetic
# MERGED_ROOT=runs/merged-baseline
EXPERT_ARCH="${EXPERT_ARCH:-cross_attn}"
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
DRY_RUN="${DRY_RUN:-0}"

problems=0
check_experts $SUITES || problems=1
experts=()
for suite in "${READY[@]}"; do
  var="$(expert_var "$suite")"
  experts+=("$suite=${!var}")
done
if (( problems == 0 && ${#experts[@]} < 2 )); then
  echo "error: SUITES names ${#experts[@]} expert(s); a merge needs two or more" >&2
  problems=1
fi
known=$(HF_HUB_OFFLINE=1 "$PYTHON" -c 'from model_merging.algorithms import METHODS; print(" ".join(sorted(METHODS)))') \
  || { echo "error: $PYTHON cannot import model_merging (run 'make install' first)" >&2; exit 2; }
[[ -n "${ALGORITHMS// }" ]] || { echo "error: ALGORITHMS is empty; expected some of: $known" >&2; problems=1; }

# mergy_args ALGORITHM: ARGS gets mergy's arguments for one merge (the extra flags last); LINE the same, quoted as
# the .command file beside a finished artifact records them
mergy_args() {
  ARGS=(-m model_merging.mergy --experts "${experts[@]}" --algorithm "$1" --masks "$MASKS" --mask_lambda "$MASK_LAMBDA"
        --k_gate "$K_GATE" --expert_head_layers "$EXPERT_HEAD_LAYERS" --seed "$MERGE_SEED" --device "$MERGE_DEVICE"
        --out "$MERGED_ROOT/$1" "${EXTRA[@]}")
  LINE="$(printf '%q ' "${ARGS[@]}")"
}
EXTRA=("$@")
todo=()
existing=()
seen=" "
for algorithm in $ALGORITHMS; do
  if [[ " $known " != *" $algorithm "* ]]; then
    echo "error: ALGORITHMS has '$algorithm'; expected some of: $known" >&2
    problems=1
  elif [[ "$seen" == *" $algorithm "* ]]; then
    echo "error: ALGORITHMS has '$algorithm' twice" >&2
    problems=1
  fi
  seen+="$algorithm "
  out="$MERGED_ROOT/$algorithm"
  mergy_args "$algorithm"
  if [[ ! -e "$out" ]]; then
    todo+=("$algorithm")
  elif [[ -f "$out.command" && "$(cat "$out.command")" == "$LINE" ]] \
       && [[ "$(manifest_field "$out" format)" == mergevla-merged ]]; then
    echo "== $algorithm: $out was merged by this command before; kept"
  else
    existing+=("$out")
  fi
done
if (( ${#existing[@]} )); then
  echo "error: already there, made otherwise (never replaced): ${existing[*]}; delete them, or leave their" \
       "algorithms out of ALGORITHMS" >&2
  problems=1
fi
(( problems == 0 )) || exit 2

for algorithm in "${todo[@]}"; do
  out="$MERGED_ROOT/$algorithm"
  mergy_args "$algorithm"
  echo "== $algorithm → $out"
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "$PYTHON $LINE"
  else
    # recorded first: mergy writes the artifact atomically, so once it exists it is this command's, even when the
    # script is killed right after the merge
    printf '%s' "$LINE" > "$out.command.tmp" && mv "$out.command.tmp" "$out.command"
    HF_HUB_OFFLINE=1 "$PYTHON" "${ARGS[@]}"
  fi
done
