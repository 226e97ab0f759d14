"""What changes the pixels of a sampling run, in one object: :class:`Settings`.

The command line builds it, ``run.json`` records it, a learned schedule replays it and
:func:`pdm.sampling.sample` takes it. ``Settings()`` is the one default sampler of the project
(iPNDM-4 on the logSNR grid, 20 steps: the most accurate 20-step setting on both benchmark
models, benchmarks/RESULTS.md); ``sample()``, ``sample.py`` and the training callbacks all use it.

Two names of DPM-Solver's code live on in the keyword form of ``sample()``: ``skip_type`` (the
time grid, here ``grid``) and ``solver_type`` (the solver's variant, here ``variant``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from pdm.objectives import TARGETS
from pdm.sampling.catalog import ALL_METHODS, SOLVERS, VARIANT_ALIASES, solver_spec
from pdm.sampling.skipping import AdaptiveSkip, FixedSkip
from pdm.schedule import SKIP_TYPES

KEYWORD_NAMES = {"skip_type": "grid", "solver_type": "variant"}  # keyword form -> field


@dataclass(frozen=True)
class Settings:
    """A sampler, fully described.

    Attributes:
        steps: solver steps (multistep) or network evaluations (singlestep); the adaptive
            methods choose their own.
        solver: a row of :data:`pdm.sampling.SOLVER_TABLE`.
        order: the solver's order; None takes its row's default (iPNDM 4, DEIS 3, others 2).
        method: ``multistep``, ``singlestep``, ``singlestep_fixed``, ``adaptive`` (DPM-Solver-12/23,
            one step size for the batch, as the official code) or ``per_image`` (each image its
            own step size, :mod:`pdm.sampling.per_image`).
        grid: the time grid (``time_uniform``, ``logSNR``, ``time_quadratic``, ``edm``) unless
            ``timesteps`` is given.
        variant: ``dpmsolver``/``taylor`` for DPM-Solver, ``bh1``/``bh2`` for UniPC; None: the default.
        lower_order_final: lower the last steps' order as each solver's official code does.
        denoise_to_zero: finish with x = x0(x, t_end), one more evaluation.
        t_start, t_end: the ends of the grid (None: the schedule's).
        timesteps: an explicit decreasing grid of steps + 1 times (a learned schedule's).
        thresholding, threshold_ratio, threshold_max: dynamic thresholding of x0.
        skip: step skipping (:class:`AdaptiveSkip`, :class:`FixedSkip`) or None.
        corrections: learned per-step scalings of the multistep correction (a learned schedule's).
        teleport: a callable carrying t_max noise to the grid's first time without the network
            (:class:`pdm.sampling.teleport.Teleport`, a learned schedule's).
        atol, rtol, h_init: tolerances and first step (in lambda) of the adaptive methods.
        max_nfe: the per-image method's cap on network evaluations per image (None: no cap).
        estimator: the per-image method's error estimate: ``singlestep`` (DPM-Solver's embedded
            pairs) or ``multistep`` (consecutive orders over each image's own history).
    """

    steps: int = 20
    solver: str = "ipndm"
    order: int | None = None
    method: str = "multistep"
    grid: str = "logSNR"
    variant: str | None = None
    lower_order_final: bool = True
    denoise_to_zero: bool = False
    t_start: float | None = None
    t_end: float | None = None
    timesteps: tuple[float, ...] | None = None
    thresholding: bool = False
    threshold_ratio: float = 0.995
    threshold_max: float = 1.0
    skip: AdaptiveSkip | FixedSkip | None = None
    corrections: tuple[float, ...] | None = None
    teleport: Any = field(default=None, compare=False)
    atol: float = 0.0078
    rtol: float = 0.05
    h_init: float = 0.05
    max_nfe: int | None = None
    estimator: str = "singlestep"

    def __post_init__(self) -> None:
        if self.timesteps is not None and not isinstance(self.timesteps, tuple):
            object.__setattr__(self, "timesteps", _floats(self.timesteps))
        if self.corrections is not None:
            object.__setattr__(
                self, "corrections", tuple(float(c) for c in self.corrections) or None
            )

    @classmethod
    def from_keywords(cls, base: Settings | None = None, **keywords: Any) -> Settings:
        """``base`` (default: ``Settings()``) with the given fields replaced; the keyword form's
        names ``skip_type`` and ``solver_type`` are accepted for ``grid`` and ``variant``."""
        fields = {}
        for key, value in keywords.items():
            name = KEYWORD_NAMES.get(key, key)
            if name in fields:
                raise ValueError(f"{key}= and {name}= name the same setting; give one")
            fields[name] = value
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"sample() got unexpected settings {', '.join(unknown)}")
        return dataclasses.replace(base or cls(), **fields)

    @property
    def nfe(self) -> int:
        """Network evaluations per image of a fixed-grid run (denoise_to_zero adds one)."""
        return self.steps + int(self.denoise_to_zero)

    def resolved(self, prediction: str = "eps") -> Settings:
        """These settings with the order and the variant filled in from the solver's row; a
        ValueError naming the fix for any unusable combination."""
        variant = check_settings(
            self.solver, self.method, self.order, self.steps, self.grid, prediction, self.variant
        )
        spec = solver_spec(self.solver)
        order = (
            1 if spec.first_order else (spec.default_order if self.order is None else self.order)
        )
        _check_options(self, order)
        return dataclasses.replace(self, order=order, variant=variant if spec.variants else None)

    def record(self) -> dict[str, Any]:
        """The JSON form ``run.json`` keeps (a teleport by its description, skipping by its fields)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "skip" and value is not None:
                value = {"kind": type(value).__name__, **dataclasses.asdict(value)}
            elif f.name == "teleport" and value is not None:
                value = repr(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


def _floats(values: Any) -> tuple[float, ...]:
    """A grid as a tuple of Python floats (a tensor of either precision converts exactly)."""
    import torch

    if isinstance(values, torch.Tensor):
        return tuple(values.detach().double().cpu().flatten().tolist())
    return tuple(float(v) for v in values)


def _check_options(s: Settings, order: int) -> None:
    """The checks that involve more than the solver's row."""
    if s.corrections and s.method != "multistep":
        raise ValueError("learned corrections apply to the multistep method only")
    if s.skip is not None and s.method in ("adaptive", "per_image"):
        raise ValueError(
            "step skipping cannot be combined with an adaptive step-size method; use multistep or "
            "singlestep"
        )
    if s.teleport is not None and s.method in ("adaptive", "per_image"):
        raise ValueError(
            "a teleport starts a fixed grid; it cannot be combined with an adaptive method"
        )
    if s.method == "per_image":
        top = 4 if s.solver == "ipndm" else 3
        if not 2 <= order <= top:
            raise ValueError(
                f"the per-image method compares two consecutive orders: use order 2 to {top}, "
                f"got {order}"
            )
        if s.solver == "ipndm" and s.estimator != "multistep":
            raise ValueError(
                "per-image iPNDM estimates its error with its own orders: use estimator='multistep'"
            )
    if s.estimator not in ("singlestep", "multistep"):
        raise ValueError(f"unknown estimator {s.estimator!r}; choose singlestep or multistep")
    if s.max_nfe is not None and s.method != "per_image":
        raise ValueError(
            "max_nfe (--max-nfe) caps per-image steps only; add method per_image "
            "(--method per_image) or drop it"
        )
    for name in ("atol", "rtol", "h_init"):
        value = getattr(s, name)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value}")
    if s.max_nfe is not None and s.max_nfe < (order if s.estimator == "singlestep" else 1):
        raise ValueError(
            f"max_nfe must be at least {order} (one try of order {order}), got {s.max_nfe}"
        )


def check_settings(
    solver: str = "ipndm",
    method: str = "multistep",
    order: int | None = None,
    steps: int = 20,
    skip_type: str = "logSNR",
    prediction: str = "eps",
    solver_type: str | None = None,
) -> str:
    """Raise a ValueError naming the fix for any unusable combination; return the variant to use."""
    spec = solver_spec(solver)
    if method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(ALL_METHODS)}")
    if method not in spec.methods:
        owners = [name for name in SOLVERS if method in solver_spec(name).methods]
        raise ValueError(
            f"method {method!r} exists only for {' and '.join(owners)}; {solver} is multistep"
        )
    if skip_type not in SKIP_TYPES:
        raise ValueError(f"unknown grid {skip_type!r}; choose one of {', '.join(SKIP_TYPES)}")
    if prediction not in TARGETS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(TARGETS)}")
    order = spec.default_order if order is None else order
    if spec.first_order:
        order = 1  # first-order samplers: the order argument does not apply
    elif order not in spec.orders:
        orders = spec.orders
        raise ValueError(
            f"order must be {', '.join(map(str, orders[:-1]))} or {orders[-1]} for {solver}, got {order}"
        )
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if method == "singlestep_fixed" and steps < order:
        raise ValueError(
            f"singlestep_fixed of order {order} needs at least {order} steps, got {steps}; "
            "raise --steps or lower --order"
        )
    if method == "adaptive" and order not in (2, 3):
        raise ValueError("the adaptive method is DPM-Solver-12 or -23: use order 2 or 3")
    if not spec.variants:  # no variants: a DPM-Solver variant name is accepted and ignored
        if solver_type not in (None, *solver_spec("dpmsolver").variants, *VARIANT_ALIASES):
            raise ValueError(
                f"solver_type {solver_type!r} does not apply to {solver}; leave it unset"
            )
        return "dpmsolver"
    if solver_type is None:
        return spec.variants[0]
    canonical = (
        VARIANT_ALIASES.get(solver_type, solver_type)
        if "dpmsolver" in spec.variants
        else solver_type
    )
    if canonical not in spec.variants:
        raise ValueError(
            f"unknown solver_type {solver_type!r} for {solver}; choose one of {', '.join(spec.variants)}"
        )
    return canonical
