#!/usr/bin/env bash
# Start training (or pipeline inference) with the deepspeed launcher, on one node or on the hosts of a hostfile.
#
#   launch/deepspeed.sh train experiment=llama3_8b                     # one node: every GPU (NPROC on CPU)
#   HOSTFILE=hostfile launch/deepspeed.sh train experiment=llama3_8b   # several nodes, reached over ssh (pdsh)
#
# The hostfile has one line per node, "<host> slots=<processes>" (DeepSpeed's format); the first host is the
# rendezvous master unless MASTER_ADDR says otherwise. Before launching, every host is checked: its name must
# resolve and its ssh port answer within CONNECT_TIMEOUT seconds, else one line names the host and the fix.
#
# Environment (defaults in brackets): HOSTFILE [none: one node], NPROC [the GPUs visible, else 2],
# MASTER_ADDR [the first host], MASTER_PORT [29500], CONNECT_TIMEOUT [10], SSH_PORT [22],
# DS_LAUNCHER [pdsh] (deepspeed's --launcher: pdsh, openmpi, mvapich, slurm), PYTHON [.venv/bin/python].
set -euo pipefail
source "$(dirname "$0")/common.sh"
shift
DEEPSPEED="$(dirname "$PYTHON")/deepspeed"
if [ -z "${HOSTFILE:-}" ]; then
  exec "$DEEPSPEED" --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" "$REPO/framework/$WHAT.py" "$@"
fi

if [ ! -f "$HOSTFILE" ]; then
  echo "error: HOSTFILE=$HOSTFILE not found: write one line per node, '<host> slots=<processes>'" >&2
  exit 2
fi
hosts=()
while read -r host rest; do
  case "$host" in ''|'#'*) continue ;; esac
  if ! [[ "$rest" =~ slots=[0-9]+ ]]; then
    echo "error: $HOSTFILE: line '$host $rest' lacks slots=N: write '<host> slots=<processes>'" >&2
    exit 2
  fi
  hosts+=("$host")
done < "$HOSTFILE"
if [ ${#hosts[@]} -eq 0 ]; then
  echo "error: $HOSTFILE names no host: write one line per node, '<host> slots=<processes>'" >&2
  exit 2
fi
timeout_s="${CONNECT_TIMEOUT:-10}"
for host in "${hosts[@]}"; do
  if ! getent hosts "$host" >/dev/null 2>&1 && ! [[ "$host" =~ ^[0-9.]+$ ]]; then
    echo "error: host '$host' in $HOSTFILE does not resolve: fix the name or add it to /etc/hosts" >&2
    exit 2
  fi
  if ! timeout "$timeout_s" bash -c "exec 3<>/dev/tcp/$host/${SSH_PORT:-22}" 2>/dev/null; then
    echo "error: host '$host' in $HOSTFILE is unreachable (no answer on ssh port ${SSH_PORT:-22} within ${timeout_s}s):" \
         "fix the hostfile or the network, or raise CONNECT_TIMEOUT" >&2
    exit 2
  fi
done
exec "$DEEPSPEED" --hostfile "$HOSTFILE" --launcher "${DS_LAUNCHER:-pdsh}" \
  --master_addr "${MASTER_ADDR:-${hosts[0]}}" --master_port "${MASTER_PORT:-29500}" "$REPO/framework/$WHAT.py" "$@"
