#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost, for trying `mesh slurm` on a laptop or a
# container and for the project's tests.
#
#   slurm/local_cluster.sh up       install (Debian's slurm 22.05 + munge) when missing, write the
#                                   config, start munged, slurmctld and slurmd, wait for the node
#   slurm/local_cluster.sh down     cancel every job, stop the daemons
#   slurm/local_cluster.sh status   say what is running (exit 0 when the node takes jobs)
#
# Every command is idempotent: `up` on a running cluster only checks it. Needs root (the daemons
# run as root, munged as `munge`) and apt for the first install; no systemd, no cgroups.
#
# Environment: MESH_SLURM_STATE (state, spool, logs, pid files; default /tmp/mesh-slurm),
# MESH_SLURM_CRED_EXPIRE (seconds; also how long a requeued job waits, default 30),
# MESH_SLURM_TIMEOUT (seconds to wait for the node, default 60).
set -euo pipefail

STATE=${MESH_SLURM_STATE:-/tmp/mesh-slurm}
CRED_EXPIRE=${MESH_SLURM_CRED_EXPIRE:-30}
TIMEOUT=${MESH_SLURM_TIMEOUT:-60}
NODE=localhost          # `hostname` in a container rarely resolves; slurmd gets -N with this name
PARTITION=local
CONF=/etc/slurm/slurm.conf
PACKAGES="slurmctld slurmd slurm-client munge"

say() { echo "local_cluster: $*" >&2; }
fail() { say "error: $*"; exit 1; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
controller_up() { timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; }
node_state() { sinfo -h -n "$NODE" -o '%t' 2>/dev/null | sed -n 1p; }

install_packages() {
  local missing=0
  for tool in slurmctld slurmd sbatch munged; do command -v "$tool" >/dev/null || missing=1; done
  [ "$missing" = 0 ] && return 0
  command -v apt-get >/dev/null || fail "slurm is not installed and there is no apt-get; install $PACKAGES"
  say "installing $PACKAGES"
  export DEBIAN_FRONTEND=noninteractive
  # the package lists may be stale or absent on a fresh machine: update once and retry
  apt-get install -y -q --no-install-recommends $PACKAGES >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $PACKAGES >/dev/null; } \
    || fail "apt-get install $PACKAGES failed"
}

start_munge() {
  # munged refuses a key that others can read or that it does not own
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    mungekey --create --keyfile=/etc/munge/munge.key --force
  fi
  chown munge:munge /etc/munge /etc/munge/munge.key
  chmod 0700 /etc/munge
  chmod 0600 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge
  install -d -o munge -g munge -m 0711 /var/lib/munge
  munge_works && return 0
  # a killed munged leaves its pid file and socket behind, and a new one will not start over them
  if ! alive /run/munge/munged.pid; then
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  fi
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge_works && return 0; sleep 0.1; done
  fail "munged did not start (see /var/log/munge/munged.log)"
}

write_config() {
  # The node's geometry comes from slurmd itself, so slurmd never finds the config inconsistent.
  local hw get cpus sockets cores threads mem new
  hw=$(slurmd -C 2>/dev/null | sed -n 1p)
  get() { echo "$hw" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
  cpus=$(get CPUs); sockets=$(get SocketsPerBoard); cores=$(get CoresPerSocket)
  threads=$(get ThreadsPerCore); mem=$(( $(get RealMemory) * 9 / 10 ))
  mkdir -p /etc/slurm "$STATE/ctld" "$STATE/spool"
  new=$(mktemp)
  cat > "$new" <<CONF
# written by mesh-pretrain slurm/local_cluster.sh
ClusterName=mesh-local
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# how long a job credential lives; a requeued job may not start again before it expires
# (the default 120 s would make every requeue wait two minutes)
AuthInfo=cred_expire=$CRED_EXPIRE
MpiDefault=none
# no cgroups in a container: track processes through /proc, bind no tasks
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
# cores only: with memory as a resource, a job without --mem takes the whole node
SelectTypeParameters=CR_Core
ReturnToService=2
# seconds between SIGTERM and SIGKILL when a job is cancelled or runs out of time
KillWait=10
# there is no accounting database: finished jobs can be read (scontrol show job) this long
MinJobAge=3600
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$cpus Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
  if cmp -s "$new" "$CONF"; then rm -f "$new"; return 1; fi
  mv "$new" "$CONF"; chmod 0644 "$CONF"
  return 0
}

up() {
  [ "$(id -u)" = 0 ] || fail "needs root (it starts munged, slurmctld and slurmd)"
  install_packages
  start_munge
  local changed=0
  write_config && changed=1
  if alive "$STATE/slurmctld.pid"; then
    [ "$changed" = 1 ] && { say "config changed: scontrol reconfigure"; scontrol reconfigure || true; }
  else
    # a fresh controller starts with no jobs: state left by a killed cluster would replay old jobs
    rm -rf "$STATE/ctld"; mkdir -p "$STATE/ctld"
    /usr/sbin/slurmctld
  fi
  for _ in $(seq $(( TIMEOUT * 5 ))); do controller_up && break; sleep 0.2; done
  controller_up || { tail -20 "$STATE/slurmctld.log" >&2 || true; fail "slurmctld does not answer"; }
  if ! alive "$STATE/slurmd.pid"; then
    rm -rf "$STATE/spool"; mkdir -p "$STATE/spool"
    /usr/sbin/slurmd -N "$NODE"
  fi
  local state="" i
  for i in $(seq $(( TIMEOUT * 2 ))); do
    state=$(node_state || true)
    case "$state" in
      idle|mix|alloc|comp) break ;;
      down*|drain*|drng*|inval*|fail*)
        [ $(( i % 4 )) = 0 ] && scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.5
  done
  case "$state" in
    idle|mix|alloc|comp) ;;
    *) sinfo -R >&2 || true; tail -20 "$STATE/slurmd.log" >&2 || true
       fail "node $NODE is not ready (state '$state')" ;;
  esac
  echo "SLURM up: node $NODE ($state), partition $PARTITION, config $CONF, logs in $STATE"
}

stop_pid() {  # name pidfile
  local pid
  [ -f "$2" ] || return 0
  pid=$(cat "$2")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    say "$1 ($pid) stopped"
  fi
  rm -f "$2"
}

down() {
  if command -v scontrol >/dev/null && alive "$STATE/slurmctld.pid" && controller_up; then
    local jobs
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
      say "cancelling jobs $jobs"
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 40); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
    fi
  fi
  stop_pid slurmd "$STATE/slurmd.pid"
  stop_pid slurmctld "$STATE/slurmctld.pid"
  # slurmstepd outlives slurmd by design; on a machine running this cluster they are all its own
  for pid in $(pgrep -x slurmstepd 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
  stop_pid munged /run/munge/munged.pid
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  echo "SLURM down"
}

status() {
  command -v sbatch >/dev/null || { echo "SLURM not installed (run: $0 up)"; return 1; }
  local ok=0
  for d in munged:/run/munge/munged.pid slurmctld:"$STATE/slurmctld.pid" slurmd:"$STATE/slurmd.pid"; do
    if alive "${d#*:}"; then echo "${d%%:*} running (pid $(cat "${d#*:}"))"; else echo "${d%%:*} not running"; ok=1; fi
  done
  [ "$ok" = 0 ] && controller_up && echo "node $NODE: $(node_state)" && squeue && return 0
  return 1
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
