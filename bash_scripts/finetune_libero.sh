#!/usr/bin/env bash
# Fine-tune one MergeVLA expert on one LIBERO suite (run once per suite).
#
#   bash bash_scripts/finetune_libero.sh [SUITE] [extra finetune.py flags...]
#
# SUITE: libero_spatial (default) | libero_object | libero_goal | libero_10; it sets the step count of
# docs/DESIGN.md §2 (30k / 20k / 30k / 50k). Any other suite directory needs --max_steps. Extra flags come last,
# so they override the defaults here (e.g. --config_name tiny --max_steps 20 for a CPU smoke run).
#
# Environment:
#   DATA_ROOT  directory holding <suite>/ (HDF5) or <suite>_no_noops/ (RLDS)   [data/libero]
#   FORMAT     hdf5 | rlds                                                       [hdf5]
#   OUT_ROOT   runs go to OUT_ROOT/<suite>-<config>-<expert_arch>-seed<seed> (finetune.py's own default name),
#              so another seed or the self-attention baseline gets a run of its own; re-running resumes there [runs]
#   BASE_DIR   the converted base (vla-scripts/convert_base.py); not used for the tiny config, which
#              trains on a random base, nor when a --base.* flag is given
#                                                  [pretrained_models/mergevla-base-qwen25-dinosiglip-224px]
#   NPROC      processes (GPUs); > 1 launches torchrun                           [1]
#              --batch_size is per process, so NPROC GPUs train on NPROC × 16 samples per step: the
#              published recipe (docs/DESIGN.md §2) is one GPU at 8 × 2; scale --max_steps or --lr yourself.
#   PYTHON     interpreter                                                       [.venv/bin/python if present]
#   SEED       training seed, the same for every suite of one experiment         [7]
set -euo pipefail
cd "$(dirname "$0")/.."

SUITE="libero_spatial"
if [[ $# -gt 0 && "$1" != --* ]]; then SUITE="$1"; shift; fi

case "$SUITE" in
  libero_spatial) STEPS=30000 ;;
  libero_object)  STEPS=20000 ;;
  libero_goal)    STEPS=30000 ;;
  libero_10)      STEPS=50000 ;;
  *)
    if [[ " $* " != *" --max_steps "* && " $* " != *" --max_steps="* ]]; then
      echo "error: no default step count for suite '$SUITE' (known: libero_spatial libero_object libero_goal libero_10); pass --max_steps N" >&2
      exit 2
    fi
    STEPS="" ;;
esac

DATA_ROOT="${DATA_ROOT:-data/libero}"
BASE_DIR="${BASE_DIR:-pretrained_models/mergevla-base-qwen25-dinosiglip-224px}"
FORMAT="${FORMAT:-hdf5}"
OUT_ROOT="${OUT_ROOT:-runs}"
SEED="${SEED:-7}"
source bash_scripts/common.sh
NPROC="${NPROC:-1}"
if [[ ! "$NPROC" =~ ^[1-9][0-9]*$ ]]; then echo "error: NPROC is '$NPROC', expected a positive integer" >&2; exit 2; fi

# The run name follows the model config, the architecture and the seed (flags given override the defaults), so a
# tiny smoke run, the baseline or a second seed never lands in another run's directory.
CONFIG_NAME="qwen25-dinosiglip-224px"
EXPERT_ARCH="cross_attn"
GIVEN_BASE=0
args=("$@")
flag_value() {  # the value of flag $1 at args[$2] (as "--flag VALUE" or "--flag=VALUE"); fails when it is not there
  local i=$2
  if [[ "${args[$i]}" == "$1" && $((i + 1)) -lt ${#args[@]} ]]; then echo "${args[$((i + 1))]}"; return 0; fi
  if [[ "${args[$i]}" == "$1"=* ]]; then echo "${args[$i]#"$1"=}"; return 0; fi
  return 1
}
for ((i = 0; i < ${#args[@]}; i++)); do
  CONFIG_NAME="$(flag_value --config_name "$i" || echo "$CONFIG_NAME")"
  EXPERT_ARCH="$(flag_value --expert_arch "$i" || echo "$EXPERT_ARCH")"
  SEED="$(flag_value --seed "$i" || echo "$SEED")"
  if [[ "${args[$i]}" == --base.* ]]; then GIVEN_BASE=1; fi
  if [[ "${args[$i]}" == --suite || "${args[$i]}" == --suite=* ]]; then  # the run directory and steps follow SUITE
    echo "error: give the suite as the first argument (bash $0 SUITE [flags...]), not as --suite" >&2
    exit 2
  fi
done

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

defaults=(
  --suite "$SUITE" --data_root "$DATA_ROOT" --dataset_format "$FORMAT" --seed "$SEED"
  --config_name "$CONFIG_NAME" --out_dir "$OUT_ROOT/$SUITE-$CONFIG_NAME-$EXPERT_ARCH-seed$SEED" --resume true
)
if [[ "$CONFIG_NAME" != tiny && "$GIVEN_BASE" == 0 ]]; then defaults+=(--base.base_dir "$BASE_DIR"); fi
if [[ -n "$STEPS" ]]; then defaults+=(--max_steps "$STEPS"); fi

if [[ "$NPROC" -gt 1 ]]; then
  exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" vla-scripts/finetune.py "${defaults[@]}" "$@"
else
  exec "$PYTHON" vla-scripts/finetune.py "${defaults[@]}" "$@"
fi
