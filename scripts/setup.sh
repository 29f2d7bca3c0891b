#!/usr/bin/env bash
# Create .venv and install Miaotui with its dev extra. CPU torch by default; on a GPU machine pre-install the
# torch build you want (or set TORCH_SPEC) before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[dev]"
# The playground test drives a real headless Chromium: Debian's chromium + chromium-driver, installed when we are
# root and they are missing; a failure here never fails the set-up (the test then skips and says why).
if [ "$(id -u)" = 0 ] && ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; } \
   && command -v apt-get >/dev/null; then
  { apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }; } \
    || echo "[setup] chromium could not be installed: the playground browser test will be skipped" >&2
fi
echo "[setup] ready: $(.venv/bin/python -c 'import torch, deepspeed, transformers; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "transformers", transformers.__version__)' 2>/dev/null | tail -1)"
