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
