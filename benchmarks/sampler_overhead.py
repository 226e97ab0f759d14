"""The sampler's own cost: the time ``sample()`` spends outside the network.

    python benchmarks/sampler_overhead.py [--device cpu|cuda] [--batch 256] [--steps 20]

The digits network (configs/digits.yaml; weights from --ckpt or freshly initialised: the cost
does not depend on them) runs inside a timer; everything else ``sample()`` does (time grid,
coefficients, solver updates, history, conversions) is the overhead. On CUDA the network timer
synchronises, and runs under ``torch.cuda.set_sync_debug_mode("warn")`` count the
device-to-host synchronisations per step of the plain multistep loop. Prints a table and writes
benchmarks/results/sampler_overhead_<device>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import HERE, config_module, machine, markdown_table, write_json  # noqa: E402
from pdm.checkpoints import load_for_sampling, network_model_fn  # noqa: E402
from pdm.nn.runtime import place  # noqa: E402
from pdm.sampling import sample  # noqa: E402

SETTINGS = {
    "iPNDM-4 logSNR (sample.py default)": dict(solver="ipndm", order=4, skip_type="logSNR"),
    "DPM-Solver++(2M) time_uniform": dict(solver="dpmsolver++", order=2, skip_type="time_uniform"),
    "UniPC-3 bh2 logSNR": dict(solver="unipc", order=3, skip_type="logSNR"),
}


def model(ckpt: str | None, device: torch.device):
    """(model_fn, schedule, prediction, shape, num_classes) of the digits network."""
    if ckpt:
        loaded = load_for_sampling([ckpt], device=device)
        return (
            loaded.model_fn,
            loaded.schedule,
            loaded.prediction,
            (loaded.in_channels, loaded.image_size, loaded.image_size),
            loaded.num_classes,
        )
    module = config_module("digits")
    net = place(module.net, device).eval()
    return (
        network_model_fn(net, module.schedule),
        module.schedule,
        module.hparams.target,
        (net.in_channels, net.image_size, net.image_size),
        net.num_classes,
    )


def measure(fn, schedule, prediction, noise, kwargs, device, rounds: int, **settings) -> dict:
    """Median wall time of sample() and of the network calls inside it, over ``rounds`` runs."""
    spent = [0.0]

    def timed_fn(*a, **k):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*a, **k)
        if device.type == "cuda":
            torch.cuda.synchronize()
        spent[0] += time.perf_counter() - t0
        return out

    walls, nets = [], []
    for r in range(rounds + 1):  # the first run warms up
        spent[0] = 0.0
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            sample(
                timed_fn, noise, schedule, prediction=prediction, model_kwargs=kwargs, **settings
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        if r:
            walls.append(time.perf_counter() - t0)
            nets.append(spent[0])
    wall, net = statistics.median(walls), statistics.median(nets)
    return {"wall_seconds": wall, "network_seconds": net, "overhead_fraction": (wall - net) / wall}


def syncs_per_step(fn, schedule, prediction, noise, kwargs, steps: int, **settings) -> float:
    """Device-to-host synchronisations per solver step: counted with CUDA's sync debug mode
    ("warn") at ``steps`` and at 5 steps; the difference divided by the extra steps (the few
    syncs of setting up and of reading the result out do not grow with the steps)."""
    counts = {}
    for n in (5, steps):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with torch.no_grad():
                    sample(
                        fn,
                        noise,
                        schedule,
                        prediction=prediction,
                        model_kwargs=kwargs,
                        steps=n,
                        **settings,
                    )
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[n] = sum("synchroniz" in str(w.message) for w in seen)
    return (counts[steps] - counts[5]) / (steps - 5)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument(
        "--ckpt",
        default=None,
        help="a digits checkpoint (default: the config's network, fresh weights)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    device = torch.device(args.device)
    fn, schedule, prediction, shape, num_classes = model(args.ckpt, device)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn((args.batch, *shape), generator=g).to(device)
    kwargs = {"y": torch.arange(args.batch, device=device) % num_classes} if num_classes else {}
    results = {"machine": machine(), "batch": args.batch, "steps": args.steps, "settings": {}}
    for name, settings in SETTINGS.items():
        r = measure(
            fn,
            schedule,
            prediction,
            noise,
            kwargs,
            device,
            args.rounds,
            steps=args.steps,
            **settings,
        )
        if device.type == "cuda":
            r["syncs_per_step"] = syncs_per_step(
                fn, schedule, prediction, noise, kwargs, args.steps, **settings
            )
        results["settings"][name] = r
        print(
            f"{name}: overhead {100 * r['overhead_fraction']:.2f}% of {r['wall_seconds']:.3f} s",
            file=sys.stderr,
        )
    write_json(Path(args.out) / f"sampler_overhead_{device.type}.json", results)
    print(f"machine: {results['machine']}; digits network, batch {args.batch}, {args.steps} NFE\n")
    header = ["setting", "sample() s", "network s", "outside the network"]
    if device.type == "cuda":
        header.append("device-to-host syncs per step")
    rows = [
        [
            name,
            f"{r['wall_seconds']:.3f}",
            f"{r['network_seconds']:.3f}",
            f"{100 * r['overhead_fraction']:.2f}%",
            *([f"{r['syncs_per_step']:g}"] if device.type == "cuda" else []),
        ]
        for name, r in results["settings"].items()
    ]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
