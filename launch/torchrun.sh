#!/usr/bin/env bash
# Start training, pipeline inference, the server or an export with torchrun, on one node or on several.
#
#   launch/torchrun.sh train experiment=cpu_default                      # one node, NPROC processes
#   launch/torchrun.sh generate model_dir=runs/x infer.pp=2 prompt="'def f(x):'"
#   launch/torchrun.sh serve model_dir=runs/x infer.pp=2 serve.port=8000     # OpenAI-compatible HTTP on rank 0
#   # two nodes, the same command on each (node 0's address is the rendezvous endpoint):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/torchrun.sh train parallel.tp=2     # on 10.0.0.1
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/torchrun.sh train parallel.tp=2     # on the other node
#
# Environment (defaults in brackets):
#   NPROC          processes per node [the GPUs visible, else 2]
#   NNODES         nodes in the job [1]; more than 1 uses a c10d rendezvous at MASTER_ADDR:MASTER_PORT
#   NODE_RANK      this node's rank [SLURM_NODEID, else 0] (c10d may renumber; ranks stay contiguous per node)
#   MASTER_ADDR    an address of node 0 that every node reaches [127.0.0.1]
#   MASTER_PORT    rendezvous port on node 0 [29500]
#   RDZV_ID        job id shared by all nodes [miaotui]
#   LOCAL_ADDR     the address other nodes reach this node at [its hostname's]; needed where the hostname
#                  resolves to an address the other nodes cannot reach
#   RDZV_TIMEOUT   seconds to wait for every node to join before failing [600]
#   MAX_RESTARTS   restarts of the whole job after a worker failure (resumes from the last checkpoint) [0]
#   GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME   the network interface that reaches the other nodes (several
#                  interfaces, or a hostname that resolves to loopback, need it)
#   PYTHON         the interpreter [the active python when it imports the framework, else this checkout's .venv]
set -euo pipefail
source "$(dirname "$0")/common.sh"
shift
NNODES="${NNODES:-1}"
RDZV_TIMEOUT="${RDZV_TIMEOUT:-600}"
if [ "$NNODES" = 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  rdzv=(--standalone)
else
  endpoint="${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}"
  node_rank="${NODE_RANK:-${SLURM_NODEID:-0}}"
  # Node 0 hosts the rendezvous store (torchrun's own guess compares hostnames, which fails behind NAT or in
  # network namespaces).
  is_host=false; [ "$node_rank" = 0 ] && is_host=true
  rdzv=(--nnodes="$NNODES" --node_rank="$node_rank" --rdzv_backend=c10d --rdzv_endpoint="$endpoint"
        --rdzv_id="${RDZV_ID:-miaotui}"
        --rdzv_conf="join_timeout=$RDZV_TIMEOUT,read_timeout=$RDZV_TIMEOUT,is_host=$is_host"
        ${LOCAL_ADDR:+--local_addr="$LOCAL_ADDR"})
fi
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
if [ "$WHAT" != serve ]; then
  "$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc_per_node="$NPROC" --max-restarts="${MAX_RESTARTS:-0}" \
    -m "framework.$WHAT" "$@" 2> >(tee "$log" >&2)
  rc=$?
else
  # A server stops by draining (framework/infer/server/runtime.py): rank 0 closes the listener, finishes the
  # open requests and ends every rank, which exit 0. torchrun's agent would instead treat a SIGTERM or SIGINT
  # as a failure: SIGTERM every rank, SIGKILL them after 30 s, exit non-zero. So torchrun here ignores both
  # (a no-op handler, which its ranks do not inherit, and --signals-to-handle without them), tee ignores them
  # (a closed stderr would break the ranks' last lines), and this script forwards them to the ranks: rank 0
  # drains, the others wait for its STOP. A second signal a second or more later cuts the drain short.
  # (Slurm's scancel signals every process of the step itself; rank 0 counts signals that close as one.)
  launcher=("$PYTHON" -c 'import runpy, signal, sys
for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, lambda *_: None)
runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)')
  torch_dir="$(cd / && "$PYTHON" -c "import importlib.util as u; print(u.find_spec('torch').submodule_search_locations[0])")"
  if grep -q "signals-to-handle" "$torch_dir/distributed/run.py" 2>/dev/null; then
    launcher+=(--signals-to-handle=SIGHUP,SIGQUIT)
  else  # an older torch handles SIGTERM and SIGINT itself: keep them from reaching it (a session of its own)
    launcher=(setsid "${launcher[@]}")
  fi
  "${launcher[@]}" "${rdzv[@]}" --nproc_per_node="$NPROC" --max-restarts="${MAX_RESTARTS:-0}" \
    -m "framework.$WHAT" "$@" 2> >(trap '' TERM INT; exec tee "$log" >&2) &
  agent=$!
  forward() {  # $1: the signal; to the ranks (torchrun's children), or to torchrun before they exist
    local ranks
    ranks="$(ps -o pid= --ppid "$agent" 2>/dev/null | tr -s ' \n' ' ')"
    if [ -n "${ranks// /}" ]; then kill -s "$1" $ranks 2>/dev/null; else kill -s HUP "$agent" 2>/dev/null; fi
  }
  trap 'forward TERM' TERM
  trap 'forward INT' INT
  while kill -0 "$agent" 2>/dev/null; do
    wait "$agent"  # returns early (> 128) when a trapped signal arrives
  done
  wait "$agent"
  rc=$?
  trap - TERM INT
fi
wait
set -e
if [ $rc -ne 0 ] && grep -q "Rendezvous\(Timeout\|Connection\|Closed\)Error\|RendezvousError" "$log"; then
  echo "error: the rendezvous at ${endpoint:-localhost} did not complete within ${RDZV_TIMEOUT}s: start all $NNODES nodes" \
       "with the same MASTER_ADDR, MASTER_PORT and RDZV_ID, and check that every node reaches $endpoint" >&2
fi
exit $rc
