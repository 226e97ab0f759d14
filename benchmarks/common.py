"""Helpers shared by the benchmark scripts: models, seeds, references, tables and plots.

Seeds are split by purpose and never shared: images scored in a benchmark use SCORE_SEEDS,
anything tuned or calibrated uses CALIBRATION_SEEDS (a test checks they are disjoint).
"""

from __future__ import annotations

import glob
import json
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from pdm.sampling import classifier_free_guidance, sample
from pdm.schedule import VPSchedule
from pdm.testing import GaussianMixture

HERE = Path(__file__).resolve().parent
SCORE_SEEDS = range(0, 100_000)
CALIBRATION_SEEDS = range(1_000_000, 1_100_000)
CONFIGS = HERE.parent / "configs"


def config_module(config: str | Path, **net_override):
    """The :class:`pdm.training.PDMModule` (network and loss) a training config describes, as
    ``train.py`` builds it but without data or trainer. ``config`` is a name in ``configs/`` or a
    YAML path; ``net_override`` replaces arguments of the network (e.g. ``patch_size=2``)."""
    import yaml

    from pdm.nn import UNet
    from pdm.training import PDMModule

    path = Path(config) if str(config).endswith((".yaml", ".yml")) else CONFIGS / f"{config}.yaml"
    model = dict(yaml.safe_load(path.read_text())["model"])
    net = UNet(**{**model.pop("net")["init_args"], **net_override})
    model.pop(
        "init_from", None
    )  # the ImageNet low-noise expert's starting weights are not needed to build it
    return PDMModule(net, **model)


def machine() -> str:
    """A one-line description of where a benchmark ran."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return (
        f"CPU {cpu_model()} ({cpu_extensions()}; torch kernels {torch.backends.cpu.get_cpu_capability()}), "
        f"{torch.get_num_threads()} threads (torch {torch.__version__})"
    )


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what platform knows)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_extensions() -> str:
    """The vector extensions that decide kernel speed: AVX-512 (and its bf16/VNNI parts), AVX2, AMX."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "extensions unknown"
    names = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags]
    return "+".join(names) or "no AVX2"


@dataclass
class Bench:
    """A model to benchmark samplers on: its function, schedule, prediction and sample shape."""

    name: str
    model_fn: Callable[..., Tensor]
    schedule: VPSchedule
    prediction: str
    shape: tuple[int, ...]
    num_classes: int | None = None
    extra: dict = field(default_factory=dict)

    def noise(self, seeds: range | list[int]) -> Tensor:
        """float64 starting noise, one seed per image."""
        return torch.stack(
            [
                torch.randn(
                    self.shape, generator=torch.Generator().manual_seed(s), dtype=torch.float64
                )
                for s in seeds
            ]
        )

    def kwargs(self, seeds: range | list[int]) -> dict[str, Tensor]:
        """Per-image model arguments (class labels cycle with the seed)."""
        if self.num_classes is None:
            return {}
        return {"y": torch.tensor([s % self.num_classes for s in seeds])}

    def run(self, seeds, **sample_kwargs):
        """sample() on these seeds."""
        with torch.no_grad():
            return sample(
                self.model_fn,
                self.noise(seeds),
                self.schedule,
                prediction=self.prediction,
                model_kwargs=self.kwargs(seeds),
                **sample_kwargs,
            )

    def reference(self, seeds) -> tuple[Tensor, float]:
        """An accurate solution of the ODE and the disagreement of two independent ones (RMS):
        UniPC-3 with 500 logSNR steps, and singlestep DPM-Solver-3 with 1,200 evaluations."""
        a, per_image = self.reference_per_image(seeds)
        return a, float(per_image.pow(2).mean().sqrt())

    def reference_per_image(self, seeds) -> tuple[Tensor, Tensor]:
        """The accurate solution of :meth:`reference` and, per image, the RMS disagreement of the
        two independent solutions: an estimate of the first one's own error, large where the
        trajectory is hard to integrate or the ODE ill-conditioned.

        The second solution must be about as accurate as the first, or the disagreement measures
        it instead: with 600 evaluations singlestep DPM-Solver-3 was ten times less accurate than
        the 500 UniPC-3 steps (digits, 200 images: 1.4e-3 at most from a 1,000-step UniPC-3
        solve, against 8e-5), and the images it found hard were taken for ill-conditioned ones."""
        a = self.run(seeds, steps=500, solver="unipc", order=3, skip_type="logSNR").x
        b = self.run(
            seeds,
            steps=1200,
            solver="dpmsolver",
            order=3,
            method="singlestep_fixed",
            skip_type="logSNR",
        ).x
        return a, per_image_rms(a, b)


def per_image_rms(a: Tensor, b: Tensor) -> Tensor:
    """Each image's RMS difference per pixel (float64, one value per image)."""
    return (a.double() - b.double()).flatten(1).pow(2).mean(1).sqrt()


def rms(a: Tensor, b: Tensor) -> float:
    """RMS difference per pixel."""
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def mixture_bench() -> Bench:
    """The exact Gaussian-mixture model on 3x8x8 'images' (closed-form eps)."""
    schedule = VPSchedule.linear()
    gm = GaussianMixture.random(components=8, shape=(3, 8, 8), std=0.25, seed=0)
    return Bench(
        "mixture", gm.model_fn(schedule), schedule, "eps", (3, 8, 8), extra={"mixture": gm}
    )


def find_digits_checkpoint(explicit: str | None = None) -> str | None:
    """The given checkpoint, else the newest ``last.ckpt`` under runs/digits, else None."""
    if explicit:
        return explicit
    found = sorted(glob.glob("runs/digits/**/last.ckpt", recursive=True), key=os.path.getmtime)
    return found[-1] if found else None


def digits_bench(ckpt: str, guidance_scale: float = 1.0) -> Bench:
    """The trained digits model (EMA weights), optionally with classifier-free guidance."""
    from pdm.checkpoints import load_for_sampling

    loaded = load_for_sampling([ckpt])
    fn = loaded.model_fn
    if guidance_scale != 1.0:
        fn = classifier_free_guidance(fn, guidance_scale, loaded.num_classes)
    name = "digits" if guidance_scale == 1.0 else f"digits_cfg{guidance_scale:g}"
    return Bench(
        name,
        fn,
        loaded.schedule,
        loaded.prediction,
        (loaded.in_channels, loaded.image_size, loaded.image_size),
        loaded.num_classes,
        {"ckpt": ckpt, "guidance_scale": guidance_scale},
    )


def write_json(path: Path, data) -> None:
    """Save results as JSON next to the plot."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured markdown table."""
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def to_uint8(x: Tensor):
    """Samples in [-1, 1] as uint8 NHWC (for the digits FD and classifier)."""
    from pdm.images import to_uint8 as convert

    return convert(x.float())
