"""Sampling throughput in each precision / compile setting, and what bf16 costs in pixels.

    python benchmarks/sample_throughput.py --device cuda                       # the GPU table
    python benchmarks/sample_throughput.py --device cpu --tiny --batch 2 --steps 2 --variants fp32 bf16   # smoke

For each model (LSUN Church P = 4; the ImageNet-256 expert pair with guidance 1.5) the networks
are built from their configs with random non-zero weights and written as exports, then loaded
exactly as ``sample.py`` loads them (:func:`pdm.checkpoints.load_for_sampling`: precision,
compilation with fixed batch shapes, guidance, expert routing) and sampled with sample.py's
default solver (iPNDM-4, logSNR) at --steps NFE. Each (model, batch, variant) first calls every
network at its batch shape a few times (which compiles, and records CUDA graphs), then samples
--repeats timed batches on the same noise; images/s counts the
timed batches only. The samples of every variant are compared with fp32 eager's: RMS in [-1, 1]
pixel units and the mean absolute difference in 8-bit levels. Results are written after every
row to benchmarks/results/sample_throughput_<device>.json, so a run cut short keeps what it
measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import CONFIGS, HERE, machine, markdown_table, write_json  # noqa: E402
from pdm.checkpoints import EXPORT_FORMAT, SAMPLING_KEYS, load_for_sampling  # noqa: E402
from pdm.images import to_uint8  # noqa: E402
from pdm.nn import UNet  # noqa: E402
from pdm.sampling import sample  # noqa: E402

MODELS = {
    "lsun_church_p4": (["lsun_church_p4"], 1.0),
    "imagenet256_pair_cfg1.5": (["imagenet256_high_noise", "imagenet256_low_noise"], 1.5),
    "digits_cfg1.5": (["digits"], 1.5),
}  # the demo's network: a CPU-sized comparison
GPU_MODELS = ["lsun_church_p4", "imagenet256_pair_cfg1.5"]
# variant -> (precision, compile mode or None)
VARIANTS = {
    "fp32": ("fp32", None),
    "bf16": ("bf16", None),
    "fp32+compile": ("fp32", "default"),
    "bf16+compile": ("bf16", "default"),
    "bf16+compile+cudagraphs": ("bf16", "reduce-overhead"),
    "fp16+compile": ("fp16", "default"),
    "bf16+compile+fusednorm": ("bf16", "default"),  # GroupNorm + SiLU fused (pdm.nn.runtime)
}
TINY = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1)


def write_export(config: str, folder: Path, tiny: bool) -> str:
    """A safetensors export of the config's network with random non-zero weights."""
    from safetensors.torch import save_file

    model = dict(yaml.safe_load((CONFIGS / f"{config}.yaml").read_text())["model"])
    net_cfg = {**model["net"]["init_args"], **(TINY if tiny else {})}
    torch.manual_seed(0)
    net = UNet(**net_cfg)
    with torch.no_grad():  # zero-initialised output layers would make every sample the same
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    net_cfg["channel_mult"] = list(net_cfg["channel_mult"])
    config_json = {
        "net": {"class_path": "pdm.nn.UNet", "init_args": net_cfg},
        **{k: model[k] for k in SAMPLING_KEYS if k in model},
    }
    path = folder / f"{config}.safetensors"
    save_file(
        {f"net.{k}": v.contiguous() for k, v in net.state_dict().items()},
        str(path),
        metadata={"pdm_config": json.dumps(config_json), "format": EXPORT_FORMAT},
    )
    return str(path)


def run_variant(
    paths: list[str],
    guidance: float,
    device: torch.device,
    batch: int,
    variant: str,
    steps: int,
    repeats: int,
) -> tuple[dict, torch.Tensor]:
    """Images/s (timed batches only), the warm-up time, peak memory, and the samples."""
    precision, mode = VARIANTS[variant]
    torch._dynamo.reset()
    from pdm.nn.layers import ResBlock

    # set for every variant (the class attribute is what a network reads while it is traced)
    ResBlock.fused_norm = UNet.fused_norm = variant.endswith("fusednorm")
    loaded = load_for_sampling(paths, guidance, device, precision, mode, batch)
    g = torch.Generator().manual_seed(0)
    shape = (loaded.in_channels, loaded.image_size, loaded.image_size)
    noise = torch.randn((batch, *shape), generator=g).to(device)
    kwargs = (
        {"y": torch.arange(batch, device=device) % loaded.num_classes} if loaded.num_classes else {}
    )

    def once() -> torch.Tensor:
        with torch.no_grad():
            x = sample(
                loaded.model_fn,
                noise,
                loaded.schedule,
                steps=steps,
                solver="ipndm",
                order=4,
                skip_type="logSNR",
                prediction=loaded.prediction,
                model_kwargs=kwargs,
            ).x
        if device.type == "cuda":
            torch.cuda.synchronize()
        return x

    def warm_up() -> None:
        # Every network at its batch shape, three times (CUDA graphs record on the second call
        # and replay from the third): t near 1 reaches the high-noise expert, t near 0 the
        # low-noise one. Far cheaper than a whole warm-up sample, and it compiles the same graphs.
        with torch.no_grad():
            for t in (1.0, 1e-3):
                for _ in range(3):
                    loaded.model_fn(noise, torch.full((batch,), t, device=device), **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    warm_up()
    warmup = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x = once()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    row = {
        "variant": variant,
        "batch": batch,
        "images_per_second": batch / seconds,
        "seconds_per_batch": seconds,
        "warmup_seconds": warmup,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }
    return row, x.float().cpu()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=GPU_MODELS, choices=list(MODELS))
    p.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    p.add_argument(
        "--variants",
        nargs="+",
        default=["fp32", "bf16", "bf16+compile", "bf16+compile+cudagraphs"],
        choices=list(VARIANTS),
    )
    p.add_argument(
        "--cudagraphs-max-batch",
        type=int,
        default=64,
        help="run the CUDA-graph variant only up to this batch (they pay at small batches)",
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="shrink the networks (a smoke run on a CPU)")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    device = torch.device(args.device)
    if "fp32" not in args.variants:
        args.variants = [
            "fp32",
            *args.variants,
        ]  # the reference every other variant is compared with
    results = {
        "machine": machine(),
        "steps": args.steps,
        "solver": "ipndm-4 logSNR",
        "tiny": args.tiny,
        "rows": [],
    }
    out = Path(args.out) / f"sample_throughput_{device.type}{'_tiny' if args.tiny else ''}.json"
    with tempfile.TemporaryDirectory() as tmp:
        exports = {
            name: [write_export(c, Path(tmp), args.tiny) for c in MODELS[name][0]]
            for name in args.models
        }
        # batch outermost: a run cut short has every model at the smaller batch
        for batch in args.batch:
            for name in args.models:
                paths, guidance = exports[name], MODELS[name][1]
                reference = None
                for variant in args.variants:
                    if "cudagraphs" in variant and batch > args.cudagraphs_max_batch:
                        continue
                    row, x = run_variant(
                        paths, guidance, device, batch, variant, args.steps, args.repeats
                    )
                    if reference is None:
                        reference = x
                    row["rms_vs_fp32"] = float((x - reference).pow(2).mean().sqrt())
                    row["mean_abs_8bit_vs_fp32"] = float(
                        (to_uint8(x).astype(float) - to_uint8(reference).astype(float))
                        .__abs__()
                        .mean()
                    )
                    row["model"] = name
                    base = next(
                        r
                        for r in results["rows"] + [row]
                        if r["model"] == name and r["batch"] == batch
                    )
                    row["speedup_vs_fp32"] = row["images_per_second"] / base["images_per_second"]
                    results["rows"].append(row)
                    write_json(out, results)
                    print(
                        f"{name} batch {batch} {variant}: {row['images_per_second']:.1f} images/s "
                        f"({row['speedup_vs_fp32']:.2f}x fp32), RMS vs fp32 {row['rms_vs_fp32']:.2e}, "
                        f"warm-up {row['warmup_seconds']:.1f} s",
                        file=sys.stderr,
                        flush=True,
                    )
    print(f"machine: {results['machine']}; {args.steps} NFE, iPNDM-4 logSNR\n")
    print(
        markdown_table(
            [
                "model",
                "batch",
                "variant",
                "images/s",
                "vs fp32",
                "RMS vs fp32",
                "|Δ| 8-bit",
                "warm-up s",
                "peak GiB",
            ],
            [
                [
                    r["model"],
                    r["batch"],
                    r["variant"],
                    f"{r['images_per_second']:.1f}",
                    f"{r['speedup_vs_fp32']:.2f}x",
                    f"{r['rms_vs_fp32']:.1e}",
                    f"{r['mean_abs_8bit_vs_fp32']:.2f}",
                    f"{r['warmup_seconds']:.1f}",
                    "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}",
                ]
                for r in results["rows"]
            ],
        )
    )


if __name__ == "__main__":
    main()
