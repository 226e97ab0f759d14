#!/usr/bin/env bash
# A single-node SLURM on this machine, for tests/test_slurm.py: installs slurmctld, slurmd and
# munge from the system's package registry when they are missing (root only), writes a minimal
# slurm.conf for this host (no cgroups: proctrack/linuxproc, task/none), starts munged, slurmctld
# and slurmd, and waits until the node is idle. Prints "up" on success; exits non-zero with the
# reason otherwise. tests/cluster/slurm_down.sh stops it.
set -euo pipefail
[ "$(id -u)" -eq 0 ] || { echo "needs root" >&2; exit 3; }
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    install() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            slurmctld slurmd slurm-client munge >/dev/null 2>&1
    }
    # a new machine's package lists may be empty or old: read them once, then try again
    install || { apt-get update >/dev/null 2>&1 && install; } || { echo "cannot install SLURM (apt)" >&2; exit 3; }
fi
host=$(hostname -s)
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/lib/munge /var/log/munge
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=pdmtest
SlurmctldHost=${host}
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
MinJobAge=300
KillWait=10
InactiveLimit=0
JobRequeue=1
NodeName=${host} CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c "/usr/sbin/munged" || { echo "munged did not start" >&2; exit 3; }
pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
for _ in $(seq 1 60); do
    state=$(sinfo -h -N -o %t 2>/dev/null | head -1 || true)
    case "$state" in
        idle|mix|alloc) echo up; exit 0 ;;
        down*|drain*) scontrol update nodename="${host}" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 1
done
echo "the node did not come up (sinfo: ${state:-nothing}); see /var/log/slurm" >&2
exit 3
