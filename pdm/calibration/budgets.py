"""Learned schedules that hold on new images, for several budgets: :func:`calibrate_budgets`.

It splits the calibration images into a fitting part and a validation part, solves both
accurately once (in one batch), and for each budget runs
:func:`~pdm.calibration.schedules.calibrate_schedule` on the fitting images, stopping its time
search where the validation error is least. It then compares the schedule with every plain
setting of the same NFE (each solver, order, variant and built-in grid) *on the validation
images*: when none of its gain survives there, the best of those is kept instead (and the report
says so). Each schedule records its fitted and validation errors in ``calibration``. The file
they go into is :class:`pdm.sampling.ScheduleFile`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from pdm.calibration.coefficients import fit_corrections
from pdm.calibration.memory import RecallingModel
from pdm.calibration.reference import reference_for, rms
from pdm.calibration.schedules import calibrate_schedule
from pdm.sampling.catalog import plain_settings
from pdm.sampling.learned import LearnedSchedule
from pdm.sampling.sampler import sample
from pdm.sampling.settings import Settings
from pdm.sampling.teleport import Teleport
from pdm.schedule import VPSchedule

AUTO_SWITCH_NFE = 16


def auto_solver(nfe: int) -> dict:
    """The solver calibrate.py's ``--solver auto`` calibrates for a budget of ``nfe``: iPNDM-3
    below 16 NFE, UniPC-3 (bh1) from 16. Measured on digits (benchmarks/RESULTS.md): on learned
    times iPNDM-3 was the better of the two at 5 and 10 NFE and UniPC-3 bh1 at 20 and 25 NFE
    with and without guidance (at 20 NFE on 48 held-out seeds 0.84x the best plain error against
    iPNDM-3's 1.32x); at 12 and 15 the choice varied with guidance."""
    if nfe < AUTO_SWITCH_NFE:
        return {"solver": "ipndm", "order": 3, "solver_type": None}
    return {"solver": "unipc", "order": 3, "solver_type": "bh1"}


def split_rows(n: int, validation: float) -> tuple[slice, slice]:
    """(fitting rows, validation rows) of ``n`` calibration images: the last ``validation``
    fraction (at least one image when the fraction is positive and n >= 2) validates."""
    if not 0.0 <= validation < 1.0:
        raise ValueError(f"the validation fraction must be in [0, 1), got {validation}")
    held = 0 if validation == 0 or n < 2 else min(n - 1, max(1, round(validation * n)))
    return slice(0, n - held), slice(n - held, n)


@torch.no_grad()  # every error is a float; no run needs a graph
def calibrate_budgets(
    model_fn: Callable[..., Tensor],
    noise: Tensor,
    schedule: VPSchedule,
    budgets: list[int],
    validation: float = 0.25,
    steps: int = 100,
    progress: bool = False,
    continuous: bool = True,
    halvings: int = 5,
    refine_sweeps: int = 4,
    coefficients: bool = False,
    weights: Tensor | None = None,
    time_search: str = "free",
    solver_for: Callable[[int], dict] | None = None,
    teleport: Teleport | None = None,
    **sample_kwargs,
) -> dict[int, LearnedSchedule]:
    """{nfe: schedule} for every budget, each fitted on the first images of ``noise`` and checked
    on the rest (see the module docstring). ``sample_kwargs`` describe the fine grid and the solver
    as for :func:`~pdm.calibration.schedules.calibrate_schedule` (``model_kwargs`` rows follow
    ``noise``). With ``coefficients`` each schedule also learns per-step solver corrections
    (:mod:`pdm.calibration.coefficients`), fitted after its times. ``weights`` (one per row of
    ``noise``; :func:`pdm.calibration.screening.stratified_draw`) make every error a weighted RMS,
    each part's weights normalised to sum to 1; None weighs images equally. ``time_search``
    chooses the continuous search of the times (``free``, ``warp`` or ``warp+free``).
    ``solver_for(nfe)`` (e.g. :func:`auto_solver`) gives each budget's solver settings, over those
    of ``sample_kwargs``. With ``teleport`` (:class:`~pdm.sampling.teleport.Teleport`) the time
    search may also move each schedule's first time below t_max, the teleport carrying the images
    there without the network; errors are still measured against the accurate solution from t_max."""
    fit, val = split_rows(noise.shape[0], validation)
    model_fn = RecallingModel(
        model_fn
    )  # candidates repeat the current path's calls until they differ
    if weights is not None and weights.shape != (noise.shape[0],):
        raise ValueError(
            f"need one weight per calibration image ({noise.shape[0]}), got shape "
            f"{tuple(weights.shape)}"
        )
    w_fit, w_val = (
        (None, None) if weights is None else (_normalised(weights[fit]), _normalised(weights[val]))
    )
    kwargs = dict(sample_kwargs.pop("model_kwargs", None) or {})
    grid_kw = {"skip_type": "logSNR", **sample_kwargs}
    whole = reference_for(
        model_fn, noise, schedule, steps, progress, model_kwargs=kwargs, **grid_kw
    )
    fit_ref = whole.rows(fit)

    def part(rows: slice, target: Tensor, w: Tensor | None) -> _Validation:
        return _Validation(
            model_fn,
            noise[rows],
            schedule,
            target,
            {k: v[rows] for k, v in kwargs.items()},
            grid_kw,
            w,
        )

    fitting = part(fit, fit_ref.states[-1], w_fit)
    held = part(val, whole.states[-1][val], w_val) if val.stop > val.start else None
    recalled = None if teleport is None else RecallingModel(teleport)
    search = dict(
        steps=steps,
        progress=progress,
        reference=fit_ref,
        continuous=continuous,
        halvings=halvings,
        refine_sweeps=refine_sweeps,
        time_search=time_search,
        teleport=teleport,
        error=lambda a, b: rms(a, b, w_fit),
    )
    found = {}
    for nfe in sorted(set(budgets)):
        solver = {} if solver_for is None else solver_for(nfe)
        path = calibrate_schedule(
            model_fn,
            noise[fit],
            schedule,
            nfe,
            model_kwargs=fitting.model_kwargs,
            validate=None if held is None else held.times_error(nfe, solver, recalled),
            **search,
            **{**grid_kw, **solver},
        )
        found[nfe] = _checked(path, schedule, fitting, held, recalled, coefficients)
    return found


def _checked(
    path: LearnedSchedule,
    schedule: VPSchedule,
    fitting: _Validation,
    held: _Validation | None,
    recalled: RecallingModel | None,
    coefficients: bool,
) -> LearnedSchedule:
    """The schedule with its corrections learned (when asked), checked against the plain settings
    on the validation images, and the report of both in its ``calibration``."""

    def fit_error(corrections=None) -> float:
        return fitting.error(**_replay(path, schedule, recalled), corrections=corrections)

    report = {
        "fit_images": fitting.noise.shape[0],
        "validation_images": 0 if held is None else held.noise.shape[0],
        "fit_error": fit_error(),
    }
    if coefficients:
        path, learned = _learn_corrections(path, schedule, recalled, fit_error, held)
        report |= learned
    if held is not None:
        path, report = held.check(path, path.nfe, report, fitting, recalled)
    return replace(path, calibration=report)


def _normalised(weights: Tensor) -> Tensor | None:
    """Weights summing to 1 (None for an empty part)."""
    if weights.numel() == 0:
        return None
    if (weights < 0).any() or float(weights.sum()) <= 0:
        raise ValueError("calibration weights must be non-negative with a positive sum")
    return weights.double() / weights.double().sum()


def _replay(
    path: LearnedSchedule, schedule: VPSchedule, recalled: RecallingModel | None
) -> dict[str, Any]:
    """The keywords that replay ``path``, its teleport answered from the calibration's memory."""
    kw = path.sample_kwargs(schedule)
    return kw | {"teleport": recalled} if "teleport" in kw else kw


def _learn_corrections(
    path: LearnedSchedule,
    schedule: VPSchedule,
    recalled: RecallingModel | None,
    fit_error: Callable,
    held: _Validation | None,
) -> tuple[LearnedSchedule, dict]:
    """The schedule with its per-step corrections fitted, and the errors before and after."""
    replay = _replay(path, schedule, recalled)
    validate = None if held is None else (lambda c: held.error(**{**replay, "corrections": c}))
    before = {"fit_error_times_only": fit_error()}
    if held is not None:
        before["validation_error_times_only"] = held.error(**replay)
    corrections, fitted = fit_corrections(fit_error, path.nfe, validate)
    if any(corrections):
        path = replace(
            path,
            settings=replace(path.settings_for(schedule), corrections=corrections),
            grid_points=None,
        )
    return path, before | {"fit_error": fitted}


@dataclass
class _Validation:
    """The validation images, their accurate end states, and the errors of paths and grids there."""

    model_fn: Callable[..., Tensor]
    noise: Tensor
    schedule: VPSchedule
    target: Tensor
    model_kwargs: dict[str, Tensor]
    grid_kw: dict[str, Any]
    weights: Tensor | None = None

    def error(self, **kwargs) -> float:
        run = sample(
            self.model_fn,
            self.noise,
            self.schedule,
            model_kwargs=self.model_kwargs,
            **{**self.grid_kw, **kwargs},
        )
        return rms(run.x, self.target, self.weights)

    def times_error(
        self, nfe: int, solver: dict | None = None, teleport: Teleport | None = None
    ) -> Callable[[Tensor], float]:
        kw = {
            k: v
            for k, v in {**self.grid_kw, **(solver or {})}.items()
            if k not in ("skip_type", "steps", "timesteps")
        } | {"teleport": teleport}
        return lambda times: rms(
            sample(
                self.model_fn,
                self.noise,
                self.schedule,
                steps=nfe,
                timesteps=times,
                model_kwargs=self.model_kwargs,
                **kw,
            ).x,
            self.target,
            self.weights,
        )

    def check(
        self,
        path: LearnedSchedule,
        nfe: int,
        report: dict,
        fitting: _Validation | None = None,
        recalled: RecallingModel | None = None,
    ) -> tuple[LearnedSchedule, dict]:
        """The path, or the best plain setting of ``nfe`` steps (every solver, order, variant and
        built-in grid: :func:`~pdm.sampling.catalog.plain_settings`) if that is better on validation.

        The plain setting is chosen on every calibration image (these and the ``fitting`` ones:
        nothing of a plain setting was fitted to them, and 8 validation images alone chose
        settings that lost on new seeds, benchmarks/RESULTS.md); it meets the path on validation."""
        calibrated = self.error(**_replay(path, self.schedule, recalled))
        n_val, n_fit = self.noise.shape[0], 0 if fitting is None else fitting.noise.shape[0]
        plain = {}
        for label, kw in plain_settings(nfe):
            on_val = self.error(**kw)
            on_fit = fitting.error(**kw) if fitting is not None else 0.0
            plain[label] = (
                ((n_val * on_val**2 + n_fit * on_fit**2) / (n_val + n_fit)) ** 0.5,
                on_val,
                kw,
            )
        best = min(plain, key=lambda label: plain[label][0])
        all_images, error, settings = plain[best]
        report |= {
            "validation_error": calibrated,
            "builtin_setting": best,
            "builtin_grid": settings["skip_type"],
            "builtin_validation_error": error,
            "builtin_error_all_images": all_images,
            "builtin_chosen_on": n_val + n_fit,
            "fallback": calibrated >= error,
        }
        if not report["fallback"]:
            return path, report
        return LearnedSchedule(
            Settings.from_keywords(**{k: v for k, v in settings.items() if v is not None})
        ), report
