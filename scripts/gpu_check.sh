#!/usr/bin/env bash
# Every GPU check and benchmark in one go, from a bare GPU machine, in at most 8 minutes on one H100; one table.
#
#   bash scripts/gpu_check.sh                  # on the GPU machine, from the repository root
#   GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh   # anywhere: the same steps at CPU size (the table's plumbing)
#
# A bare GPU image has torch and transformers but not deepspeed, hydra, datasets or wandb, and no registry: build
# their wheels beforehand where pip works (bash ../shared/gpu/make-wheels.sh, into .whl/), carry .whl, and this
# script installs them into /tmp/site. Rows, each under its own time limit (a row that fails or runs out says so
# and the others still run):
#   cuda tests       pytest -m cuda (engine parity, bf16 training, two ranks on one GPU refused; compiled decode at
#                    several batch sizes with no CUDA-graph capture or recompile after load and eager's tokens, the
#                    chunked loss against F.cross_entropy, the loaders' peak memory without an fp32 copy)
#   train 1b         bf16, ZeRO 1, one GPU, seq 2048 x micro-batch 4: tokens/s and MFU, without and with
#                    activation checkpointing (scripts/bench_train.py: our trainer and a bare loop)
#   infer 1b         python scripts/bench_infer.py --flavor 1b   (when the script exists and takes --flavor)
#   compress         python scripts/bench_compress.py --gpu       (when the script exists and takes --gpu)
# Environment: PYTHON [python3], OUT [/tmp/gpu_check] (logs and JSON rows), GPU_CHECK_DRY_RUN [0].
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-/tmp/gpu_check}"
DRY="${GPU_CHECK_DRY_RUN:-0}"
mkdir -p "$OUT_DIR"
t_start=$(date +%s)

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: installing the carried wheels (.whl/) failed" >&2; exit 2; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
       HF_HUB_OFFLINE=1 WANDB_MODE=offline OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
if [ "$DRY" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: no CUDA device is visible: run this on a GPU machine, or GPU_CHECK_DRY_RUN=1 for the CPU dry run" >&2
  exit 2
fi

rows=()   # "name|status|seconds|result"
run_row() {  # name, time limit (s), command...: runs it with its log in $OUT_DIR/<name>.log
  local name="$1" limit="$2"; shift 2
  local log="$OUT_DIR/$name.log" t0 rc
  t0=$(date +%s)
  echo "[gpu_check] $name: $*" >&2
  timeout "$limit" "$@" >"$log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 )) status=ok
  [ $rc -eq 124 ] && status="timed out (${limit}s)"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="failed (exit $rc)"
  ROW_STATUS="$status"; ROW_SECONDS="$dt"
}

# 1. the CUDA tests
run_row cuda_tests 260 "$PY" -m pytest -q -m cuda tests -p no:cacheprovider
summary=$(grep -E "passed|failed|skipped|error" "$OUT_DIR/cuda_tests.log" | tail -1)
rows+=("pytest -m cuda|$ROW_STATUS|$ROW_SECONDS|${summary:-see cuda_tests.log}")

# 2. 1B training, bf16, ZeRO 1, without and with activation checkpointing
if [ "$DRY" = 1 ]; then
  train_args=(--model small --precision fp32 --seq 64 --micro 4 --accum 2 --steps 4 --dp 1)
else
  train_args=(--model 1b --precision bf16 --seq 2048 --micro 4 --accum 2 --steps 12 --dp 1)
fi
for ac in "" "--ac"; do
  name="train${ac:+_ac}"
  run_row "$name" 150 "$PY" scripts/bench_train.py "${train_args[@]}" --zero 1 $ac --json "$OUT_DIR/$name.json"
  result=$("$PY" - "$OUT_DIR/$name.json" <<'EOF' 2>/dev/null
import json, sys
r = json.load(open(sys.argv[1]))[0]
mfu = lambda x: f"{100 * x:.1f}%" if x is not None else "n/a"
print(f"{r['model']} {r['precision']} ZeRO {r['zero']}, seq {r['seq']} x micro {r['micro']}: ours {r['ours_tps']:,.0f} "
      f"tok/s (MFU {mfu(r['ours_mfu'])}), bare loop {r['plain_tps']:,.0f} (MFU {mfu(r['plain_mfu'])}) on {r['device']}")
EOF
)
  state=off; [ -n "$ac" ] && state=on
  rows+=("train 1b, activation checkpointing $state|$ROW_STATUS|$ROW_SECONDS|${result:-see $name.log}")
done

# 3. rows the other benchmarks add, when their scripts exist and take the GPU flag
if [ -f scripts/bench_infer.py ] && grep -q -- "--flavor" scripts/bench_infer.py; then
  if [ "$DRY" = 1 ]; then
    rows+=("bench_infer --flavor 1b|not run (dry run)|0|would run: $PY scripts/bench_infer.py --flavor 1b")
  else
    run_row bench_infer 150 "$PY" scripts/bench_infer.py --flavor 1b
    rows+=("bench_infer --flavor 1b|$ROW_STATUS|$ROW_SECONDS|$(grep -E '^\|' "$OUT_DIR/bench_infer.log" | tail -1)")
  fi
fi
if [ -f scripts/bench_compress.py ] && grep -q -- "--gpu" scripts/bench_compress.py; then
  if [ "$DRY" = 1 ]; then
    rows+=("bench_compress --gpu|not run (dry run)|0|would run: $PY scripts/bench_compress.py --gpu")
  else
    run_row bench_compress 120 "$PY" scripts/bench_compress.py --gpu
    rows+=("bench_compress --gpu|$ROW_STATUS|$ROW_SECONDS|$(grep -E '^\|' "$OUT_DIR/bench_compress.log" | tail -1)")
  fi
fi

device=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu (dry run)')")
echo
echo "gpu_check on $device, $(( $(date +%s) - t_start )) s in all (logs in $OUT_DIR)"
echo "| check | status | s | result |"
echo "| --- | --- | ---: | --- |"
failed=0
for r in "${rows[@]}"; do
  IFS='|' read -r name status secs result <<< "$r"
  echo "| $name | $status | $secs | $result |"
  case "$status" in ok|"not run"*) ;; *) failed=1 ;; esac
done
exit $failed
