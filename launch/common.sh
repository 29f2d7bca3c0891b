# Sourced by launch/*.sh: the entry point to run (first argument), the interpreter, the environment, NPROC.
# Sets REPO, WHAT (train|generate|export|serve, shifted off by the caller), PYTHON, NPROC.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHAT="${1:-}"
case "$WHAT" in
  train|generate|export|serve) ;;
  *) echo "error: usage: $0 train|generate|export|serve [overrides...]" >&2; exit 2 ;;
esac
# The interpreter: $PYTHON if set; else the active one (a venv, conda or system install) when it imports the
# framework and its launchers; else this checkout's .venv.
imports_framework() { (cd / && PYTHONPATH="$REPO" "$1" -c "import framework, torch, hydra
from importlib.util import find_spec
assert find_spec('deepspeed')" >/dev/null 2>&1); }
if [ -z "${PYTHON:-}" ]; then
  active="$(command -v python || command -v python3 || true)"
  if [ -n "$active" ] && imports_framework "$active"; then
    PYTHON="$active"
  elif [ -x "$REPO/.venv/bin/python" ]; then
    PYTHON="$REPO/.venv/bin/python"
  else
    echo "error: no Python with torch, deepspeed and hydra found: activate the environment that has them," \
         "run scripts/setup.sh, or set PYTHON=" >&2
    exit 2
  fi
fi
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 2)" 2>/dev/null || echo 2)
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export TOKENIZERS_PARALLELISM=false
