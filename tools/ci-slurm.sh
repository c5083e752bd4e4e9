#!/usr/bin/env bash
# CI: run deploy/slurm/distclip.sbatch, unchanged, on a real single-node Slurm cluster built
# from the distribution's packages (slurmctld, slurmd, munge), and check that the run finished:
# the job's exit status, the coordinator's verdict, one metrics row per planned step, and the
# final checkpoint.
#
#   tools/ci-slurm.sh PATH/TO/distclip
#
# Needs root (or sudo) for the packages, munged and slurmd. The cluster lives in a temporary
# directory (its own slurm.conf through SLURM_CONF) and is stopped on exit. The node declares
# 8 GPUs backed by /dev/null-like device files, because the batch script asks for one GPU per
# task; the workers train on the CPU (DISTCLIP_DEVICE=flex).
set -euo pipefail
cd "$(dirname "$0")/.."

bin=$(realpath "${1:?usage: tools/ci-slurm.sh PATH/TO/distclip}")
sudo=()
if [[ $(id -u) -ne 0 ]]; then sudo=(sudo); fi

need=()
command -v slurmctld >/dev/null || need+=(slurmctld)
command -v slurmd >/dev/null || need+=(slurmd)
command -v sbatch >/dev/null || need+=(slurm-client)
command -v munged >/dev/null || [[ -x /usr/sbin/munged ]] || need+=(munge)
if ((${#need[@]})); then
    echo "== installing ${need[*]}"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" ||
        { "${sudo[@]}" apt-get update -q && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"; }
fi

work=$(mktemp -d /tmp/distclip-slurm.XXXXXX)
chmod 755 "$work"
host=$(hostname -s)
export SLURM_CONF=$work/etc/slurm.conf
mkdir -p "$work/etc" "$work/state" "$work/spool" "$work/log" "$work/dev"

stop_cluster() {
    for pidfile in "$work/slurmd.pid" "$work/slurmctld.pid"; do
        if [[ -s $pidfile ]]; then
            "${sudo[@]}" kill "$(cat "$pidfile")" 2>/dev/null || true
        fi
    done
}
trap stop_cluster EXIT

for i in 0 1 2 3 4 5 6 7; do
    [[ -e $work/dev/gpu$i ]] || "${sudo[@]}" mknod "$work/dev/gpu$i" c 1 3
done
cat >"$SLURM_CONF" <<EOF
ClusterName=ci
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/log/slurmctld.log
SlurmdLogFile=$work/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
GresTypes=gpu
NodeName=$host CPUs=16 Gres=gpu:8 State=UNKNOWN
PartitionName=ci Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
echo "NodeName=$host Name=gpu File=$work/dev/gpu[0-7]" >"$work/etc/gres.conf"

echo "== munge"
if ! pgrep -x munged >/dev/null; then
    "${sudo[@]}" mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
    "${sudo[@]}" chown munge:munge /run/munge /var/log/munge /var/lib/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        "${sudo[@]}" dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    "${sudo[@]}" chown munge:munge /etc/munge/munge.key
    "${sudo[@]}" chmod 400 /etc/munge/munge.key
    "${sudo[@]}" su -s /bin/sh munge -c /usr/sbin/munged
fi

echo "== slurmctld and slurmd on $host"
"${sudo[@]}" env SLURM_CONF="$SLURM_CONF" slurmctld
"${sudo[@]}" env SLURM_CONF="$SLURM_CONF" slurmd
waited=0
until [[ $(sinfo -h -N -o %T 2>/dev/null) == idle ]]; do
    if ((waited >= 60)); then
        echo "the node did not become idle within 60 s" >&2
        sinfo -N -l >&2 || true
        tail -n 30 "$work/log/slurmctld.log" "$work/log/slurmd.log" >&2 || true
        exit 1
    fi
    sleep 1
    waited=$((waited + 1))
done
sinfo -N -l

echo "== deploy/slurm/distclip.sbatch: 2 tasks, tiny model, 6 steps"
"$bin" synth --out "$work/data" --samples 256 --samples-per-shard 64 --seed 1 >/dev/null
run=$work/run
status=0
DISTCLIP_BIN=$bin DISTCLIP_DEVICE=flex DISTCLIP_THREADS=1 DISTCLIP_RUN_DIR=$run \
    DISTCLIP_DATA="$work/data/train/{00000..00003}.tar" \
    sbatch --wait --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --time=10 \
    --output="$work/job.out" deploy/slurm/distclip.sbatch \
    --model tiny --batch-size 16 --max-steps 6 || status=$?
cat "$work/job.out"
fail() {
    echo "ci-slurm: $*" >&2
    tail -n 30 "$work/log/slurmctld.log" "$work/log/slurmd.log" >&2 || true
    exit 1
}
((status == 0)) || fail "the batch job exited $status"
grep -q '"state":"finished"' "$work/job.out" || fail "the coordinator did not report a finished run"
rows=$(wc -l <"$run/metrics.jsonl")
((rows == 6)) || fail "metrics.jsonl has $rows rows, not 6"
[[ -d $run/checkpoints/final ]] || fail "no final checkpoint in $run/checkpoints"
echo "ci-slurm: the sbatch run finished: 6 steps, a final checkpoint"
rm -rf "$run" "$work/data"
