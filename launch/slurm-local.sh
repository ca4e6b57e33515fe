#!/usr/bin/env bash
# A real two-node Slurm cluster on this machine's loopback, for tests and first steps:
# slurmctld and two slurmd (node1, node2) on 127.0.0.1, each node with this machine's CPUs.
#   launch/slurm-local.sh up DIR     write DIR/slurm.conf, start the daemons (pid files in DIR)
#   launch/slurm-local.sh down DIR   stop exactly the daemons `up` started, by pid file
#   launch/slurm-local.sh env DIR    print the export line that points sbatch & co at it
#   SLURM_LOCAL_PORT  slurmctld's port (default: 16817 + a per-user offset; the nodes take the next two)
#   DRY_RUN           1 = write DIR/slurm.conf and print the commands, start nothing
# Needs Debian's slurmctld, slurmd and slurm-client (`.ci/run` installs them).
set -euo pipefail
cmd=${1:-}; dir=${2:-}
if [[ "$cmd" == -h || "$cmd" == --help ]]; then awk 'NR>1 && /^#/ {sub(/^# ?/, ""); print; next} NR>1 {exit}' "$0"; exit 0; fi
if [[ -z "$cmd" || -z "$dir" ]]; then echo "usage: launch/slurm-local.sh up|down|env DIR (--help)" >&2; exit 2; fi
mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
conf=$dir/slurm.conf
case "$cmd" in
  env) echo "export SLURM_CONF=$conf"; exit 0 ;;
  down)
    pids=()
    for f in "$dir"/*.pid; do [[ -f "$f" ]] && pids+=("$(cat "$f")"); done
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    done
    rm -f "$dir"/*.pid
    exit 0 ;;
  up) ;;
  *) echo "slurm-local.sh: unknown command $cmd (up, down, env)" >&2; exit 2 ;;
esac
for bin in slurmctld slurmd sbatch; do
  command -v "$bin" >/dev/null || [[ -x /usr/sbin/$bin ]] || { echo "slurm-local.sh: $bin not found: apt-get install slurmctld slurmd slurm-client" >&2; exit 1; }
done
PATH=$PATH:/usr/sbin
node=$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ *$//')
user=$(id -un)
port=${SLURM_LOCAL_PORT:-$((16817 + $(id -u) % 500 * 4))}
mkdir -p "$dir/state" "$dir/spool/node1" "$dir/spool/node2" "$dir/log"
cat >"$conf" <<CONF
ClusterName=distrain-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=$user
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=10
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerParameters=sched_interval=1
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
InactiveLimit=0
KillWait=10
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=node1 NodeAddr=127.0.0.1 NodeHostname=$(hostname) Port=$((port + 1)) $node
NodeName=node2 NodeAddr=127.0.0.1 NodeHostname=$(hostname) Port=$((port + 2)) $node
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF=$conf
echo "+ slurmctld -f $conf -i; slurmd -f $conf -N node1; slurmd -f $conf -N node2"
[[ "${DRY_RUN:-0}" == 1 ]] && exit 0
slurmctld -f "$conf" -i
for n in node1 node2; do slurmd -f "$conf" -N "$n"; done
for _ in $(seq 1 100); do
  if sinfo -h -o '%T' 2>/dev/null | grep -q idle && [[ $(sinfo -h -N -o '%T' | grep -c idle) -ge 2 ]]; then
    echo "slurm up: $(sinfo -h -N -o '%N %T' | paste -sd' ')  (export SLURM_CONF=$conf)"; exit 0
  fi
  sleep 0.2
done
echo "slurm-local.sh: the nodes did not come up; logs in $dir/log" >&2
tail -20 "$dir"/log/*.log >&2 || true
exit 1
