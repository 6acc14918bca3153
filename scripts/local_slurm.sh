#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the Slurm tests (pytest -m slurm) and for trying
# `hydra/launcher=submitit_slurm` without a cluster. Needs root (apt-get, daemons).
#
#   bash scripts/local_slurm.sh start    install munge + slurmctld + slurmd (Debian), write
#                                        /etc/slurm/slurm.conf, start the daemons, wait for an idle node
#   bash scripts/local_slurm.sh stop     stop the daemons (the packages stay)
#   bash scripts/local_slurm.sh status   sinfo
#
# The node is this host (127.0.0.1) with all its CPUs and its memory less 1 GiB, in one partition
# `debug`; jobs are placed per core (cons_tres), so two one-CPU jobs run side by side on 2 cores.
# No cgroups and no accounting: processes are tracked by their parent (proctrack/linuxproc).
set -euo pipefail

CONF=/etc/slurm/slurm.conf
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
     && command -v sbatch >/dev/null; then
    return
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq munge slurmctld slurmd slurm-client >/dev/null
}

write_config() {
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 1024 ))
  if [ -s "$CONF" ] && ! grep -q "Written by scripts/local_slurm.sh" "$CONF"; then
    echo "local Slurm cluster: $CONF belongs to another Slurm setup; not touching it" >&2
    exit 1
  fi
  mkdir -p /etc/slurm "$STATE" "$SPOOL" "$LOGS"
  cat > "$CONF" <<EOF
# Written by scripts/local_slurm.sh: a one-node cluster on $host.
ClusterName=condense-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=300
SlurmdTimeout=60
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  if pgrep -x munged >/dev/null; then
    return
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile /etc/munge/munge.key
  fi
  chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  chmod 0700 /etc/munge
  chmod 0400 /etc/munge/munge.key
  if id munge >/dev/null 2>&1; then
    su -s /bin/sh munge -c "/usr/sbin/munged"
  else
    /usr/sbin/munged --force
  fi
}

wait_idle() {
  local state=""
  for _ in $(seq 1 60); do
    state=$(sinfo -h -o %T 2>/dev/null | head -n 1 || true)
    if [ "$state" = "idle" ] || [ "$state" = "mixed" ]; then
      echo "local Slurm cluster: node $(hostname -s) is $state (partition debug, $(nproc) CPUs)"
      return 0
    fi
    sleep 1
  done
  echo "local Slurm cluster: the node did not become idle (state: '${state:-unknown}'); see $LOGS" >&2
  return 1
}

start() {
  install_packages
  write_config
  start_munge
  pgrep -x slurmctld >/dev/null || slurmctld
  pgrep -x slurmd >/dev/null || slurmd
  wait_idle || { scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true; wait_idle; }
}

stop() {
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  pkill -x munged 2>/dev/null || true
  echo "local Slurm cluster: stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) sinfo ;;
  *) echo "usage: bash scripts/local_slurm.sh start|stop|status" >&2; exit 2 ;;
esac
