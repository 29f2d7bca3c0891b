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
# DS_LAUNCHER [pdsh] (deepspeed's --launcher: pdsh, openmpi, mvapich, slurm), PYTHON [the active python when it
# imports the framework, else this checkout's .venv].
set -euo pipefail
source "$(dirname "$0")/common.sh"
shift
DEEPSPEED=("$PYTHON" -m deepspeed.launcher.runner)
if [ -z "${HOSTFILE:-}" ]; then
  exec "${DEEPSPEED[@]}" --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" "$REPO/framework/$WHAT.py" "$@"
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
launcher="${DS_LAUNCHER:-pdsh}"
ds_args=()
if [ "$launcher" = pdsh ]; then
  if ! command -v pdsh >/dev/null; then
    echo "error: the pdsh launcher needs pdsh on this node: install it (apt-get install pdsh) or set DS_LAUNCHER" >&2
    exit 2
  fi
  # Log in the way pdsh will (PDSH_SSH_ARGS_APPEND carries keys and options): DeepSpeed's own check uses plain ssh.
  read -r -a ssh_opts <<< "${PDSH_SSH_ARGS_APPEND:-}"
  for host in "${hosts[@]}"; do
    if ! ssh -o BatchMode=yes -o ConnectTimeout="$timeout_s" -p "${SSH_PORT:-22}" "${ssh_opts[@]}" "$host" true \
         </dev/null >/dev/null 2>&1; then
      echo "error: host '$host' in $HOSTFILE refuses a passwordless ssh login: install a key for this user" \
           "(ssh-copy-id $host) or pass ssh options in PDSH_SSH_ARGS_APPEND" >&2
      exit 2
    fi
  done
  ds_args+=(--no_ssh_check)
fi
# DeepSpeed forwards only PYTHON*, NCCL*, UCX*, MV2* variables to the other nodes, plus the lines of
# ~/.deepspeed_env and ./.deepspeed_env: hand it those files and the settings a run needs on every node.
envfile="$(mktemp)"
trap 'rm -f "$envfile"' EXIT
for f in "$HOME/.deepspeed_env" ./.deepspeed_env; do
  if [ -f "$f" ]; then grep '=' "$f" >> "$envfile" || true; fi
done
for var in OMP_NUM_THREADS TOKENIZERS_PARALLELISM GLOO_SOCKET_IFNAME HF_HOME HF_HUB_OFFLINE HF_DATASETS_OFFLINE \
           WANDB_MODE WANDB_API_KEY DS_ACCELERATOR MIAOTUI_FAULT; do
  [ -n "${!var:-}" ] && echo "$var=${!var}" >> "$envfile"
done
set +e
DS_ENV_FILE="$envfile" "${DEEPSPEED[@]}" --hostfile "$HOSTFILE" --launcher "$launcher" "${ds_args[@]}" \
  --master_addr "${MASTER_ADDR:-${hosts[0]}}" --master_port "${MASTER_PORT:-29500}" "$REPO/framework/$WHAT.py" "$@"
exit $?
