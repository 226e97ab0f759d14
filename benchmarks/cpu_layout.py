"""Which memory layout trains a config's network faster on this CPU: contiguous or channels-last.

    python benchmarks/cpu_layout.py --config digits --patch-size 8 4 2
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/cpu_layout.py ...   # AVX2 kernels

One fp32 training step (the module's loss, backward, Adam) of the config's network in each
layout, interleaved round by round (order alternating), after two warm-up steps; reports the
median step time and the median of the per-round contiguous / channels-last ratios (> 1: channels-
last is faster). The evidence behind ``pdm.nn.runtime.preferred_memory_format``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import config_module, machine, markdown_table  # noqa: E402
from pdm.nn.runtime import network_width, preferred_memory_format  # noqa: E402

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def compare(config: str, patch_size: int | None, batch: int, rounds: int) -> dict:
    """Median ms per step in each layout and the median per-round ratio contiguous / channels-last."""
    torch.manual_seed(0)
    override = {} if patch_size is None else {"patch_size": patch_size}
    runs = {}
    for name, layout in LAYOUTS.items():
        module = config_module(config, **override)
        module.net.to(memory_format=layout)
        runs[name] = (module, torch.optim.Adam(module.net.parameters(), lr=1e-4))
    net = runs["contiguous"][0].net
    x0 = torch.rand(batch, net.in_channels, net.image_size, net.image_size) * 2 - 1
    y = torch.randint(0, net.num_classes, (batch,)) if net.num_classes else None

    def step(name: str) -> float:
        module, opt = runs[name]
        t0 = time.perf_counter()
        module.loss_per_sample(x0, module.drop_labels(y))[0].mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for name in runs:
        step(name), step(name)
    times = {name: [] for name in runs}
    for r in range(rounds):
        for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            times[name].append(step(name))
    ratio = statistics.median(a / b for a, b in zip(times["contiguous"], times["channels_last"]))
    chosen = preferred_memory_format("cpu", network_width(net))
    return {
        "config": config,
        "patch_size": net.patch_size,
        "width": network_width(net),
        "batch": batch,
        **{f"{n}_ms": 1000 * statistics.median(v) for n, v in times.items()},
        "contiguous_over_cl": ratio,
        "pdm_chooses": "channels_last" if chosen == torch.channels_last else "contiguous",
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--config", default="digits")
    p.add_argument("--patch-size", type=int, nargs="+", default=[None])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=12)
    args = p.parse_args()
    rows = [compare(args.config, ps, args.batch, args.rounds) for ps in args.patch_size]
    print(f"machine: {machine()}; fp32 training step\n")
    print(
        markdown_table(
            [
                "config",
                "P",
                "widest level",
                "batch",
                "contiguous ms",
                "channels-last ms",
                "contiguous / channels-last",
                "pdm chooses",
            ],
            [
                [
                    r["config"],
                    r["patch_size"],
                    r["width"],
                    r["batch"],
                    f"{r['contiguous_ms']:.0f}",
                    f"{r['channels_last_ms']:.0f}",
                    f"{r['contiguous_over_cl']:.3f}",
                    r["pdm_chooses"],
                ]
                for r in rows
            ],
        )
    )


if __name__ == "__main__":
    main()
