"""What each run of a patch-size ablation costs: counted training FLOPs, a measured step, the
machine it was measured on, and the plan printed before any run starts (``--plan``)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pdm.ablation.configs import batch_size, net_for
from pdm.metrics.cost import count_flops, measure_step_cost, peak_bf16_flops
from pdm.nn import UNet


def step_flops(config: dict, patch_size: int | None = None) -> int:
    """Training FLOPs of one optimiser step at ``patch_size`` (default: the config's own) and the
    config's batch size, counted on one image (the count is linear in the batch) on this machine."""

    net = UNet(**net_for(config, patch_size or _patch_size(config)))
    c, s = net.in_channels, net.image_size
    y = torch.zeros(1, dtype=torch.long) if net.num_classes is not None else None
    one = count_flops(net, torch.randn(1, c, s, s), torch.zeros(1), y, train=True)
    return one * batch_size(config)


def _patch_size(config: dict) -> int:
    return int(config["model"]["net"]["init_args"].get("patch_size", 1))


def print_plan(config: dict, runs: list, args: argparse.Namespace) -> list[dict]:
    """The runs and what each will cost, before any is started (``--plan``): the task number a
    SLURM array gives it, its network, counted FLOPs and, under a steps or FLOPs budget, an
    estimate of GPU-hours at ``--mfu`` of ``--gpu``."""

    peak = peak_bf16_flops(args.gpu)
    if peak is None:
        raise ValueError(f"--gpu {args.gpu!r}: name one of H200, H100, A100, L40S, A10G")
    rows, total_hours = [], 0.0
    print(
        f"| task | run | P | grid | parameters | training GFLOPs/image | steps | training FLOPs | "
        f"{args.gpu}-hours at {args.mfu:.0%} MFU |\n|---|---|---|---|---|---|---|---|---|"
    )
    for task, run in enumerate(runs):
        p = run.patch_size
        net = UNet(**net_for(run.config, p))
        per_step = step_flops(run.config, p)
        steps = run.steps
        total = per_step * steps if steps else None
        hours = total / (peak * args.mfu) / 3600 if total else None
        total_hours += hours or 0.0
        rows.append(
            {
                "task": task,
                "run": run.label,
                "patch_size": p,
                "flops_per_step": per_step,
                "steps": steps,
                "hours": hours,
            }
        )
        grid = net.image_size // p
        params = sum(t.numel() for t in net.parameters())
        print(
            f"| {task} | {run.folder.name} | {p} | {grid}x{grid} | {params / 1e6:.1f}M | "
            f"{per_step / batch_size(run.config) / 1e9:.1f} | {steps or 'by time'} | "
            f"{'-' if total is None else f'{total:.3g}'} | "
            f"{'-' if hours is None else f'{hours:.1f}'} |"
        )
    if total_hours:
        print(f"\nall {len(runs)} runs: {total_hours:.1f} {args.gpu}-hours at {args.mfu:.0%} MFU")
    return rows


def step_cost(config: dict, patch_size: int | None = None, iters: int = 3) -> dict:
    """One training step's cost at ``patch_size`` and the config's batch size, measured on this
    machine's GPU (or CPU): parameters, seconds per step, ms per image, memory."""

    net = UNet(**net_for(config, patch_size or _patch_size(config)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = batch_size(config)
    cost = measure_step_cost(
        net, batch, net.image_size, net.in_channels, device, train=True, warmup=1, iters=iters
    )
    return {
        "parameters": cost["parameters"],
        "seconds_per_step": cost["seconds_per_call"],
        "train_ms_per_image": cost["ms_per_image"],
        "activation_mib": cost["activation_bytes"] / 2**20,
        "peak_cuda_mib": None
        if cost["peak_cuda_bytes"] is None
        else cost["peak_cuda_bytes"] / 2**20,
    }


def device_name() -> str:
    """The GPU's name, or the CPU's model (with its widest vector extension)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import platform

    model, flags = platform.processor() or "CPU", ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next(ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln)
        flags = "AVX-512" if "avx512f" in info else "AVX2" if "avx2" in info else ""
    except (OSError, StopIteration):
        pass
    return f"{model}{f' ({flags})' if flags else ''}, {torch.get_num_threads()} threads"
