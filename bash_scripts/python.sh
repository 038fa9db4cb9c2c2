# Sourced by the scripts beside it, from the repository root: PYTHON from the environment, else .venv/bin/python,
# else python3 on the PATH; nothing runs without it, not even a dry run's plan.
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
command -v "$PYTHON" >/dev/null || { echo "error: PYTHON=$PYTHON is not an executable (run 'make install' first)" >&2; exit 2; }
