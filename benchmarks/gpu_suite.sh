#!/usr/bin/env bash
# The GPU measurements of issue #41 ("Training that fills the GPU") in one run of about 9 minutes,
# written and smoke-tested on the CPU first so that one short GPU lending is enough:
#   1. train_throughput.py, LSUN P=4, bf16 + compile, batch 128, with a kernel profile that names
#      the operators (and input shapes) behind the copy kernels: the eager GroupNorm + SiLU ...
#   2. ... and the same with GroupNorm + SiLU (+ scale-shift) fused (--fused-norm);
#   3. the ImageNet-256 expert the same way, fused, batch 128;
#   4. sample_throughput.py: the guided ImageNet-256 expert pair at batch 256: fp32, bf16 + compile,
#      and bf16 + compile with the fused norms;
#   5. data_pipeline.py on the GPU machine's own CPU: images/s per loader worker per dataset kind.
# The earlier suite (issue #22: LSUN and the pair at batch 64, sampler overhead, sample.py on the
# GPU) ran on an H200 on 2026-11-30; its numbers are in benchmarks/RESULTS.md.
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
    timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@" >>"$LOG" 2>&1  # a command or a function below
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
}

{
    date -u
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} >>"$LOG" 2>&1

export PY

if [ "$SMOKE" = 1 ]; then
    stage train_eager_norms 300 "$PY" benchmarks/train_throughput.py --device cpu --configs digits --batch 4 \
        --steps 1 --warmup 1 --profile --out "$RESULTS"
    stage train_fused_norms 300 "$PY" benchmarks/train_throughput.py --device cpu --configs digits --batch 4 \
        --steps 1 --warmup 1 --profile --fused-norm --out "$RESULTS"
    stage sample_pair 600 "$PY" benchmarks/sample_throughput.py --device cpu --tiny --batch 2 --steps 2 \
        --repeats 1 --models imagenet256_pair_cfg1.5 --variants fp32 bf16 --out "$RESULTS"
    stage data_pipeline 300 "$PY" benchmarks/data_pipeline.py --images 4 --repeats 1 --out "$RESULTS"
else
    # ~9 minutes in all; each stage keeps what it measured when its limit cuts it short
    stage train_lsun_eager_norms 130 "$PY" benchmarks/train_throughput.py --device cuda --compile --profile \
        --configs lsun_church_p4 --batch 128 --out "$RESULTS"
    stage train_lsun_fused_norms 130 "$PY" benchmarks/train_throughput.py --device cuda --compile --profile \
        --fused-norm --configs lsun_church_p4 --batch 128 --out "$RESULTS"
    stage train_imagenet_fused_norms 130 "$PY" benchmarks/train_throughput.py --device cuda --compile \
        --fused-norm --configs imagenet256_high_noise --batch 128 --out "$RESULTS"
    stage sample_pair_256 150 "$PY" benchmarks/sample_throughput.py --device cuda --repeats 1 \
        --models imagenet256_pair_cfg1.5 --batch 256 --variants fp32 bf16+compile bf16+compile+fusednorm \
        --out "$RESULTS"
    stage data_pipeline 60 "$PY" benchmarks/data_pipeline.py --images 100 --out "$RESULTS"
fi
echo "done: $RESULTS" | tee -a "$LOG"
