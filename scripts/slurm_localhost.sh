#!/usr/bin/env bash
# A one-node Slurm cluster on localhost, for tests of `--launcher slurm` against a real srun.
#   scripts/slurm_localhost.sh start   # installs Debian's slurm-wlm parts if missing, starts daemons
#   scripts/slurm_localhost.sh stop    # stops what start started (by PID)
# Needs root (as CI and the dev machines run). No init system, no cgroups: daemons are started
# by hand, process tracking by /proc, daemons bound to loopback only.
set -euo pipefail
STATE=/run/tokentrain-slurm
CPUS=$(nproc)
HOST=$(hostname -s)

start() {
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v srun >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  fi
  mkdir -p "$STATE" /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/lib/munge /var/log/munge /etc/munge
  chmod 755 /run/munge  # munge refuses a socket dir other users can't traverse
  [[ -s /etc/munge/munge.key ]] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
  chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  chown -R slurm:slurm /var/spool/slurmctld /var/log/slurm 2>/dev/null || true
  cat > /etc/slurm/slurm.conf <<CONF
ClusterName=tokentrain
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
EnforcePartLimits=ALL
KillOnBadExit=1
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
  if ! pgrep -x munged >/dev/null; then
    munged --force 2>/dev/null || su -s /bin/sh munge -c "munged --force"
  fi
  pgrep -x slurmctld >/dev/null || slurmctld
  pgrep -x slurmd >/dev/null || slurmd
  for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then echo "slurm up on $HOST"; return 0; fi
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    sleep 0.5
  done
  echo "slurm did not come up; see /var/log/slurm" >&2
  tail -5 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
  return 1
}

stop() {
  for f in "$STATE"/slurmd.pid "$STATE"/slurmctld.pid; do
    [[ -f $f ]] && kill "$(cat "$f")" 2>/dev/null || true
  done
}

"${1:-start}"
