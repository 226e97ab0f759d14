"""How a network runs on a device: its memory layout, its precision, and a compiled form.

None of this changes a checkpoint: the layout and the dtype are applied to a built network when
it is placed on its device (training and sampling alike), and compilation wraps the module.

- Memory layout (:func:`preferred_memory_format`): channels-last on CUDA, where cuDNN's
  tensor-core convolutions want NHWC. On a CPU it depends on the network's width, measured in
  fp32 training steps on AVX-512 and AVX2 kernels (``benchmarks/RESULTS.md``): wide networks
  (LSUN's 256-512 channels) trained in channels-last at 1.22x the official network's step time
  with AVX2 kernels and at 0.95x in contiguous NCHW, equal within noise with AVX-512; narrow ones
  (the digits demo's 64-128 channels, at P = 2, 4, 8) trained faster in channels-last on both
  (median per-round ratio contiguous / channels-last 1.03-1.22).
  So CPUs get channels-last up to ``CPU_CHANNELS_LAST_MAX_WIDTH`` channels, contiguous above.
  The rule is fixed (not timed at start-up), so a resumed run computes exactly as before.
- Precision (:func:`precision_dtype`): ``fp32``, ``bf16`` or ``fp16`` for the network's
  weights and activations, run under autocast so that reductions stay accurate; the caller's
  tensors (a sampler's state) keep their own dtype.
- Compilation (:class:`FixedBatch`): ``torch.compile`` specialises on shapes, so every call
  is padded (or split) to one batch size and a short last batch costs no recompilation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor, nn

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CompileMode = Literal["default", "reduce-overhead", "max-autotune"]
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)


CPU_CHANNELS_LAST_MAX_WIDTH = 128  # widest level (channels) up to which a CPU runs channels-last


def preferred_memory_format(
    device: str | torch.device, width: int | None = None
) -> torch.memory_format:
    """The faster layout for a network whose widest level has ``width`` channels on ``device``:
    channels-last on CUDA; on a CPU channels-last up to 128 channels, contiguous for wider
    networks (and when the width is unknown); contiguous elsewhere (MPS)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.channels_last
    if device.type == "cpu" and width is not None and width <= CPU_CHANNELS_LAST_MAX_WIDTH:
        return torch.channels_last
    return torch.contiguous_format


def fuse_norms(net: nn.Module, on: bool = True) -> nn.Module:
    """Run every GroupNorm + SiLU (+ the time embedding's scale-shift) of a U-Net as
    :func:`pdm.nn.layers.group_norm_act`, one expression that ``torch.compile`` fuses in the
    input's memory format (``on=False``: back to the eager modules). Weights are untouched."""
    from pdm.nn.layers import ResBlock

    for module in net.modules():
        if isinstance(module, ResBlock) or hasattr(module, "widths"):
            module.fused_norm = on
    return net


def network_width(net: nn.Module) -> int | None:
    """The widest level of a U-Net (``net.widths``), or None for another module."""
    widths = getattr(net, "widths", None)
    return max(widths) if widths else None


def place(
    net: nn.Module, device: str | torch.device, dtype: torch.dtype | None = None
) -> nn.Module:
    """Move ``net`` to ``device`` (and ``dtype``) in its preferred memory layout there, in place."""
    net.to(device=device, dtype=dtype)
    return net.to(memory_format=preferred_memory_format(device, network_width(net)))


def precision_dtype(precision: str, device: str | torch.device) -> torch.dtype:
    """The dtype of a precision name, or a ValueError naming the fix (fp16 needs a GPU)."""
    if precision not in _DTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and torch.device(device).type == "cpu":
        raise ValueError(
            "fp16 needs a GPU (CPUs have no fast fp16 kernels); use --precision bf16 or fp32 on a CPU"
        )
    return _DTYPES[precision]


def check_compile(precision: str, device: str | torch.device) -> None:
    """A ValueError naming the fix when ``torch.compile`` of a network in ``precision`` on
    ``device`` is known to compute wrong numbers.

    On a CPU, Inductor's vectorised C++ kernels turn whole samples of our bf16 U-Net into NaN (a
    fused GroupNorm + scale-shift; the LSUN and ImageNet networks with torch 2.14, while the
    same graph unvectorised, or in fp32, is right): compiled half precision is refused there.
    """
    if precision in ("bf16", "fp16") and torch.device(device).type == "cpu":
        raise ValueError(
            f"--compile with --precision {precision} on a CPU gives NaN images (PyTorch Inductor's "
            "vectorised CPU kernels mis-compile the bf16 network); on a CPU use --compile with fp32, or "
            f"--precision {precision} without --compile"
        )


def autocast(device: str | torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``, or nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


class FixedBatch:
    """Call ``fn`` with exactly ``size`` rows: smaller calls are padded (with copies of their
    last row, so every padded input is a valid one), larger calls are split.

    A compiled network then meets one input shape, whatever the caller sends: the short last
    batch of a run, the doubled batch of classifier-free guidance, the subsets that step
    skipping or an expert split evaluate. Rows never interact in the network, so padding
    changes no output. Tensor arguments are batched along dim 0; None passes through.
    """

    def __init__(self, fn: Callable[..., Tensor], size: int) -> None:
        if size < 1:
            raise ValueError(f"the fixed batch size must be positive, got {size}")
        self.fn, self.size = fn, size

    def __call__(self, *args: Tensor | None) -> Tensor:
        rows = next(a for a in args if a is not None).shape[0]
        if rows == self.size:
            return self.fn(*args)
        outs = []
        for start in range(0, rows, self.size):
            part = [None if a is None else a[start : start + self.size] for a in args]
            n = part[0].shape[0]
            if n < self.size:
                part = [
                    None
                    if a is None
                    else torch.cat([a, a[-1:].expand(self.size - n, *a.shape[1:])])
                    for a in part
                ]
            outs.append(self.fn(*part)[:n])
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def compile_network(net: nn.Module, batch: int, mode: str = "default") -> Callable[..., Tensor]:
    """``torch.compile(net)`` behind a :class:`FixedBatch` of ``batch`` rows (static shapes).

    ``mode="reduce-overhead"`` adds CUDA graphs (they pay most at small batches);
    ``"max-autotune"`` also searches kernel configurations (long compile).
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    param = next(net.parameters(), None)
    if param is not None:
        check_compile(
            next((name for name, dtype in _DTYPES.items() if dtype == param.dtype), "fp32"),
            param.device,
        )
    compiled = torch.compile(net, mode=None if mode == "default" else mode, dynamic=False)
    return FixedBatch(compiled, batch)
