"""What one denoising step costs as the patch size changes (the point of PDM).

    python benchmarks/step_cost.py                 # CPU: fp32, batch 1, all groups
    python benchmarks/step_cost.py --device cuda --bf16 --channels-last [--compile] --batch 16

Groups, each measured side by side in one run:
  lsun256     the official LSUN Church trio (P = 2, 4, 8, ~121M) and a P = 1 model of matched size
  imagenet256 the ImageNet-256 expert (P = 4) at 256^2, the same network at P = 1 on 64^2
              (the paper: same cost) and at P = 1 on 256^2 (same width, 16x the grid)
  cifar32     the CIFAR-10 configs at P = 1/2/4/8 (matched budgets), inference and training steps
Prints tables with ratios, writes benchmarks/results/step_cost.{json,png}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import CONFIGS, HERE, config_module, machine, markdown_table, write_json  # noqa: E402,F401
from pdm.metrics import measure_step_cost  # noqa: E402
from pdm.nn import UNet  # noqa: E402


def from_config(name: str, **override) -> tuple[UNet, dict]:
    """The network of ``configs/{name}.yaml`` (arguments overridden) and its arguments."""
    net = config_module(name, **override).net
    return net, net.config


GROUPS = {
    "lsun256": [
        (
            "P=1 matched (ch 128, 1,1,2,2,4,4)",
            lambda: (
                UNet(
                    image_size=256,
                    patch_size=1,
                    model_channels=128,
                    channel_mult=(1, 1, 2, 2, 4, 4),
                    attention_resolutions=(16, 8),
                ),
                {"image_size": 256, "in_channels": 3, "patch_size": 1},
            ),
        ),
        ("P=2 official", lambda: from_config("lsun_church_p2")),
        ("P=4 official", lambda: from_config("lsun_church_p4")),
        ("P=8 official", lambda: from_config("lsun_church_p8")),
    ],
    "imagenet256": [
        ("P=4 at 256^2", lambda: from_config("imagenet256_high_noise")),
        (
            "P=1 at 64^2 (same net)",
            lambda: from_config("imagenet256_high_noise", patch_size=1, image_size=64),
        ),
        ("P=1 at 256^2 (same width)", lambda: from_config("imagenet256_high_noise", patch_size=1)),
    ],
    "cifar32": [(f"P={p}", (lambda p=p: from_config(f"cifar10_p{p}"))) for p in (1, 2, 4, 8)],
}


def run_group(name: str, args) -> list[dict]:
    """Build the group's models, then measure them round-robin (``--rounds`` times) and keep the
    median: measuring one model after another let warm-up and allocator effects of whichever ran
    first skew the ratios by up to 20% on CPU."""
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    built = []
    for label, build in GROUPS[name]:
        torch.manual_seed(0)
        net, kw = build()
        built.append((label, torch.compile(net) if args.compile else net, kw))
    samples: dict[str, list[dict]] = {label: [] for label, _, _ in built}
    for _ in range(args.rounds):
        for label, net, kw in built:
            samples[label].append(
                measure_step_cost(
                    net,
                    args.batch,
                    kw["image_size"],
                    kw.get("in_channels", 3),
                    args.device,
                    dtype,
                    args.channels_last,
                    train=False,
                    warmup=args.warmup,
                    iters=args.iters,
                )
            )
    rows = []
    for label, net, kw in built:
        runs = sorted(samples[label], key=lambda r: r["ms_per_image"])
        res = runs[len(runs) // 2]
        row = {
            "group": name,
            "model": label,
            "patch_size": kw["patch_size"],
            "image_size": kw["image_size"],
            **res,
            "ms_per_image_all_rounds": [r["ms_per_image"] for r in samples[label]],
        }
        if name == "cifar32":
            tr = measure_step_cost(
                net,
                args.train_batch,
                kw["image_size"],
                3,
                args.device,
                dtype,
                args.channels_last,
                train=True,
                warmup=1,
                iters=args.iters,
            )
            row["train_images_per_second"] = tr["images_per_second"]
        rows.append(row)
        print(
            f"{name:12s} {label:32s} {res['ms_per_image']:10.1f} ms/image",
            file=sys.stderr,
            flush=True,
        )
    return rows


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # e.g. a bare GPU machine: the JSON and the printed tables still come out
        print(f"matplotlib is not installed; not drawing {path}", file=sys.stderr)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, group in zip(axes, ("lsun256", "cifar32")):
        pts = [r for r in rows if r["group"] == group]
        if not pts:
            continue
        ax.bar(
            [f"P={r['patch_size']}" for r in pts],
            [r["ms_per_image"] for r in pts],
            color="tab:blue",
        )
        ax.set_yscale("log")
        ax.set_ylabel("forward ms / image (log)")
        ax.set_title(
            {"lsun256": "LSUN Church 256, ~121M params", "cifar32": "CIFAR-10 32, ~35-40M params"}[
                group
            ]
        )
        for i, r in enumerate(pts):
            ax.text(
                i,
                r["ms_per_image"],
                f"{r['ms_per_image']:.0f}",
                ha="center",
                va="bottom",
                fontsize=8,
            )
    fig.suptitle(f"one denoising step: {machine()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=1, help="timed calls per model per round")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="round-robin rounds over a group's models (median kept)",
    )
    p.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    rows = [r for g in args.groups for r in run_group(g, args)]
    tag = f"{args.device}{'_bf16' if args.bf16 else ''}{'_cl' if args.channels_last else ''}{'_compile' if args.compile else ''}"
    out = Path(args.out)
    write_json(
        out / f"step_cost_{tag}.json", {"machine": machine(), "settings": vars(args), "rows": rows}
    )
    plot(rows, out / f"step_cost_{tag}.png")
    print(
        f"machine: {machine()}; batch {args.batch}, {'bf16' if args.bf16 else 'fp32'}"
        f"{', channels_last' if args.channels_last else ''}{', torch.compile' if args.compile else ''}\n"
    )
    for g in args.groups:
        pts = [r for r in rows if r["group"] == g]
        base = pts[0]["ms_per_image"]
        table = [
            [
                r["model"],
                f"{r['parameters'] / 1e6:.1f}M",
                f"{r['ms_per_image']:.1f}",
                f"{r['images_per_second']:.2f}",
                f"{r['activation_bytes'] / 2**20:.0f}",
                f"{r['ms_per_image'] / base:.3f}",
            ]
            + ([f"{r['train_images_per_second']:.1f}"] if "train_images_per_second" in r else [])
            for r in pts
        ]
        header = [
            "model",
            "params",
            "ms/image",
            "images/s",
            "activation MiB",
            f"cost / {pts[0]['model']}",
        ]
        if g == "cifar32":
            header.append("train images/s")
        print(f"### {g}\n\n" + markdown_table(header, table) + "\n")
    im = {r["model"]: r["ms_per_image"] for r in rows if r["group"] == "imagenet256"}
    if len(im) == 3:
        a, b, c = im["P=4 at 256^2"], im["P=1 at 64^2 (same net)"], im["P=1 at 256^2 (same width)"]
        print(
            f"goal checks: P=4@256 / P=1@64 = {a / b:.3f} (goal <= 1.1); P=1@256 / P=4@256 = {c / a:.1f} (goal >= 8)"
        )


if __name__ == "__main__":
    main()
