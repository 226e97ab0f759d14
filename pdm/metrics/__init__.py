"""Metrics: FID (torchmetrics Inception-v3) with stored reference statistics, an offline digits
FD, paired PSNR/SSIM/LPIPS, and the per-step cost of a network."""

from pdm.metrics.cost import count_flops, measure_step_cost, peak_bf16_flops
from pdm.metrics.digits import (
    DigitsFeatures,
    classifier_accuracy,
    digits_classifier,
    digits_fd_baseline,
    digits_fd_metric,
    digits_reference_images,
    real_digits_accuracy,
)
from pdm.metrics.fid import (
    DEFAULT_NUM_SAMPLES,
    FeatureStats,
    compute_stats,
    fid_against,
    inception_weights_path,
    load_images,
    make_fid,
)
from pdm.metrics.quality import paired_quality

__all__ = [
    "DEFAULT_NUM_SAMPLES",
    "DigitsFeatures",
    "classifier_accuracy",
    "digits_classifier",
    "FeatureStats",
    "compute_stats",
    "count_flops",
    "digits_fd_baseline",
    "digits_fd_metric",
    "digits_reference_images",
    "fid_against",
    "inception_weights_path",
    "load_images",
    "make_fid",
    "measure_step_cost",
    "paired_quality",
    "peak_bf16_flops",
    "real_digits_accuracy",
]
