# Sourced by the scripts beside it, from the repository root.

# The interpreter: PYTHON from the environment, else .venv/bin/python, else python3 on the PATH; nothing runs
# without it, not even a dry run's plan.
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
command -v "$PYTHON" >/dev/null || { echo "error: PYTHON=$PYTHON is not an executable (run 'make install' first)" >&2; exit 2; }

# manifest_field DIR KEY [SUBKEY]: DIR/manifest.json's KEY (or KEY.SUBKEY) as text; empty when absent or unreadable.
manifest_field() {
  "$PYTHON" - "$@" <<'PY' 2>/dev/null || true
import json, sys
value = json.load(open(sys.argv[1] + "/manifest.json"))
for key in sys.argv[2:]:
    value = value.get(key) if isinstance(value, dict) else None
print(value if isinstance(value, str) else "")
PY
}

# check_checkpoint VAR FORMAT WHAT: an error line (and status 1) unless the directory in $VAR holds a finished
# checkpoint whose manifest has that format (mergevla-checkpoint: one fine-tuned expert; mergevla-merged: a
# mergy.py artifact); WHAT names it for the user.
check_checkpoint() {
  local dir="${!1}" format="$2" what="$3" found
  if [[ ! -f "$dir/manifest.json" ]]; then
    echo "error: $1=$dir: no manifest.json there (expected $what)" >&2; return 1
  fi
  found=$(manifest_field "$dir" format)
  if [[ "$found" != "$format" ]]; then
    echo "error: $1=$dir: its manifest.json has format '${found:-none}', expected '$format' ($what)" >&2; return 1
  fi
}

# The fine-tuned expert of each LIBERO suite (eval.sh, merge_libero.sh): CKPT_SPATIAL, CKPT_OBJECT, CKPT_GOAL and
# CKPT_10 from the environment, else the newest finished checkpoint finetune_libero.sh wrote for the suite
# (OUT_ROOT/<suite>-CONFIG_NAME-EXPERT_ARCH-seedTRAIN_SEED/checkpoints/step_N, finished = holding its manifest.json).
# The calling script sets OUT_ROOT, CONFIG_NAME, EXPERT_ARCH and TRAIN_SEED first.
newest_checkpoint() {
  local run="$OUT_ROOT/$1-$CONFIG_NAME-$EXPERT_ARCH-seed$TRAIN_SEED" found
  found=$(ls -d "$run"/checkpoints/step_*/manifest.json 2>/dev/null | sort | tail -n 1)
  if [[ -n "$found" ]]; then dirname "$found"; else echo "$run/checkpoints/step_<none finished>"; fi
}
default_experts() {
  local suite var
  LOOKED_UP=""  # the CKPT_* looked up here (named in check_experts' hint when one is missing)
  for suite in libero_spatial libero_object libero_goal libero_10; do
    var="$(expert_var "$suite")"
    [[ -z "${!var:-}" ]] || continue
    LOOKED_UP+=" $var"
    printf -v "$var" '%s' "$(newest_checkpoint "$suite")"
  done
}

# expert_var SUITE: the variable holding SUITE's expert; empty for a suite that has none
expert_var() {
  case "$1" in
    libero_spatial) echo CKPT_SPATIAL ;;
    libero_object) echo CKPT_OBJECT ;;
    libero_goal) echo CKPT_GOAL ;;
    libero_10) echo CKPT_10 ;;
    *) echo "" ;;
  esac
}

# check_experts SUITE...: READY gets the suites whose expert is a finished checkpoint; each other one gets an error
# line (and, when it was looked up, how runs are found); status 1 when any is not ready.
check_experts() {
  local suite var status=0 not_found=0
  READY=()
  for suite in "$@"; do
    var="$(expert_var "$suite")"
    if [[ -z "$var" ]]; then
      echo "error: SUITES has '$suite'; expected libero_spatial, libero_object, libero_goal or libero_10" >&2
      status=1
    elif ! check_checkpoint "$var" mergevla-checkpoint "a fine-tuned checkpoint directory"; then
      status=1
      [[ "$LOOKED_UP" != *" $var"* ]] || not_found=1
    else
      READY+=("$suite")
    fi
  done
  if [[ "$not_found" == 1 ]]; then
    echo "note: runs are looked for in OUT_ROOT/<suite>-CONFIG_NAME-EXPERT_ARCH-seedTRAIN_SEED" \
         "($OUT_ROOT/<suite>-$CONFIG_NAME-$EXPERT_ARCH-seed$TRAIN_SEED); set those as finetune_libero.sh ran, or CKPT_*" >&2
  fi
  return $status
}
