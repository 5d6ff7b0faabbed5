#!/usr/bin/env bash
# A one-node Slurm 22.05 cluster on localhost for tests and CI: munged, MariaDB, slurmdbd, slurmctld,
# slurmd, all state under one folder, every daemon started by this script and stopped by its PID.
#
#   slurm/local_cluster/start.sh [STATE_DIR]     # default: $FASTSSL_SLURM_HOME or /tmp/fastssl-slurm
#   export SLURM_CONF=STATE_DIR/etc/slurm.conf   # then sbatch/squeue/sacct/submitit talk to it
#   slurm/local_cluster/stop.sh [STATE_DIR]
#
# Idempotent: a second start with the daemons alive only checks that the node answers. Needs root
# (apt installs the packages when missing; the daemons run as root, as in a container).
# Partitions: `low` (default) and `high`; a job in `high` preempts `low` jobs, which get USR2 first.
set -euo pipefail
state=$(realpath -m "${1:-${FASTSSL_SLURM_HOME:-/tmp/fastssl-slurm}}")
ctld_port=${FASTSSL_SLURM_PORT:-16817}  # not 6817: leave a real cluster's ports alone
slurmd_port=$((ctld_port + 1)) dbd_port=$((ctld_port + 2)) db_port=$((ctld_port + 3))
cluster=fastssl
node=$(hostname -s)
log() { echo "local_cluster: $*" >&2; }
die() { log "$*"; exit 1; }

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
wait_for() {  # wait_for SECONDS WHAT CMD...: poll CMD until it succeeds
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "$what did not come up; see $state/log"
    sleep 0.2
  done
}

export SLURM_CONF=$state/etc/slurm.conf
pids=(munged mariadbd slurmdbd slurmctld slurmd)
all_alive=1
for p in "${pids[@]}"; do alive "$state/run/$p.pid" || all_alive=0; done
if ((all_alive)) && scontrol ping >/dev/null 2>&1; then
  echo "export SLURM_CONF=$SLURM_CONF"
  exit 0
fi
for p in "${pids[@]}"; do
  alive "$state/run/$p.pid" && die "$p is running but the cluster does not answer: run stop.sh $state first"
done

# ---- packages ------------------------------------------------------------------------------------
pkgs=(slurm-wlm slurmdbd munge mariadb-server)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  [[ $(id -u) -eq 0 ]] || die "missing packages ${missing[*]}: run as root or apt-get install them"
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 || die "apt-get install ${missing[*]} failed"
fi
[[ $(id -u) -eq 0 ]] || die "the daemons run as root: run as root"

# ---- folders -------------------------------------------------------------------------------------
mkdir -p "$state"/{etc,run,log,munge,spool/ctld,spool/d,mysql}
chmod 0711 "$state" "$state/munge"  # munged refuses a socket folder without o+x
munge_socket=$state/munge/munge.socket.2

# ---- munge ---------------------------------------------------------------------------------------
[[ -f $state/munge/munge.key ]] || mungekey --create --keyfile="$state/munge/munge.key"
chmod 0400 "$state/munge/munge.key"
munged --force --socket="$munge_socket" --key-file="$state/munge/munge.key" \
  --pid-file="$state/run/munged.pid" --log-file="$state/log/munged.log" --seed-file="$state/munge/munged.seed"
wait_for 10 munged test -S "$munge_socket"

# ---- MariaDB (TCP on 127.0.0.1 only; slurmdbd cannot be told a socket path) ----------------------
db_sock=$state/run/mysqld.sock
if [[ ! -d $state/mysql/mysql ]]; then
  mariadb-install-db --no-defaults --datadir="$state/mysql" --user=root --auth-root-authentication-method=socket \
    --skip-test-db >"$state/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed; see $state/log"
fi
# slurmdbd's schema needs a buffer pool >= 512M and a long lock wait, or it warns and stalls.
setsid mariadbd --no-defaults --datadir="$state/mysql" --socket="$db_sock" --port="$db_port" \
  --bind-address=127.0.0.1 --pid-file="$state/run/mariadbd.pid" --user=root \
  --innodb-buffer-pool-size=512M --innodb-lock-wait-timeout=900 --log-error="$state/log/mariadb.log" \
  </dev/null >/dev/null 2>&1 &
wait_for 60 mariadbd mariadb --no-defaults -S "$db_sock" -u root -e "select 1"
mariadb --no-defaults -S "$db_sock" -u root <<SQL
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL

# ---- slurmdbd ------------------------------------------------------------------------------------
cat >"$state/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$munge_socket
DbdHost=localhost
DbdPort=$dbd_port
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=$state/run/slurmdbd.pid
LogFile=$state/log/slurmdbd.log
EOF
chmod 0600 "$state/etc/slurmdbd.conf"  # slurmdbd refuses a readable one (it holds a password)

# ---- slurm.conf ----------------------------------------------------------------------------------
cat >"$SLURM_CONF" <<EOF
ClusterName=$cluster
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire=10: a requeued job may start again after 10 s instead of ~145 s
AuthInfo=socket=$munge_socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$state/spool/ctld
SlurmdSpoolDir=$state/spool/d
SlurmctldPidFile=$state/run/slurmctld.pid
SlurmdPidFile=$state/run/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
KillWait=5
InactiveLimit=0
MinJobAge=300
JobAcctGatherType=jobacct_gather/none
# submitit reads job states through sacct: accounting must run, or states stay UNKNOWN
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$dbd_port
# slurmctld ignores AuthInfo's socket for its connection to slurmdbd; this is where it looks
AccountingStoragePass=$munge_socket
# preemption: a job in 'high' requeues 'low' jobs, which get their --signal (USR2) first
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
# a 2-core machine stands in for a node with 16 CPUs
SlurmdParameters=config_overrides
NodeName=$node NodeAddr=127.0.0.1 CPUs=16 RealMemory=64000 State=UNKNOWN
PartitionName=low Nodes=$node Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName=high Nodes=$node MaxTime=INFINITE State=UP PriorityTier=10
EOF

slurmdbd
wait_for 30 slurmdbd sacctmgr -n show cluster
# the cluster must exist in the database before slurmctld registers with it
sacctmgr -n -P show cluster format=cluster | grep -qx "$cluster" || sacctmgr -i add cluster "$cluster" >/dev/null

slurmctld
wait_for 30 slurmctld scontrol ping
slurmd -N "$node"
wait_for 30 "node $node" bash -c "sinfo -h -N -n '$node' -o %T | grep -Eq '^(idle|mixed|allocated)'"
log "up: $state (slurmctld on port $ctld_port)"
echo "export SLURM_CONF=$SLURM_CONF"
