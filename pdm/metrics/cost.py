"""What one denoising step costs: latency per image, throughput, memory."""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
from torch import nn


def activation_bytes(net: nn.Module, x: torch.Tensor, t: torch.Tensor) -> int:
    """Bytes of every leaf module's output in one forward pass: what training keeps for backward,
    and a device-independent proxy for the memory a step needs."""
    total = 0

    def hook(_m, _i, out):
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel() * out.element_size()

    handles = [m.register_forward_hook(hook) for m in net.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            net(x, t)
    finally:
        for h in handles:
            h.remove()
    return total


def measure_step_cost(
    net: nn.Module,
    batch: int,
    image_size: int,
    in_channels: int = 3,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    train: bool = False,
    warmup: int = 2,
    iters: int = 5,
) -> dict[str, float | int | None]:
    """Time ``iters`` forward passes (or forward + backward + Adam step when ``train``) of ``net``.

    Returns the median seconds per call, per-image latency (ms), images per second, the peak
    CUDA memory (None on CPU) and the activation bytes of one forward pass.
    """
    device = torch.device(device)
    net = net.to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    x = torch.randn(batch, in_channels, image_size, image_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.full((batch,), 500.0, device=device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    opt = torch.optim.Adam(net.parameters(), lr=1e-6) if train else None
    net.train(train)

    def step() -> None:
        with autocast:
            if train:
                loss = net(x, t).float().pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    net(x, t)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    return {
        "seconds_per_call": seconds,
        "ms_per_image": 1000.0 * seconds / batch,
        "images_per_second": batch / seconds,
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "activation_bytes": activation_bytes(net, x[:1], t[:1]) * batch,
        "parameters": sum(p.numel() for p in net.parameters()),
    }


def count_flops(
    net: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor | None = None,
    train: bool = False,
) -> int:
    """Floating-point operations of one forward pass of ``net`` on this batch (forward and
    backward when ``train``), counted by ``torch.utils.flop_counter`` from the matmuls,
    convolutions and attention kernels actually dispatched (one multiply-add = 2 FLOPs;
    normalisations and activations are not counted, as in the usual MFU convention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        if train:
            net(x, t, y).float().sum().backward()
        else:
            with torch.no_grad():
                net(x, t, y)
    if train:
        net.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def count_call_flops(experts) -> None:
    """Count, once, what one network call on one image costs for each expert of a loaded model
    (:class:`pdm.checkpoints.models.Expert`): its ``flops_per_call``."""
    for expert in experts:
        if expert.flops_per_call is not None:
            continue
        net = expert.net
        param = next(net.parameters())
        c, s = net.in_channels, net.image_size
        x = torch.zeros(1, c, s, s, device=param.device, dtype=param.dtype)
        y = (
            torch.zeros(1, dtype=torch.long, device=x.device)
            if net.num_classes is not None
            else None
        )
        expert.flops_per_call = count_flops(net, x, torch.zeros(1, device=x.device), y)


# dense bf16 tensor-core peaks from the vendors' data sheets (no sparsity), by device-name substring
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,  # specific names first
    "A100": 312.0,
    "L40S": 362.1,
    "A10G": 70.0,
}


def peak_bf16_flops(device_name: str) -> float | None:
    """The data-sheet dense bf16 peak (FLOP/s) of a GPU named ``device_name``, None if unknown."""
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None
