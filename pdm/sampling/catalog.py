"""Every solver pdm offers, one row each: a :class:`SolverSpec` (its orders, methods, variants,
form, end-of-run rule and the multistep step object), read by :func:`pdm.sampling.sample`, the
settings check, calibration and both command lines. Adding a solver is a class and a row here.

The step objects drive :func:`pdm.sampling.methods.multistep`: ``predict`` takes one step from the
newest past point to the next, ``correct`` (UniC) redoes it once the new output is known. Their
maths lives in :mod:`pdm.sampling.solvers`, except DEIS's, which is a few lines and lives with
its class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pdm.sampling.solvers import (
    TimePoint,
    ddpm_update,
    first_order_update,
    ipndm_update,
    multistep_second_update,
    multistep_third_update,
    unipc_correct,
    unipc_predict,
)
from pdm.schedule import SKIP_TYPES, VPSchedule


class MultistepSolver:
    """A multistep solver: which update to take at step i, and whether it corrects (UniC).

    Subclasses set ``data`` (the form of the outputs they consume) and implement ``predict``.
    ``order_at(i, steps)`` warms up as 1, 2, ..., ``order`` and, with ``lower_order_final``,
    lowers the order of the last steps as the solver's official code does.
    """

    data: bool = True
    corrects: bool = False

    def __init__(self, order: int, lower_order_final: bool) -> None:
        self.order, self.lower_order_final = order, lower_order_final

    def order_at(self, i: int, steps: int) -> int:
        """The order of step i (1-based) of ``steps``."""
        order = min(self.order, i)
        if self.lower_order_final and steps < 10:  # the official DPM-Solver rule
            order = min(order, steps + 1 - i)
        return order

    def predict(
        self,
        x: Tensor,
        points: Sequence[TimePoint],
        outputs: Sequence[Tensor],
        t: TimePoint,
        order: int,
        last: bool,
    ) -> Tensor:
        """x at ``t`` from x at points[-1] and the outputs at ``points`` (newest last)."""
        raise NotImplementedError

    def correct(
        self,
        x: Tensor,
        points: Sequence[TimePoint],
        outputs: Sequence[Tensor],
        t: TimePoint,
        m_t: Tensor,
        order: int,
    ) -> Tensor:
        """The step redone with ``m_t``, the output at ``t`` (correcting solvers only)."""
        raise NotImplementedError


class DPMSolverMultistep(MultistepSolver):
    """Multistep DPM-Solver++ (data form) or DPM-Solver (noise form), orders 1-3; DDIM at order 1."""

    def __init__(self, order: int, lower_order_final: bool, data: bool, solver_type: str) -> None:
        super().__init__(order, lower_order_final)
        self.data, self.solver_type = data, solver_type

    def predict(self, x, points, outputs, t, order, last):
        if order == 1:
            return first_order_update(x, points[-1], t, outputs[-1], self.data)
        if order == 2:
            return multistep_second_update(x, points, t, outputs, self.data, self.solver_type)
        return multistep_third_update(x, points, t, outputs, self.data)


class UniPCMultistep(MultistepSolver):
    """UniPC: the predictor UniP-p, then the corrector UniC-p once the next output is known."""

    corrects = True

    def __init__(self, order: int, lower_order_final: bool, variant: str) -> None:
        super().__init__(order, lower_order_final)
        self.variant = variant

    def order_at(self, i: int, steps: int) -> int:
        order = min(self.order, i)
        if self.lower_order_final:  # the official UniPC lowers the final orders at any step count
            order = min(order, steps + 1 - i)
        return order

    def predict(self, x, points, outputs, t, order, last):
        return unipc_predict(x, points, t, outputs, order, self.variant)

    def correct(self, x, points, outputs, t, m_t, order):
        return unipc_correct(x, points, t, outputs, m_t, order, self.variant)


class IPNDM(MultistepSolver):
    """iPNDM of order 1-4 on the noise predictions; like the reference (diff-sampler), it keeps
    its full order to the end, so ``lower_order_final`` does not apply."""

    data = False

    def order_at(self, i: int, steps: int) -> int:
        return min(self.order, i)

    def predict(self, x, points, outputs, t, order, last):
        return ipndm_update(x, points[-1], t, outputs, order)


class DEIS(MultistepSolver):
    """tAB-DEIS of order 1-3 (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with
    Exponential Integrator", ICLR; arXiv 2204.13902, Sec. 4 and Eq. 15).

    In x̄ = x / alpha and rho = sigma / alpha the probability-flow ODE is dx̄ = eps(x, t) drho
    (its linear part solved exactly). tAB fits the Lagrange polynomial in *time t* through the
    last ``order`` noise predictions and integrates it exactly against drho:

        x̄_t = x̄_s + sum_j C_j eps_j,   C_j = int_{s}^{t} l_j(tau) drho(tau),

    with l_j the Lagrange basis on the past times. The weights depend on the grid, not on the
    data, and are computed per step by Gauss-Legendre quadrature in lambda (drho = -e^-lambda
    dlambda; 16 nodes, exact to rounding for the smooth integrand). Order 1 is DDIM. Like the
    reference code it warms up with lower orders and keeps its order to the end.
    """

    data = False
    NODES, WEIGHTS = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(16))

    def __init__(self, order: int, schedule: VPSchedule) -> None:
        super().__init__(order, False)
        self.schedule = schedule
        self._quadrature: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def order_at(self, i: int, steps: int) -> int:
        return min(self.order, i)

    def quadrature(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Gauss-Legendre nodes and weights on ``device``, copied there once (not per step: each
        copy would be a host-to-device transfer and a GPU synchronisation)."""
        if device not in self._quadrature:
            self._quadrature[device] = (self.NODES.to(device), self.WEIGHTS.to(device))
        return self._quadrature[device]

    def coefficients(self, points: Sequence[TimePoint], t: TimePoint) -> Tensor:
        """C_j of the last ``len(points)`` outputs (oldest first) for the step points[-1] -> t, in float64."""
        s = points[-1]
        lam_s, lam_t = s.lambda_.double(), t.lambda_.double()
        nodes, weights = self.quadrature(lam_s.device)
        lam = 0.5 * (lam_t - lam_s) * nodes + 0.5 * (lam_t + lam_s)
        tau = self.schedule.t_of_lambda(lam).double()
        drho = -torch.exp(-lam) * weights * 0.5 * (lam_t - lam_s)  # quadrature weights of drho
        past = torch.stack([p.t.double() for p in points])  # (n,)
        n = past.numel()
        basis = torch.ones(n, tau.numel(), dtype=torch.float64, device=tau.device)
        for j in range(n):
            for m in range(n):
                if m != j:
                    basis[j] = basis[j] * (tau - past[m]) / (past[j] - past[m])
        return basis @ drho

    def predict(self, x, points, outputs, t, order, last):
        s = points[-1]
        coef = self.coefficients(points[-order:], t).to(x.dtype)
        x_bar = x / s.alpha + sum(c * e for c, e in zip(coef, outputs[-order:]))
        return t.alpha * x_bar


class DDPMAncestral(MultistepSolver):
    """DDPM's ancestral sampler on the given grid (first order, stochastic).

    The final step of the chain adds no noise (DDPM Alg. 2, z = 0 at the end): the last grid
    step, or, when the run ends with ``denoise_to_zero``, that noise-free jump to x0.
    """

    def __init__(self, generator: torch.Generator | None, denoise_to_zero: bool = False) -> None:
        super().__init__(1, False)
        self.generator, self.denoise_to_zero = generator, denoise_to_zero

    def predict(self, x, points, outputs, t, order, last):
        return ddpm_update(
            x,
            points[-1],
            t,
            outputs[-1],
            self.generator,
            add_noise=self.denoise_to_zero or not last,
        )


class CorrectedSolver(MultistepSolver):
    """``base`` with its step i's correction scaled by 1 + ``corrections[i]`` (i from 0).

    A multistep step of order p > 1 is the first-order (DDIM) step plus a correction built from
    the older outputs: x_hi = x_1 + (x_hi - x_1); step i takes x_1 + (1 + c_i)(x_hi - x_1), with
    the c_i learned for one model (:mod:`pdm.calibration.coefficients`). c = 0 is the plain
    solver; the first step (order 1) has nothing to rescale."""

    def __init__(self, base: MultistepSolver, corrections: Sequence[float]) -> None:
        super().__init__(base.order, base.lower_order_final)
        self.base, self.corrections = base, [float(c) for c in corrections]
        self.data, self.corrects = base.data, base.corrects
        self.step = 0

    def order_at(self, i: int, steps: int) -> int:
        return self.base.order_at(i, steps)

    def predict(
        self,
        x: Tensor,
        points: Sequence[TimePoint],
        outputs: Sequence[Tensor],
        t: TimePoint,
        order: int,
        last: bool,
    ) -> Tensor:
        i, self.step = self.step, self.step + 1
        x_hi = self.base.predict(x, points, outputs, t, order, last)
        c = self.corrections[i] if i < len(self.corrections) else 0.0
        if order == 1 or c == 0.0:
            return x_hi
        x_1 = first_order_update(x, points[-1], t, outputs[-1], self.data)
        return x_1 + (1.0 + c) * (x_hi - x_1)

    def correct(self, x, points, outputs, t, m_t, order):
        return self.base.correct(x, points, outputs, t, m_t, order)


@dataclass(frozen=True)
class StepOptions:
    """What a row's ``build`` may use to make its step object."""

    order: int
    lower_order_final: bool
    solver_type: str
    schedule: VPSchedule
    generator: torch.Generator | None = None
    denoise_to_zero: bool = False


@dataclass(frozen=True)
class SolverSpec:
    """One solver's facts.

    Attributes:
        name: the ``solver=`` value.
        summary: one line for help texts.
        build: ``StepOptions -> MultistepSolver`` (the multistep method's step object).
        orders: the orders it has (``(1,)``: first order, ``order`` does not apply).
        default_order: the order used when none is given.
        data: True for the data form (outputs converted to x0), False for the noise form (eps).
        methods: the ``method=`` values it runs with (the first is its default).
        variants: its ``solver_type`` values, default first (empty: none).
        deterministic: False for a stochastic sampler (no ODE path to calibrate).
    """

    name: str
    summary: str
    build: Callable[[StepOptions], MultistepSolver]
    orders: tuple[int, ...] = (1, 2, 3)
    default_order: int = 2
    data: bool = True
    methods: tuple[str, ...] = ("multistep",)
    variants: tuple[str, ...] = ()
    deterministic: bool = True

    @property
    def first_order(self) -> bool:
        """Whether the solver has only order 1 (``order`` does not apply)."""
        return self.orders == (1,)


ALL_METHODS = ("multistep", "singlestep", "singlestep_fixed", "adaptive", "per_image")

SOLVER_TABLE: dict[str, SolverSpec] = {
    spec.name: spec
    for spec in (
        SolverSpec(
            "ddim",
            "DDIM (first order, data form)",
            lambda o: DPMSolverMultistep(1, o.lower_order_final, True, o.solver_type),
            orders=(1,),
            default_order=1,
        ),
        SolverSpec(
            "ddpm",
            "DDPM ancestral sampling (stochastic)",
            lambda o: DDPMAncestral(o.generator, o.denoise_to_zero),
            orders=(1,),
            default_order=1,
            deterministic=False,
        ),
        SolverSpec(
            "dpmsolver",
            "DPM-Solver, noise form (Lu et al. 2022)",
            lambda o: DPMSolverMultistep(o.order, o.lower_order_final, False, o.solver_type),
            data=False,
            methods=ALL_METHODS,
            variants=("dpmsolver", "taylor"),
        ),
        SolverSpec(
            "dpmsolver++",
            "DPM-Solver++, data form (Lu et al. 2022b)",
            lambda o: DPMSolverMultistep(o.order, o.lower_order_final, True, o.solver_type),
            methods=ALL_METHODS,
            variants=("dpmsolver", "taylor"),
        ),
        SolverSpec(
            "unipc",
            "UniPC predictor-corrector, data form (Zhao et al. 2023)",
            lambda o: UniPCMultistep(o.order, o.lower_order_final, o.solver_type),
            variants=("bh2", "bh1"),
        ),
        SolverSpec(
            "ipndm",
            "iPNDM, noise form (Zhang & Chen 2023)",
            lambda o: IPNDM(o.order, False),
            orders=(1, 2, 3, 4),
            default_order=4,
            data=False,
            methods=("multistep", "per_image"),
        ),
        SolverSpec(
            "deis",
            "tAB-DEIS, noise form (Zhang & Chen 2023)",
            lambda o: DEIS(o.order, o.schedule),
            default_order=3,
            data=False,
        ),
    )
}
SOLVERS: tuple[str, ...] = tuple(SOLVER_TABLE)
VARIANT_ALIASES = {
    "midpoint": "dpmsolver",
    "heun": "taylor",
}  # diffusers' names for DPM-Solver's variants


def solver_spec(name: str) -> SolverSpec:
    """The row of ``name``, or a ValueError naming the choices."""
    try:
        return SOLVER_TABLE[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}") from None


def all_variants() -> tuple[str, ...]:
    """Every ``solver_type`` value some solver takes (diffusers' aliases included), for CLI choices."""
    found = [v for spec in SOLVER_TABLE.values() for v in spec.variants] + list(VARIANT_ALIASES)
    return tuple(dict.fromkeys(found))


def plain_settings(nfe: int) -> list[tuple[str, dict]]:
    """(label, ``sample`` kwargs) of every plain multistep setting at ``nfe`` steps: each
    deterministic solver at each order it has from 2 (DDIM at 1), in each of its variants, on
    each built-in grid. What a calibrated path must beat before it is kept."""
    out = []
    for spec in SOLVER_TABLE.values():
        if not spec.deterministic:
            continue
        orders = spec.orders if spec.first_order else tuple(o for o in spec.orders if o >= 2)
        for order in orders:
            for variant in spec.variants or (None,):
                for grid in SKIP_TYPES:
                    label = f"{spec.name}-{order}{' ' + variant if variant else ''} {grid}"
                    out.append(
                        (
                            label,
                            {
                                "solver": spec.name,
                                "order": order,
                                "solver_type": variant,
                                "method": "multistep",
                                "steps": nfe,
                                "skip_type": grid,
                            },
                        )
                    )
    return out
