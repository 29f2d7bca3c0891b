#!/usr/bin/env bash
# The main job on the embedded default: set up, train the small model on CPU (synthetic "reverse" task) with
# DeepSpeed data parallelism over NPROC processes (default 2: one a core), export it, and hand the export to the
# pipeline runner (2 stages) to generate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
RUN=${RUN_DIR:-runs/cpu_default}
.venv/bin/torchrun --standalone --nproc_per_node="${NPROC:-2}" -m framework.train experiment=cpu_default \
  run_dir="$RUN" "$@"
cat > "$RUN/prompts.jsonl" <<'JSONL'
{"prompt": "reverse: 1 2 3 4 5 ="}
{"prompt": "reverse: 8 6 7 5 3 0 9 ="}
{"prompt": "reverse: 4 2 6 ="}
{"prompt": "reverse: 9 9 1 0 2 7 ="}
JSONL
.venv/bin/torchrun --standalone --nproc_per_node=2 -m framework.generate model_dir="$RUN" \
  prompts="$RUN/prompts.jsonl" output="$RUN/generations.jsonl" infer.pp=2 infer.max_new_tokens=16 \
  infer.summary="$RUN/generate_summary.json"
.venv/bin/python - "$RUN" <<'PY'
import json, sys
run = sys.argv[1]
for row in map(json.loads, open(f"{run}/generations.jsonl")):
    print(f"{row['prompt']}{row['text']}")
PY
