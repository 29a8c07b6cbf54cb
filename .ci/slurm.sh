#!/usr/bin/env bash
# A real single-node Slurm cluster for the SLURM tests (Debian slurm-wlm + munge; the settings below worked).
#   bash .ci/slurm.sh up     install slurm-wlm + munge if missing, start munged, slurmctld, slurmd; wait for idle
#   bash .ci/slurm.sh down   cancel leftover jobs, stop exactly the daemons `up` started (by pid, never by name)
# State, spool, logs and pid files live in $SLURM_SCRATCH (default /tmp/ci-slurm). Needs root (CI runs as root).
set -euo pipefail
SCRATCH=${SLURM_SCRATCH:-/tmp/ci-slurm}
CONF=/etc/slurm/slurm.conf

up() {
  if [ -s "$SCRATCH/slurmctld.pid" ] && kill -0 "$(cat "$SCRATCH/slurmctld.pid")" 2>/dev/null; then
    echo "slurm: already up"; return
  fi
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
  fi
  mkdir -p "$SCRATCH"/{state,spool,log} /etc/slurm /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  fi
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    cp /run/munge/munged.pid "$SCRATCH/munged.pid"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  fi
  local node
  node=$(slurmd -C | head -1)  # NodeName=<host> CPUs=... RealMemory=...
  local host=${node#NodeName=}; host=${host%% *}
  cat > "$CONF" <<EOF
ClusterName=ci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job waits cred_expire + 1 s before it may start again (default 120 -> 122 s)
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
# task/affinity binds each task to its CPUs, as production clusters do (tests check srun passes --cpus-per-task)
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
InactiveLimit=0
SchedulerParameters=sched_interval=2,bf_interval=2
StateSaveLocation=$SCRATCH/state
SlurmdSpoolDir=$SCRATCH/spool
SlurmctldPidFile=$SCRATCH/slurmctld.pid
SlurmdPidFile=$SCRATCH/slurmd.pid
SlurmctldLogFile=$SCRATCH/log/slurmctld.log
SlurmdLogFile=$SCRATCH/log/slurmd.log
$node State=UNKNOWN
PartitionName=ci Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  slurmctld -c   # -c: a clean start, no old job state
  for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
  slurmd
  for _ in $(seq 200); do [ "$(sinfo -h -o %T 2>/dev/null)" = idle ] && break; sleep 0.1; done
  [ "$(sinfo -h -o %T)" = idle ] || { echo "slurm: node not idle: $(sinfo -h -o '%T %E')" >&2; exit 1; }
  echo "slurm: cluster up ($host, $(sinfo -h -o %c) CPUs)"
}

down() {
  scancel --full --quiet -u root 2>/dev/null || true
  for pidfile in "$SCRATCH/slurmd.pid" "$SCRATCH/slurmctld.pid" "$SCRATCH/munged.pid"; do
    [ -s "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    rm -f "$pidfile"
  done
  echo "slurm: cluster down"
}

"$@"
