"""Paired quality of images against references of the same seeds (torchmetrics)."""

from __future__ import annotations

import numpy as np
import torch


def _float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def paired_quality(
    images: np.ndarray, references: np.ndarray, lpips: bool = False
) -> dict[str, float]:
    """Mean per-image PSNR (dB) and SSIM of uint8 NHWC images against same-seed references;
    LPIPS (AlexNet) when ``lpips`` and its weights are available offline."""
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    if images.shape != references.shape:
        raise ValueError(f"images {images.shape} and references {references.shape} differ in shape")
    x, ref = _float(images), _float(references)
    out = {
        "psnr": float(
            peak_signal_noise_ratio(x, ref, data_range=1.0, reduction="none", dim=(1, 2, 3)).mean()
        ),
        "ssim": float(structural_similarity_index_measure(x, ref, data_range=1.0, kernel_size=7)),
    }
    if lpips:
        try:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
            rgb = lambda t: t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t  # noqa: E731
            out["lpips"] = float(metric(rgb(x), rgb(ref)))
        except Exception as e:  # noqa: BLE001 - weights come from the internet
            raise ValueError(
                f"LPIPS needs the AlexNet and LPIPS weights in the torch hub cache ({e}); "
                "run once on a machine with internet, or drop --lpips"
            ) from None
    return out
