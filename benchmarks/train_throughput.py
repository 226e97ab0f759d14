"""Training throughput of the big PDM configs: images/s and model FLOPs utilisation (MFU).

    python benchmarks/train_throughput.py --device cuda [--channels-last] [--compile] [--batch 64 128] [--profile]
    python benchmarks/train_throughput.py --configs lsun_church_p4 --batch 2 --steps 2   # CPU smoke run

For each config (default: LSUN Church P = 4 and the ImageNet-256 P = 4 high-noise expert) it runs
the training step the trainer runs, on synthetic images already on the device (so the data loader
is not measured): draw t and noise, bf16 autocast forward, the PDM loss, backward, gradient
clipping at 1.0, Adam (fused on CUDA), and the EMA update (one fused lerp). FLOPs of one step are
counted with torch.utils.flop_counter on the same batch; MFU = counted FLOPs x steps/s divided by
the GPU's data-sheet dense bf16 peak (``--peak-tflops`` overrides it). A batch that does not fit is
halved until it does. Writes benchmarks/results/train_throughput_{tag}.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import HERE, config_module, machine, markdown_table, write_json  # noqa: E402
from pdm.metrics import count_flops, peak_bf16_flops  # noqa: E402
from pdm.nn.runtime import fuse_norms, network_width, preferred_memory_format  # noqa: E402


def measure(name: str, batch: int, args) -> dict:
    """Images/s and MFU of one config's training step at this batch size."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    module = config_module(name).to(device)
    net = module.net
    layout = LAYOUTS.get(
        "channels_last" if args.channels_last else args.layout
    ) or preferred_memory_format(device, network_width(net))
    net.to(
        memory_format=layout
    )  # as PDMModule.on_fit_start does: the device's layout unless forced
    size, ch = net.image_size, net.in_channels
    x0 = (torch.rand(batch, ch, size, size, device=device) * 2 - 1).contiguous(memory_format=layout)
    y = torch.randint(0, net.num_classes, (batch,), device=device) if net.num_classes else None
    params = [p for p in net.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.99), fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    # FLOPs of one step, counted on the uncompiled network with the same batch
    t_label = torch.randint(*module.time_range, (batch,), device=device).float()
    with autocast:
        flops = count_flops(net, x0, t_label, y, train=True)
    if args.fused_norm:
        fuse_norms(net)  # after counting: the same FLOPs (norms are not counted), fused kernels
    if args.compile and args.compile_mode == "default":
        module.compile_net()  # in place, as PDMModule(compile_network=True) does in training
    elif args.compile:
        net.compile(mode=args.compile_mode)

    def step() -> None:
        with autocast:
            loss = module.loss_per_sample(x0, module.drop_labels(y))[0].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1e-4)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    profile = kernel_profile(step, sync, device) if args.profile else None
    peak = (
        args.peak_tflops * 1e12
        if args.peak_tflops
        else (peak_bf16_flops(torch.cuda.get_device_name()) if device.type == "cuda" else None)
    )
    return {
        "config": name,
        "batch": batch,
        "parameters": sum(p.numel() for p in params),
        "seconds_per_step": seconds,
        "images_per_second": batch / seconds,
        "flops_per_step": flops,
        "achieved_tflops": flops / seconds / 1e12,
        "peak_tflops": None if peak is None else peak / 1e12,
        "mfu": None if peak is None else flops / seconds / peak,
        "peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30
        if device.type == "cuda"
        else None,
        "warmup_seconds": warmup_s,
        "profile": profile,
    }


LAYOUTS = {
    "channels_last": torch.channels_last,
    "contiguous": torch.contiguous_format,
}  # "device": pdm's choice

KERNEL_KINDS = (  # (kind, substrings of kernel names), first match wins
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("convolution", ("conv", "implicit", "cudnn", "xmma", "dgrad", "wgrad", "fprop")),
    ("matmul", ("gemm", "cutlass", "matmul", "cublas", "sm90_")),
    ("norm+activation", ("norm", "silu", "welford", "reduction")),
    ("optimizer+EMA", ("adam", "foreach", "lerp", "multi_tensor")),
    ("copy/layout", ("copy", "transpose", "permute", "cat", "memcpy", "memset", "fill")),
)


def kernel_kind(name: str) -> str:
    """The kind of work a GPU kernel does, from its name (generated Triton kernels that fuse
    pointwise work with a reduction are "fused pointwise/reduction")."""
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "fused pointwise/reduction" if low.startswith("triton") else "other"


def kernel_profile(step, sync, device: torch.device, steps: int = 2) -> dict:
    """Device time per kind of kernel over ``steps`` training steps (torch.profiler), and the ten
    kernels that take longest: what limits the step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    sync()
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        sync()
    attr = "device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    # kernels only: an operator's (aten::conv..., a compiled region's) device time is its kernels'
    operators = (
        "aten::",
        "autograd",
        "torch::",
        "Optimizer",
        "ProfilerStep",
        "Torch-Compiled",
        "CompiledFunction",
        "cuda",
        "detach",
    )
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    kernels = [e for e in events if not e.key.startswith(operators)]
    events = kernels if device.type == "cuda" or kernels else events
    total = sum(getattr(e, attr) for e in events) or 1.0
    kinds: dict[str, float] = {}
    for e in events:
        kinds[kernel_kind(e.key)] = kinds.get(kernel_kind(e.key), 0.0) + getattr(e, attr)
    top = sorted(events, key=lambda e: -getattr(e, attr))[:10]
    # who makes the copies: the operators (with their input shapes) that dispatched copy kernels
    by_shape = prof.key_averages(group_by_input_shape=True)
    copies = sorted(
        (
            e
            for e in by_shape
            if e.key in ("aten::copy_", "aten::contiguous", "aten::clone", "aten::_to_copy")
            and getattr(e, attr, 0) > 0
        ),
        key=lambda e: -getattr(e, attr),
    )[:8]
    return {
        "copy_operators": [
            {
                "operator": e.key,
                "input_shapes": str(e.input_shapes)[:200],
                "share": getattr(e, attr) / total,
                "calls_per_step": e.count / steps,
            }
            for e in copies
        ],
        "device_ms_per_step": total / 1e3 / steps,
        "share_by_kind": {k: v / total for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top_kernels": [
            {
                "name": e.key[:120],
                "kind": kernel_kind(e.key),
                "share": getattr(e, attr) / total,
                "calls_per_step": e.count / steps,
            }
            for e in top
        ],
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--configs", nargs="+", default=["lsun_church_p4", "imagenet256_high_noise"])
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=[64],
        help="per-device batch sizes, measured in turn; each is halved until it fits",
    )
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--layout",
        default="device",
        choices=["device", *LAYOUTS],
        help="the network's memory layout (default: the one pdm chooses for the device)",
    )
    p.add_argument(
        "--channels-last", action="store_true", help="the same as --layout channels_last"
    )
    p.add_argument("--compile", action="store_true")
    p.add_argument(
        "--fused-norm",
        action="store_true",
        help="GroupNorm + SiLU (+ scale-shift) as one fusable expression (pdm.nn.runtime.fuse_norms)",
    )
    p.add_argument(
        "--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"]
    )
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, TFLOP/s"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile two steps: device time per kind of kernel, and the longest kernels",
    )
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    rows = []
    mode = "" if args.compile_mode == "default" else "_" + args.compile_mode.replace("-", "_")
    layout_tag = (
        "_cl"
        if args.channels_last or args.layout == "channels_last"
        else "_contiguous"
        if args.layout == "contiguous"
        else ""
    )
    tag = (
        f"{args.device}_b{'-'.join(map(str, args.batch))}{layout_tag}"
        f"{'_compile' + mode if args.compile else ''}{'_fusednorm' if args.fused_norm else ''}"
    )
    for name in args.configs:
        for batch in args.batch:
            while True:
                try:
                    rows.append(measure(name, batch, args))
                    break
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    if batch == 1:
                        raise
                    batch //= 2
                    print(
                        f"{name}: out of memory, retrying at batch {batch}",
                        file=sys.stderr,
                        flush=True,
                    )
            r = rows[-1]
            mfu = "" if r["mfu"] is None else f", MFU {100 * r['mfu']:.1f}%"
            print(
                f"{name}: {r['images_per_second']:.1f} images/s at batch {r['batch']}{mfu} "
                f"(warm-up {r['warmup_seconds']:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
            if r["profile"]:
                shares = ", ".join(
                    f"{k} {100 * v:.0f}%" for k, v in r["profile"]["share_by_kind"].items()
                )
                print(f"  device time by kind: {shares}", file=sys.stderr, flush=True)
            # written after every row: a run cut short keeps what it measured
            write_json(
                Path(args.out) / f"train_throughput_{tag}.json",
                {"machine": machine(), "settings": vars(args), "rows": rows},
            )
    table = [
        [
            r["config"],
            f"{r['parameters'] / 1e6:.1f}M",
            r["batch"],
            f"{r['images_per_second']:.1f}",
            f"{r['flops_per_step'] / r['batch'] / 1e9:.1f}",
            f"{r['achieved_tflops']:.1f}",
            "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
            "n/a" if r["peak_cuda_gib"] is None else f"{r['peak_cuda_gib']:.1f}",
        ]
        for r in rows
    ]
    print(
        f"machine: {machine()}; bf16 autocast, layout {'channels_last' if args.channels_last else args.layout}"
        f"{', torch.compile' if args.compile else ''}\n"
    )
    print(
        markdown_table(
            [
                "config",
                "params",
                "batch",
                "images/s",
                "GFLOP/image (train)",
                "TFLOP/s",
                "MFU",
                "peak GiB",
            ],
            table,
        )
    )


if __name__ == "__main__":
    main()
