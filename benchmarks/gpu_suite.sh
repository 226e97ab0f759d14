#!/usr/bin/env bash
# The GPU measurements of issue #22 in one run of about 9 minutes (written and tested on the CPU
# first, so that one short GPU lending is enough):
#   1. sample_throughput.py: images/s at 20 NFE, LSUN P=4 and the ImageNet-256 expert pair with
#      guidance 1.5, batch 64 and 256: fp32 eager, bf16, bf16 + compile (+ CUDA graphs at 64),
#      with the RMS difference of every variant's samples from fp32's;
#   2. sampler_overhead.py: the time sample() spends outside the network, and device-to-host
#      synchronisations per step;
#   3. sample.py itself on the GPU: bf16 + compile with a partial last batch, a resume, and its
#      compiled images against eager ones;
#   4. train_throughput.py: LSUN P=4 training step, bf16 + compile, MFU at batch 64 and 128, with a
#      kernel profile (device time per kind of kernel: what limits the step).
# (max-autotune is left out: its kernel search comes on top of a ~70 s compile.) The limits
# below sum to ~9 minutes; the H200 run of 2026-11-30 is in benchmarks/RESULTS.md.
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

cli_check() {  # DEVICE PRECISION: sample.py itself on the device (compiled, a partial last batch, a resume),
               # and its compiled images against eager ones, on the digits demo's network
    local dev=$1 precision=$2 dir
    dir=$(mktemp -d)
    "$PY" -c "import sys; from pathlib import Path; sys.path.insert(0, '.')
from benchmarks.sample_throughput import write_export; print(write_export('digits', Path('$dir'), False))" || return 1
    local common=(--ckpt "$dir/digits.safetensors" --num-samples 100 --batch-size 64 --device "$dev" --precision "$precision")
    "$PY" sample.py "${common[@]}" --compile --out "$dir/compiled" || return 1
    "$PY" sample.py "${common[@]}" --compile --out "$dir/compiled" || return 1   # a finished run: nothing redone
    "$PY" sample.py "${common[@]}" --out "$dir/eager" || return 1
    "$PY" -c "import numpy as np
a = np.load('$dir/compiled/samples.npz')['arr_0'].astype(float); b = np.load('$dir/eager/samples.npz')['arr_0'].astype(float)
print(f'sample.py $precision on $dev: compiled vs eager, {len(a)} images: mean |diff| {np.abs(a - b).mean():.3f}/255, '
      f'max {np.abs(a - b).max():.0f}/255, identical pixels {100 * (a == b).mean():.1f}%')"
}

export -f cli_check
export PY

if [ "$SMOKE" = 1 ]; then
    stage sample_throughput 600 "$PY" benchmarks/sample_throughput.py --device cpu --tiny --batch 2 --steps 2 \
        --repeats 1 --variants fp32 bf16 --out "$RESULTS"
    stage sampler_overhead 300 "$PY" benchmarks/sampler_overhead.py --device cpu --batch 4 --steps 6 --rounds 1 \
        --out "$RESULTS"
    stage train_throughput 300 "$PY" benchmarks/train_throughput.py --device cpu --configs digits --batch 4 8 \
        --steps 1 --warmup 1 --profile --out "$RESULTS"
    stage sample_cli 300 cli_check cpu fp32  # compiled bf16 is refused on a CPU (pdm.nn.runtime.check_compile)
else
    # ~9 minutes in all; each stage keeps what it measured when its limit cuts it short
    stage sample_throughput 320 "$PY" benchmarks/sample_throughput.py --device cuda --repeats 1 --out "$RESULTS"
    stage sampler_overhead 30 "$PY" benchmarks/sampler_overhead.py --device cuda --out "$RESULTS"
    stage sample_cli 60 cli_check cuda bf16
    stage train_throughput_compile 140 "$PY" benchmarks/train_throughput.py --device cuda --compile --profile \
        --configs lsun_church_p4 --batch 64 128 --out "$RESULTS"
fi
echo "done: $RESULTS" | tee -a "$LOG"
