#!/usr/bin/env bash
# The patch-size question as benchmarks/RESULTS.md reports it: P = 1/2/4/8 x 3 seeds on digits
# and on photo crops, and the targets eps/x0/v x 3 seeds at P = 4 on photo crops, all at equal
# counted training FLOPs (6e12 per run, batch 64), each run scored on held-out images (error by
# noise level, bits/dim) and, on digits, by FD-8x8 along training. About 45 min on 2 CPU cores
# (AMD EPYC, AVX-512); re-running resumes and skips finished runs.
#   bash benchmarks/patch_size_question.sh [ROOT]     (default runs/patch_size_question)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${1:-runs/patch_size_question}"
COMMON=(--seeds 3 --budget flops 6e12 --heldout-images 128 --bins 20)
# a 10-step warm-up: at P = 1 the budget is under 20 optimiser steps
python -m pdm.ablation --config configs/digits.yaml --patch-sizes 1 2 4 8 "${COMMON[@]}" \
    --root "$ROOT/digits" -- --data.init_args.batch_size=64 --model.warmup_steps=10
python -m pdm.ablation --config configs/photos.yaml --patch-sizes 1 2 4 8 "${COMMON[@]}" \
    --root "$ROOT/photos" -- --model.warmup_steps=10
python -m pdm.ablation --config configs/photos.yaml --vary model.target eps x0 v "${COMMON[@]}" \
    --root "$ROOT/photos_targets" -- --model.warmup_steps=10

# the paper's claim at equal training progress: P = 4 against P = 8 on photo crops at equal steps
python -m pdm.ablation --config configs/photos.yaml --patch-sizes 4 8 --seeds 3 --budget steps 600 \
    --heldout-images 128 --bins 20 --root "$ROOT/photos_steps" -- --model.warmup_steps=10
# what the photo crops look like (training crops above, held-out below)
python -c "from pdm.data.photos import save_crops_grid; save_crops_grid('benchmarks/results/photo_crops.png')"
