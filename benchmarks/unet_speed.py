"""pdm's U-Net against the official PDM network, side by side, and the EMA update's cost.

    python benchmarks/unet_speed.py --official /path/to/PatchDiffusion-Pytorch [--batch 8]

--official points at a local checkout of ericl122333/PatchDiffusion-Pytorch (its
patch_diffusion/unet.py and nn.py; patch_diffusion/fp16_util.py may be missing). Nothing of it is
imported unless given, and none of it is part of pdm. For LSUN Church P = 4 and P = 8 it builds
the official network and pdm's in both memory layouts (contiguous, channels-last) with the same
weights (converted with pdm.nn.convert_official_state_dict), checks their outputs agree, and times
a forward pass and a training step (forward, backward, Adam), rotating the order of the networks
round by round; the ratio reported is the median over rounds of each round's pdm / official time
(the networks of one round run back to back, so their ratio resists a shared host's drifts and
bursts, which moved single rounds by up to 30% on the project's machine). It also times one EMA update of the
ImageNet-256 network (200.6M parameters): a Python loop over the parameters (as before) against
pdm.training.EMA's single fused lerp (--no-ema skips it). Writes
benchmarks/results/unet_speed_<kernel level>.json. Run it once as is and once with
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` to see an AVX2 CPU's kernels.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import HERE, machine, markdown_table, write_json  # noqa: E402
from pdm.nn import UNet, convert_official_state_dict  # noqa: E402
from pdm.nn.runtime import preferred_memory_format  # noqa: E402

CONFIGS = {
    "LSUN Church P=4": dict(
        image_size=256,
        patch_size=4,
        model_channels=256,
        channel_mult=(1, 1, 2, 2),
        num_res_blocks=2,
    ),
    "LSUN Church P=8": dict(
        image_size=256, patch_size=8, model_channels=256, channel_mult=(1, 1.5, 2), num_res_blocks=3
    ),
}
IMAGENET = dict(
    image_size=256,
    patch_size=4,
    model_channels=256,
    channel_mult=(1, 2, 2, 2),
    num_res_blocks=3,
    num_classes=1000,
    attention_resolutions=(16, 8),
)


def official_class(root: Path):
    """The official UNetModel, imported from a local checkout (with a stub for its fp16 helpers)."""
    if not (root / "patch_diffusion" / "unet.py").exists():
        raise SystemExit(
            f"{root} has no patch_diffusion/unet.py; pass a checkout of ericl122333/PatchDiffusion-Pytorch"
        )
    sys.path.insert(0, str(root))
    if not (root / "patch_diffusion" / "fp16_util.py").exists():
        stub = types.ModuleType("patch_diffusion.fp16_util")
        stub.convert_module_to_f16 = stub.convert_module_to_f32 = lambda m: None
        sys.modules["patch_diffusion.fp16_util"] = stub
    from patch_diffusion.unet import UNetModel

    return UNetModel


def official_net(cls, cfg: dict):
    grid = cfg["image_size"] // cfg["patch_size"]
    return cls(
        image_size=cfg["image_size"],
        in_channels=3,
        model_channels=cfg["model_channels"],
        out_channels=3,
        num_res_blocks=cfg["num_res_blocks"],
        attention_resolutions=tuple(grid // r for r in (16, 8)),
        patch_size=cfg["patch_size"],
        classifier_free=True,
        channel_mult=tuple(float(m) for m in cfg["channel_mult"]),
        num_classes=cfg.get("num_classes"),
        num_head_channels=64,
        use_scale_shift_norm=True,
        use_new_attention_order=True,
    )


def timed(fn, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


LAYOUTS = {"pdm (contiguous)": torch.contiguous_format, "pdm (channels_last)": torch.channels_last}


def networks(cls, cfg: dict) -> dict:
    """The official network (random non-zero weights) and pdm's with the same weights in each layout."""
    torch.manual_seed(0)
    official = official_net(cls, cfg)
    with torch.no_grad():  # non-zero weights everywhere, so the outputs say something
        for p in official.parameters():
            p.add_(0.02 * torch.randn_like(p))
    nets = {"official": official}
    for label, layout in LAYOUTS.items():
        ours = UNet(in_channels=3, attention_resolutions=(16, 8), **cfg)
        ours.load_state_dict(convert_official_state_dict(official.state_dict()), strict=True)
        nets[label] = ours.to(memory_format=layout)
    return nets


def compare(cls, name: str, cfg: dict, batch: int, rounds: int) -> dict:
    """Official vs pdm in both memory layouts, same weights, rounds interleaved (order rotating)."""
    nets = networks(cls, cfg)
    official = nets["official"]
    x, t = torch.randn(batch, 3, 256, 256), torch.full((batch,), 500.0)
    with torch.no_grad():
        ref = official.eval()(x, t)
        agree = max(float((ref - nets[k].eval()(x, t)).abs().max()) for k in LAYOUTS)
    opts = {k: torch.optim.Adam(n.parameters(), lr=1e-6) for k, n in nets.items()}

    def forward(k):
        nets[k].eval()
        with torch.no_grad():
            nets[k](x, t)

    def train(k):
        nets[k].train()
        nets[k](x, t).pow(2).mean().backward()
        opts[k].step()
        opts[k].zero_grad(set_to_none=True)

    result = {
        "max_abs_output_difference": agree,
        "batch": batch,
        "preferred_layout": "channels_last"
        if preferred_memory_format("cpu", max(nets["pdm (contiguous)"].widths))
        == torch.channels_last
        else "contiguous",
    }
    names = list(nets)
    for label, fn in (("forward", forward), ("train_step", train)):
        for k in names:
            fn(k)  # warm-up
        times = {k: [] for k in names}
        for r in range(rounds):
            for k in names[r % len(names) :] + names[: r % len(names)]:
                times[k] += timed(lambda k=k: fn(k), 1)
        med = {k: statistics.median(v) for k, v in times.items()}
        # each round runs every network back to back, so a round's ratio shares the host's state of that
        # moment; the median of the per-round ratios resists a shared host's drifts and bursts
        ratios = {k: sorted(a / b for a, b in zip(times[k], times["official"])) for k in LAYOUTS}
        paired = {k: statistics.median(v) for k, v in ratios.items()}
        result[label] = {
            **{f"{k} seconds": v for k, v in med.items()},
            **{f"{k} ratio": paired[k] for k in LAYOUTS},
            **{
                f"{k} ratio quartiles": statistics.quantiles(v, n=4)[::2] for k, v in ratios.items()
            },
            **{f"{k} ratio of medians": med[k] / med["official"] for k in LAYOUTS},
            "rounds": {k: v for k, v in times.items()},
        }
    print(
        f"{name}: "
        + "; ".join(
            f"{label} "
            + ", ".join(
                f"{k.split()[1]} {result[label][k + ' ratio']:.3f}x "
                f"(of medians {result[label][k + ' ratio of medians']:.3f}x)"
                for k in LAYOUTS
            )
            for label in ("forward", "train_step")
        )
        + f" (pdm / official); outputs agree to {agree:.1e}",
        file=sys.stderr,
        flush=True,
    )
    return result


def ema_update_seconds(rounds: int = 5) -> dict:
    """One EMA update of the ImageNet-256 network: per-parameter Python loop vs one fused lerp."""
    from torch.optim.swa_utils import AveragedModel

    from pdm.training import EMA

    net = UNet(in_channels=3, **IMAGENET)
    decay = 0.9999

    def avg_fn(averaged, current, num_averaged):  # the previous implementation's per-tensor update
        return averaged + (current - averaged) * (1.0 - decay)

    results = {}
    for name, kwargs in (
        ("python_loop", dict(avg_fn=avg_fn, use_buffers=True)),
        ("fused_lerp", EMA(decay)._kwargs),
    ):
        avg = AveragedModel(net, **kwargs)
        avg.update_parameters(net)  # the first update copies
        avg.update_parameters(net)
        results[name] = statistics.median(timed(lambda avg=avg: avg.update_parameters(net), rounds))
    results["speedup"] = results["python_loop"] / results["fused_lerp"]
    results["parameters"] = sum(p.numel() for p in net.parameters())
    return results


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument(
        "--official", default=None, help="a checkout of ericl122333/PatchDiffusion-Pytorch"
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument(
        "--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="NAME"
    )
    p.add_argument("--no-ema", action="store_true", help="skip the EMA timing")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    results = {"machine": machine(), "threads": torch.get_num_threads()}
    if args.official:
        cls = official_class(Path(args.official))
        results["unet"] = {
            name: compare(cls, name, CONFIGS[name], args.batch, args.rounds)
            for name in args.configs
        }
    else:
        print("no --official checkout given: timing the EMA update only", file=sys.stderr)
    results["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    if not args.no_ema:
        results["ema"] = ema_update_seconds()
    tag = results["cpu_capability"].lower()
    write_json(Path(args.out) / f"unet_speed_{tag}.json", results)
    print(f"machine: {results['machine']}\n")
    if "unet" in results:
        rows = []
        for name, r in results["unet"].items():
            for label in ("forward", "train_step"):
                rows.append(
                    [
                        name,
                        label,
                        f"{r[label]['official seconds']:.3f}",
                        *[
                            f"{r[label][k + ' seconds']:.3f} ({r[label][k + ' ratio']:.3f}x, quartiles "
                            + "-".join(f"{q:.2f}" for q in r[label][k + " ratio quartiles"])
                            + ")"
                            for k in LAYOUTS
                        ],
                    ]
                )
        print(
            markdown_table(
                [
                    f"config (batch {args.batch})",
                    "",
                    "official s (median)",
                    *[f"{k} s (median, and median of per-round ratios)" for k in LAYOUTS],
                ],
                rows,
            )
            + "\n"
        )
        print(
            f"preferred layout on this CPU ({torch.backends.cpu.get_cpu_capability()}): "
            f"{next(iter(results['unet'].values()))['preferred_layout']}"
        )
    if "ema" not in results:
        return
    e = results["ema"]
    print(
        f"EMA update, ImageNet-256 network ({e['parameters'] / 1e6:.1f}M): Python loop {e['python_loop'] * 1e3:.1f} ms, "
        f"fused lerp {e['fused_lerp'] * 1e3:.1f} ms ({e['speedup']:.1f}x)"
    )


if __name__ == "__main__":
    main()
