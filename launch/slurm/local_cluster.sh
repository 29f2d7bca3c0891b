#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, as root and without systemd: for trying the sbatch template and the
# submitit launcher, and for the tests. Installs Debian's slurmctld, slurmd, munge and slurm-client when missing.
#
#   sudo launch/slurm/local_cluster.sh start     # (re)starts a fresh cluster; prints the partition when ready
#   sudo launch/slurm/local_cluster.sh stop
set -euo pipefail
action="${1:-start}"
if [ "$(id -u)" != 0 ]; then
  echo "error: a local Slurm cluster needs root (munged, slurmctld and slurmd run as root here)" >&2
  exit 2
fi
if [ "$action" = stop ]; then
  for daemon in slurmd slurmctld munged; do
    pkill -x "$daemon" 2>/dev/null || true
    for _ in $(seq 20); do pgrep -x "$daemon" >/dev/null || break; sleep 0.5; done
  done
  exit 0
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v sbatch >/dev/null; then
  echo "[slurm] installing slurmctld slurmd munge slurm-client" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null && apt-get install -y -qq slurmctld slurmd munge slurm-client >/dev/null
fi
host="$(hostname -s)"
# The node as slurmd sees it (sockets, cores, memory), so that the controller never finds it changed.
node_line="$(slurmd -C | head -n 1)"
"$0" stop
# A fresh cluster every start: no jobs or node states recovered from an earlier one.
rm -rf /var/spool/slurmctld /var/spool/slurmd
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /etc/munge
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=miaotui
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ReturnToService=2
JobRequeue=1
MpiDefault=none
SchedulerParameters=defer_batch,sched_interval=2
MinJobAge=600
AuthInfo=cred_expire=10
$node_line State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null
fi
chown -R root:root /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
munged --force
slurmctld
slurmd
for _ in $(seq 60); do
  state="$(sinfo -h -o "%t" 2>/dev/null || true)"
  if [ "$state" = idle ]; then
    sinfo
    exit 0
  fi
  case "$state" in down*|drain*) scontrol update nodename="$host" state=resume 2>/dev/null || true ;; esac
  sleep 1
done
echo "error: the local Slurm cluster did not come up in 60s: see /var/log/slurm/slurmctld.log and slurmd.log" >&2
exit 1
