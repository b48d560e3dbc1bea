#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, to rehearse launches before a real cluster.
#
#   slurm/local-cluster.sh up       install slurm-wlm + munge (Debian/Ubuntu, as root), start, wait for the node
#   slurm/local-cluster.sh down     cancel jobs and stop the daemons
#   slurm/local-cluster.sh status
#   eval "$(slurm/local-cluster.sh env)"   puts an `sacct` stand-in on PATH (there is no accounting daemon;
#                                          submitit needs sacct to notice jobs that died)
set -euo pipefail

STATE=${LLMKIT_SLURM_DIR:-/tmp/llmkit-slurm}
CONF=/etc/slurm/slurm.conf
NODE=$(hostname -s)

say() { echo "[local-cluster] $*" >&2; }
running() { pgrep -x "$1" >/dev/null; }

install() {
  local need=()
  for pkg in munge slurmctld slurmd slurm-client; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  [ ${#need[@]} -eq 0 ] && return
  say "installing ${need[*]}"
  # keep the packages' own init scripts from starting daemons: this script starts them
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >"$STATE/apt.log" 2>&1 ||
    { apt-get update -q >>"$STATE/apt.log" 2>&1 &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >>"$STATE/apt.log" 2>&1; }
  rm -f /usr/sbin/policy-rc.d
}

configure() {
  local cpus mem
  cpus=$(nproc)
  mem=$(slurmd -C | grep -o 'RealMemory=[0-9]*' | cut -d= -f2)
  mkdir -p /etc/slurm
  cat >"$CONF" <<CONF
ClusterName=llmkit-local
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
KillWait=5
MinJobAge=3600
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

sacct_stand_in() {
  # `sacct -j ID -o JobID,State,... --parsable2` answered from `scontrol show job -o`
  cat >"$STATE/bin/sacct" <<'SACCT'
#!/usr/bin/env bash
fields=JobID,State; ids=()
while [ $# -gt 0 ]; do
  case "$1" in
    -o|--format) fields=$2; shift 2;; --format=*) fields=${1#*=}; shift;;
    -j|--jobs) ids+=(${2//,/ }); shift 2;; --jobs=*) v=${1#*=}; ids+=(${v//,/ }); shift;;
    *) shift;;
  esac
done
echo "${fields//,/|}"
for id in "${ids[@]}"; do
  line=$(scontrol show job -o "${id%%.*}" 2>/dev/null) || continue
  out=()
  for f in ${fields//,/ }; do
    case "${f,,}" in
      jobid) out+=("$id");;
      state) out+=("$(grep -o 'JobState=[A-Z_]*' <<<"$line" | cut -d= -f2)");;
      nodelist) out+=("$(grep -o ' NodeList=[^ ]*' <<<"$line" | cut -d= -f2)");;
      exitcode) out+=("$(grep -o ' ExitCode=[^ ]*' <<<"$line" | cut -d= -f2)");;
      *) out+=("");;
    esac
  done
  (IFS='|'; echo "${out[*]}")
done
SACCT
  chmod +x "$STATE/bin/sacct"
}

up() {
  [ "$(id -u)" = 0 ] || { say "run as root"; exit 1; }
  mkdir -p "$STATE"/{state,spool,bin}
  install
  configure
  sacct_stand_in
  [ -s /etc/munge/munge.key ] || mungekey -c -f -k /etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge && chown munge:munge /run/munge
  running munged || runuser -u munge -- /usr/sbin/munged
  running slurmctld || /usr/sbin/slurmctld
  running slurmd || /usr/sbin/slurmd
  for _ in $(seq 150); do
    case "$(sinfo -h -N -o %T 2>/dev/null | head -1)" in
      idle|mixed|allocated) say "up: node $NODE idle"; return 0;;
      down*|drain*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true;;
    esac
    sleep 0.2
  done
  say "node did not become idle; see $STATE/*.log"; exit 1
}

down() {
  scancel --user="$(id -un)" 2>/dev/null || true
  for daemon in slurmd slurmctld; do pkill -x "$daemon" 2>/dev/null || true; done
  say "down"
}

case "${1:-}" in
  up) up;;
  down) down;;
  status) sinfo; squeue;;
  env) echo "export PATH=$STATE/bin:\$PATH";;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2;;
esac
