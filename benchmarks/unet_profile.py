"""Where the U-Net's CPU time goes, by kind of layer, next to the official network's.

    python benchmarks/unet_profile.py --official /path/to/PatchDiffusion-Pytorch [--config "LSUN Church P=8"]
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/unet_profile.py ...   # an AVX2 CPU

Runs torch.profiler over a forward pass and a training step (forward, backward, Adam) of
pdm's network in each memory layout and of the official network (same weights; see
benchmarks/unet_speed.py for --official), after a warm-up, and sums each operator's self CPU
time into kinds: convolution (forward and backward), GroupNorm, attention (SDPA or the
official einsum/softmax), layout conversions (copies, contiguous, permutes that copy),
element-wise and the optimiser. Prints milliseconds per kind and writes
benchmarks/results/unet_profile_<capability>.json.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import HERE, machine, markdown_table, write_json  # noqa: E402
from benchmarks.unet_speed import CONFIGS, networks, official_class  # noqa: E402

KINDS = {  # first match wins; matched against the lower-cased operator name
    "convolution": ("conv", "mkldnn_convolution", "slow_conv"),
    "group_norm": ("group_norm", "native_group_norm"),
    "attention": (
        "scaled_dot_product",
        "flash_attention",
        "_efficient_attention",
        "einsum",
        "bmm",
        "softmax",
        "baddbmm",
        "matmul",
    ),
    "layout": (
        "copy_",
        "contiguous",
        "clone",
        "_to_copy",
        "cat",
        "constant_pad",
        "pad",
        "reshape",
        "permute",
        "upsample",
        "to_dense",
    ),
    "optimizer": ("adam", "_foreach", "lerp", "addcdiv", "sqrt"),
    "linear": ("addmm", "mm", "linear"),
}


def kind_of(name: str) -> str:
    n = name.lower()
    for kind, keys in KINDS.items():
        if any(k in n for k in keys):
            return kind
    return "element-wise / other"


def profile_ms(fn, repeats: int = 2) -> dict[str, float]:
    """Self CPU milliseconds per kind of one call of ``fn`` (mean of ``repeats``), after a warm-up."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
    out: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        if evt.key.startswith("aten::") or evt.key.startswith("mkldnn") or "Backward" in evt.key:
            out[kind_of(evt.key)] += evt.self_cpu_time_total / 1e3 / repeats
    out["total"] = sum(v for k, v in out.items())
    return dict(out)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument(
        "--official", required=True, help="a checkout of ericl122333/PatchDiffusion-Pytorch"
    )
    p.add_argument("--config", default="LSUN Church P=8", choices=list(CONFIGS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    nets = networks(official_class(Path(args.official)), CONFIGS[args.config])
    x, t = torch.randn(args.batch, 3, 256, 256), torch.full((args.batch,), 500.0)
    results = {
        "machine": machine(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "config": args.config,
        "batch": args.batch,
        "forward": {},
        "train_step": {},
    }
    for name, net in nets.items():
        opt = torch.optim.Adam(net.parameters(), lr=1e-6)

        def forward(net=net):
            net.eval()
            with torch.no_grad():
                net(x, t)

        def train(net=net, opt=opt):
            net.train()
            net(x, t).pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        results["forward"][name] = profile_ms(forward)
        results["train_step"][name] = profile_ms(train, repeats=1)
        print(
            f"{name}: forward {results['forward'][name]['total']:.0f} ms, train step "
            f"{results['train_step'][name]['total']:.0f} ms (profiled self CPU time)",
            file=sys.stderr,
            flush=True,
        )
    write_json(Path(args.out) / f"unet_profile_{results['capability'].lower()}.json", results)
    print(
        f"machine: {results['machine']}; {args.config}, batch {args.batch}; self CPU ms per kind\n"
    )
    for phase in ("forward", "train_step"):
        kinds = sorted({k for r in results[phase].values() for k in r if k != "total"}) + ["total"]
        rows = [[k, *[f"{results[phase][n].get(k, 0.0):.0f}" for n in nets]] for k in kinds]
        print(f"{phase}:\n" + markdown_table(["kind", *nets], rows) + "\n")


if __name__ == "__main__":
    main()
