"""The patch-size ablation: train P = 1, 2, 4, 8 with the same budget, sample each the same way,
and compare quality with per-step cost and wall time.

    python benchmarks/patch_ablation.py                       # digits, 150 s of training per P
    python benchmarks/patch_ablation.py --max-steps 2000      # equal steps instead of equal time
    python benchmarks/patch_ablation.py --config configs/cifar10_p4.yaml --ref-stats cifar_ref.npz \
        --max-time 3600 --accelerator gpu                     # another dataset: FID against stored stats

Each run is the config's network with only patch_size (and the attention level, placed on the
lowest grid) changed, so the parameter count stays the same. Quality: FD-8x8 for the digits
(offline), FID (Inception weights needed) against --ref-stats otherwise. Writes
benchmarks/results/patch_ablation.{json,png} and one sample grid per P.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning as L
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import HERE, config_module, machine, markdown_table, write_json  # noqa: E402
from pdm.images import save_grid, to_uint8  # noqa: E402
from pdm.metrics import (  # noqa: E402
    FeatureStats,
    digits_fd_baseline,  # noqa: E402
    digits_fd_metric,
    fid_against,
    make_fid,
    measure_step_cost,
)
from pdm.sampling import Settings  # noqa: E402
from pdm.training import EMA  # noqa: E402
from pdm.training.callbacks import sample_images  # noqa: E402


def build_data(cfg: dict):
    import importlib

    path = cfg["data"]["class_path"]
    mod, cls = path.rsplit(".", 1)
    return getattr(importlib.import_module(mod), cls)(**cfg["data"].get("init_args", {}))


def run_one(cfg: dict, patch_size: int, args, out: Path) -> dict:
    net_cfg = cfg["model"]["net"]["init_args"]
    grid = net_cfg["image_size"] // patch_size
    L.seed_everything(0)
    model = config_module(
        args.config,
        patch_size=patch_size,
        attention_resolutions=[grid // 2 ** (len(net_cfg["channel_mult"]) - 1)],
    )
    ema_decay = next(
        (
            c["init_args"].get("decay", 0.999)
            for c in cfg["trainer"].get("callbacks", [])
            if c["class_path"].endswith("EMA")
        ),
        0.999,
    )
    trainer = L.Trainer(
        max_steps=args.max_steps or -1,
        max_time={"seconds": args.max_time} if not args.max_steps else None,
        accelerator=args.accelerator,
        devices=1,
        precision=cfg["trainer"].get("precision", "32-true"),
        gradient_clip_val=cfg["trainer"].get("gradient_clip_val"),
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[EMA(decay=ema_decay)],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=build_data(cfg))
    train_seconds = time.perf_counter() - start
    model.eval()
    t0 = time.perf_counter()
    x, _ = sample_images(
        model, args.num_samples, Settings(steps=args.steps), seed=1
    )  # EMA weights were copied in at train end
    sample_seconds = time.perf_counter() - t0
    images = to_uint8(x)
    save_grid(images[:100], out / f"patch_ablation_P{patch_size}.png", columns=10, scale=2)
    if args.ref_stats:
        quality = {
            "fid": fid_against(
                make_fid(inception_weights=args.inception_weights),
                FeatureStats.load(args.ref_stats),
                images,
            )
        }
    else:
        stats, _ = digits_fd_baseline(args.num_samples)
        quality = {"fd8x8": fid_against(digits_fd_metric(), stats, images)}
    cost = measure_step_cost(
        model.net, 64, model.net.image_size, model.net.in_channels, model.device, iters=3
    )
    return {
        "patch_size": patch_size,
        "parameters": cost["parameters"],
        "train_steps": trainer.global_step,
        "train_seconds": train_seconds,
        "sample_seconds": sample_seconds,
        "step_ms_per_image": cost["ms_per_image"],
        **quality,
    }


def plot(rows: list[dict], key: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (xkey, xlabel) in zip(
        axes,
        (
            ("step_ms_per_image", "per-step cost (ms / image, batch 64)"),
            ("train_steps", "training steps in the budget"),
        ),
    ):
        for r in rows:
            ax.scatter(r[xkey], r[key], s=60)
            ax.annotate(
                f"P={r['patch_size']}", (r[xkey], r[key]), textcoords="offset points", xytext=(6, 4)
            )
        ax.set_xlabel(xlabel)
        ax.set_ylabel(key + " (lower is better)")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(f"patch-size ablation: {machine()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--config", default=str(HERE.parent / "configs" / "digits.yaml"))
    p.add_argument("--patch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument(
        "--max-time", type=float, default=150.0, help="training seconds per run (equal-time budget)"
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="train this many steps instead (equal-step budget)",
    )
    p.add_argument(
        "--num-samples",
        type=int,
        default=200,
        help="samples per P for the quality score (P=1 is slow on CPU)",
    )
    p.add_argument("--steps", type=int, default=20, help="DPM-Solver++(2M) steps for every model")
    p.add_argument(
        "--ref-stats", default=None, help="reference statistics .npz for FID (non-digits data)"
    )
    p.add_argument("--inception-weights", default=None)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    cfg = yaml.safe_load(open(args.config))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for ps in args.patch_sizes:
        print(f"training P={ps} ...", file=sys.stderr, flush=True)
        rows.append(run_one(cfg, ps, args, out))
        write_json(
            out / "patch_ablation.json",
            {"machine": machine(), "settings": vars(args), "rows": rows},
        )
    key = "fid" if args.ref_stats else "fd8x8"
    plot(rows, key, out / "patch_ablation.png")
    budget = f"{args.max_steps} steps" if args.max_steps else f"{args.max_time:.0f} s of training"
    print(
        f"machine: {machine()}; budget {budget} per P; {args.num_samples} samples, DPM-Solver++(2M) {args.steps} steps\n"
    )
    base = next(
        (r["step_ms_per_image"] for r in rows if r["patch_size"] == 1), rows[0]["step_ms_per_image"]
    )
    print(
        markdown_table(
            [
                "P",
                "params",
                "steps trained",
                "train s",
                "step ms/image",
                "cost vs P=1",
                key,
                "sample s",
            ],
            [
                [
                    r["patch_size"],
                    f"{r['parameters'] / 1e6:.2f}M",
                    r["train_steps"],
                    f"{r['train_seconds']:.0f}",
                    f"{r['step_ms_per_image']:.2f}",
                    f"{r['step_ms_per_image'] / base:.3f}",
                    f"{r[key]:.3f}",
                    f"{r['sample_seconds']:.0f}",
                ]
                for r in rows
            ],
        )
    )
    if not args.ref_stats:
        print(
            f"\nreal-vs-real FD-8x8 with {args.num_samples} images: {digits_fd_baseline(args.num_samples)[1]:.3f}"
        )


if __name__ == "__main__":
    main()
