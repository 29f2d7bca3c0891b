# Sourced by launch/*.sh: the entry point to run (first argument), the interpreter, the environment, NPROC.
# Sets REPO, WHAT (train|generate|export, shifted off by the caller), PYTHON, NPROC.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHAT="${1:-}"
case "$WHAT" in
  train|generate|export) ;;
  *) echo "error: usage: $0 train|generate|export [overrides...]" >&2; exit 2 ;;
esac
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 2)" 2>/dev/null || echo 2)
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export TOKENIZERS_PARALLELISM=false
