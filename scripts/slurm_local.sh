#!/usr/bin/env bash
# A real Slurm cluster on this one machine, for tests and for trying the launcher:
#   slurmctld + two slurmd "nodes" (n1, n2) + slurmdbd on MariaDB (so sacct works) + munge.
#
#   scripts/slurm_local.sh up       install (apt) if needed, write configs, start what is not running; idempotent
#   scripts/slurm_local.sh down     stop every daemon this script started (by pid file)
#   scripts/slurm_local.sh status   daemons, sinfo
#   scripts/slurm_local.sh env      print `export SLURM_CONF=...` for a shell
#
# All state (configs, spool, job state, database, logs, pid files) lives under $SLURM_LOCAL_DIR
# (default /tmp/slurm-local). Needs root (daemons, /etc/hosts, apt-get). Nothing is killed by name.
set -euo pipefail

STATE="${SLURM_LOCAL_DIR:-/tmp/slurm-local}"
CONF="$STATE/etc/slurm.conf"
DBD_CONF="$STATE/etc/slurmdbd.conf"
NODES=(n1 n2)
PORTS=(17001 17002)
CLUSTER=local
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
export SLURM_CONF="$CONF"

log() { echo "[slurm_local] $*" >&2; }
die() {
  log "error: $*"
  exit 1
}

pid_alive() { # pid_alive FILE: the pid in FILE is a live process
  [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local secs=$1 what=$2
  shift 2
  for ((i = 0; i < secs * 5; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  die "$what did not come up within ${secs}s (logs under $STATE/log)"
}

install_packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return 0
  command -v apt-get >/dev/null || die "apt-get not found; install ${missing[*]} by hand"
  log "installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

write_configs() {
  mkdir -p "$STATE"/{etc,state,log,run,mysql}
  for n in "${NODES[@]}"; do mkdir -p "$STATE/spool/$n"; done
  local host mem cpus
  host="$(hostname -s)"
  cpus="$(nproc)"
  # leave room for the OS; slurmd refuses a node that claims more memory than it has
  mem="$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)"
  cat >"$CONF" <<EOF
# Written by scripts/slurm_local.sh: a test cluster on one machine.
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmctldPort=6817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# requeued jobs otherwise wait for the credential to expire (~120 s) before they restart
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
SchedulerParameters=bf_interval=5,sched_interval=5
KillWait=5
ReturnToService=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
NodeName=n[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=[${PORTS[0]}-${PORTS[1]}] CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$DBD_CONF" <<EOF
# Written by scripts/slurm_local.sh
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DBD_CONF"
  # client commands (sbatch, squeue, sacct, submitit) find the cluster without SLURM_CONF
  mkdir -p /etc/slurm
  if [[ ! -e /etc/slurm/slurm.conf || -L /etc/slurm/slurm.conf ]]; then
    ln -sfn "$CONF" /etc/slurm/slurm.conf
  fi
  # submitit uses the first node name as the rendezvous address: the names must resolve
  if ! grep -qE '^127\.0\.0\.1[[:space:]]+n1 n2([[:space:]]|$)' /etc/hosts; then
    echo "127.0.0.1 n1 n2 # slurm_local" >>/etc/hosts
  fi
}

start_munge() {
  if pid_alive "$STATE/run/munged.pid" && munge -n </dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 0400 /etc/munge/munge.key
  # munged runs as the munge user, which owns the key; --force tolerates a stale socket
  mkdir -p "$STATE/munge"
  chown munge:munge "$STATE/munge" 2>/dev/null || true
  runuser -u munge -- munged --force --pid-file=/run/munge/munged.pid --log-file="$STATE/munge/munged.log" ||
    munged --force --pid-file=/run/munge/munged.pid --log-file="$STATE/munge/munged.log"
  wait_for 20 munged test -s /run/munge/munged.pid
  cp /run/munge/munged.pid "$STATE/run/munged.pid"
  wait_for 20 "munge round trip" bash -c 'munge -n </dev/null | unmunge'
}

start_mariadb() {
  if pid_alive "$STATE/run/mariadb.pid"; then return 0; fi
  if [[ ! -d "$STATE/mysql/mysql" ]]; then
    mariadb-install-db --user=root --datadir="$STATE/mysql" --auth-root-authentication-method=socket \
      >"$STATE/log/mariadb-install.log" 2>&1
  fi
  mkdir -p /run/mysqld
  # the default socket path, so slurmdbd connects as root through unix_socket auth; no TCP listener
  (
    setsid mariadbd --user=root --datadir="$STATE/mysql" --socket=/run/mysqld/mysqld.sock --skip-networking \
      --pid-file="$STATE/run/mariadb.pid" --log-error="$STATE/log/mariadb.log" </dev/null >/dev/null 2>&1 &
  )
  wait_for 60 mariadb mariadb --socket=/run/mysqld/mysqld.sock -e 'select 1'
}

start_slurmdbd() {
  if pid_alive "$STATE/run/slurmdbd.pid"; then return 0; fi
  # slurmdbd reads slurmdbd.conf from the folder of $SLURM_CONF
  slurmdbd
  wait_for 30 slurmdbd sacctmgr -n list cluster
  sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
}

start_slurmctld() {
  if pid_alive "$STATE/run/slurmctld.pid"; then return 0; fi
  slurmctld -f "$CONF"
  wait_for 30 slurmctld scontrol ping
}

start_slurmd() {
  for n in "${NODES[@]}"; do
    if pid_alive "$STATE/run/slurmd-$n.pid"; then continue; fi
    slurmd -f "$CONF" -N "$n"
  done
  # both nodes registered and usable
  wait_for 60 "slurmd n1 n2" bash -c '[[ "$(sinfo -h -N -o "%N %t" | grep -cE " (idle|mix|alloc)$")" == 2 ]]'
}

up() {
  [[ "$(id -u)" == 0 ]] || die "needs root (daemons, /etc/hosts, apt-get)"
  install_packages
  write_configs
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurmctld
  start_slurmd
  # a node left DOWN/DRAIN by an earlier crash comes back
  scontrol update nodename=n[1-2] state=resume >/dev/null 2>&1 || true
  log "up: $(sinfo -h -o '%P %D %t' | tr '\n' ' ')(state in $STATE; SLURM_CONF=$CONF)"
}

stop_pidfile() { # stop_pidfile FILE NAME
  local file=$1 name=$2 pid
  pid_alive "$file" || return 0
  pid="$(cat "$file")"
  kill "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "$name ($pid) ignored SIGTERM; SIGKILL"
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

down() {
  for n in "${NODES[@]}"; do stop_pidfile "$STATE/run/slurmd-$n.pid" "slurmd $n"; done
  stop_pidfile "$STATE/run/slurmctld.pid" slurmctld
  stop_pidfile "$STATE/run/slurmdbd.pid" slurmdbd
  stop_pidfile "$STATE/run/mariadb.pid" mariadb
  stop_pidfile "$STATE/run/munged.pid" munged
  log "down (state kept in $STATE)"
}

status() {
  for f in "$STATE"/run/*.pid; do
    [[ -e "$f" ]] || continue
    if pid_alive "$f"; then echo "$(basename "$f" .pid): running ($(cat "$f"))"; else echo "$(basename "$f" .pid): dead"; fi
  done
  sinfo 2>/dev/null || echo "sinfo: controller not reachable"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *)
    echo "usage: $0 up|down|status|env" >&2
    exit 2
    ;;
esac
