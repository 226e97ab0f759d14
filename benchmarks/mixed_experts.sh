#!/usr/bin/env bash
# A patch size for every noise level, as benchmarks/RESULTS.md reports it (after
# benchmarks/patch_size_question.sh), for a P = 8 (high noise) / P = 4 (low noise) pair:
#   1. the split: where the held-out curves of P = 8 and P = 4 part (photo crops: the equal-steps
#      runs, where they do part; digits: PDM's SNR 0.25, as no digits curve parts), checked by
#      routing each seed's two whole-schedule models at four splits;
#   2. expert pairs trained on their own noise ranges at that split, 3 seeds, half the single
#      models' training FLOPs each (3e12 + 3e12 = the 6e12 of one single-P run);
#   3. the pairs scored beside every single P of the equal-FLOPs ablation (frontier.png):
#      held-out bits/dim and sampling GFLOPs per image at the default sampler.
# About 30 min on 2 CPU cores (AMD EPYC, AVX-512); re-running resumes.
#   bash benchmarks/mixed_experts.sh [ROOT]     (default runs/patch_size_question)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${1:-runs/patch_size_question}"
COMMON=(--seeds 3 --budget flops 3e12 --heldout-images 128 --bins 20)
for data in ${DATASETS:-photos digits}; do
    extra=(--model.warmup_steps=10)
    curves="$ROOT/$data"
    if [ "$data" = digits ]; then
        extra+=(--data.init_args.batch_size=64)
    else
        curves="$ROOT/photos_steps"
    fi
    python -m pdm.ablation.split --root "$curves" --coarse 8 --fine 4 --out "$ROOT/$data/split_search"
    # the split the curves propose, or PDM's SNR 0.25 where the coarse P never parts
    split=$(python -c "import json,sys; d=json.load(open(sys.argv[1])); v=d['proposed_log_snr']; print(-1.386 if v is None else round(v, 3))" "$ROOT/$data/split_search/split.json")
    echo "mixed experts: $data split at log SNR $split" >&2
    python -m pdm.ablation --config "configs/$data.yaml" --patch-sizes 8 "${COMMON[@]}" \
        --root "$ROOT/${data}_high_p8" -- "${extra[@]}" --model.expert=high_noise --model.split_log_snr="$split"
    python -m pdm.ablation --config "configs/$data.yaml" --patch-sizes 4 "${COMMON[@]}" \
        --root "$ROOT/${data}_low_p4" -- "${extra[@]}" --model.expert=low_noise --model.split_log_snr="$split"
    python -m pdm.ablation.split --root "$ROOT/$data" --coarse 8 --fine 4 --splits "$split" \
        --pair "$ROOT/${data}_high_p8" "$ROOT/${data}_low_p4" --out "$ROOT/$data/pair"
done
# digits samples: FD-8x8 of 500 images per seed at the default sampler, P = 4, P = 8 and the pair
for s in "" _seed1 _seed2; do
    python sample.py --ckpt "$ROOT/digits/P4$s/checkpoints/last.ckpt" --num-samples 500 --out "$ROOT/digits_fd/p4$s"
    python sample.py --ckpt "$ROOT/digits/P8$s/checkpoints/last.ckpt" --num-samples 500 --out "$ROOT/digits_fd/p8$s"
    python sample.py --ckpt "$ROOT/digits_high_p8/P8$s/checkpoints/last.ckpt" \
        --ckpt "$ROOT/digits_low_p4/P4$s/checkpoints/last.ckpt" --num-samples 500 --out "$ROOT/digits_fd/pair$s"
    for m in p4 p8 pair; do
        python -m pdm.metrics digits-fd --images "$ROOT/digits_fd/$m$s/samples.npz"
    done
done
