#!/usr/bin/env bash
# Set up, then run the whole test suite (unit, distributed on CPU/gloo, end-to-end). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=offline
.venv/bin/python -m ruff check framework tests scripts
.venv/bin/python -m pytest -q --durations=12 "$@"
