#!/usr/bin/env bash
# The GPU measurements of issue #22 in one run of at most ~8 minutes (written and tested on the CPU
# first, so that one short GPU lending is enough):
#   1. sample_throughput.py: images/s at 20 NFE, LSUN P=4 and the ImageNet-256 expert pair with
#      guidance 1.5, batch 64 and 256: fp32 eager, bf16, bf16 + compile (+ CUDA graphs at 64),
#      with the RMS difference of every variant's samples from fp32's;
#   2. sampler_overhead.py: the time sample() spends outside the network, and device-to-host
#      synchronisations per step;
#   3. train_throughput.py: LSUN P=4 training step, bf16 + compile, MFU at batch 64 and 128, and
#      with max-autotune.
# Each stage has its own time limit and writes its JSON as it goes, into $OUT/gpu_suite (the device
# tool brings $OUT back) or benchmarks/results/gpu_suite, with the log of every stage.
#
#   bash benchmarks/gpu_suite.sh            # on the GPU
#   bash benchmarks/gpu_suite.sh --smoke    # every stage, tiny and short, on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
RESULTS="${OUT:-benchmarks/results}/gpu_suite"
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_suite.log"
PY="${PYTHON:-python}"

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log, never stop the suite
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
}

{
    date -u
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} >>"$LOG" 2>&1

if [ "$SMOKE" = 1 ]; then
    stage sample_throughput 600 "$PY" benchmarks/sample_throughput.py --device cpu --tiny --batch 2 --steps 2 \
        --repeats 1 --variants fp32 bf16 --out "$RESULTS"
    stage sampler_overhead 300 "$PY" benchmarks/sampler_overhead.py --device cpu --batch 4 --steps 6 --rounds 1 \
        --out "$RESULTS"
    stage train_throughput 300 "$PY" benchmarks/train_throughput.py --device cpu --configs digits --batch 4 \
        --steps 1 --warmup 1 --out "$RESULTS"
else
    stage sample_throughput 300 "$PY" benchmarks/sample_throughput.py --device cuda --out "$RESULTS"
    stage sampler_overhead 45 "$PY" benchmarks/sampler_overhead.py --device cuda --out "$RESULTS"
    stage train_throughput_compile 90 "$PY" benchmarks/train_throughput.py --device cuda --compile \
        --configs lsun_church_p4 --batch 64 --out "$RESULTS"
    stage train_throughput_compile_b128 60 "$PY" benchmarks/train_throughput.py --device cuda --compile \
        --configs lsun_church_p4 --batch 128 --out "$RESULTS"
    stage train_throughput_autotune 120 "$PY" benchmarks/train_throughput.py --device cuda --compile \
        --compile-mode max-autotune --configs lsun_church_p4 --batch 64 --out "$RESULTS"
fi
echo "done: $RESULTS" | tee -a "$LOG"
