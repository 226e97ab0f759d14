"""Calibrated paths that hold on new images, for several budgets, in one versioned file.

:func:`calibrate_budgets` splits the calibration images into a fitting part and a validation
part, solves both accurately once (in one batch), and for each budget in ``nfe`` runs
:func:`~pdm.sampling.calibration.calibrate_skip_path` on the fitting images, stopping its time
search where the validation error is least. It then compares the path with every plain setting
of the same NFE (each solver, order, variant and built-in grid) *on the validation images*: when
none of its error gain survives there, the best of those is kept instead (and the report says
so). Each path records its fitted and validation errors under ``settings["calibration"]``.

:class:`PathFile` is the file: ``{"format": "pdm-skip-paths-v2", "calibrated_for": ...,
"paths": {"5": path, "10": path}}``; a file of the first format (one :class:`SkipPath`, written
by ``SkipPath.save``) still loads, as a file with one budget.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from pdm.sampling.calibration import calibrate_skip_path, reference_for, rms
from pdm.sampling.catalog import plain_settings
from pdm.sampling.coefficients import fit_corrections
from pdm.sampling.evaluator import RecallingModel
from pdm.sampling.sampler import sample
from pdm.sampling.skipping import SkipPath
from pdm.sampling.teleport import GaussianData, Teleport
from pdm.schedule import VPSchedule

PATH_FILE_FORMAT = "pdm-skip-paths-v2"


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
def calibrate_budgets(model_fn: Callable[..., Tensor], noise: Tensor, schedule: VPSchedule, budgets: list[int],
                      validation: float = 0.25, steps: int = 100, progress: bool = False, continuous: bool = True,
                      halvings: int = 5, refine_sweeps: int = 4, coefficients: bool = False,
                      weights: Tensor | None = None, time_search: str = "free",
                      solver_for: Callable[[int], dict] | None = None, teleport: Teleport | None = None,
                      **sample_kwargs) -> dict[int, SkipPath]:
    """{nfe: path} for every budget, each fitted on the first images of ``noise`` and checked on
    the rest (see the module docstring). ``sample_kwargs`` describe the fine grid and the solver
    as for :func:`calibrate_skip_path` (``model_kwargs`` rows follow ``noise``). With
    ``coefficients`` each path also learns per-step solver corrections
    (:mod:`pdm.sampling.coefficients`), fitted after its times. ``weights`` (one per row of
    ``noise``; :func:`pdm.sampling.screening.stratified_draw`) make every error a weighted RMS,
    each part's weights normalised to sum to 1; None weighs images equally. ``time_search``
    chooses the continuous search of the times (``free``, ``warp`` or ``warp+free``; see
    :func:`~pdm.sampling.calibration.calibrate_skip_path`). ``solver_for(nfe)`` (e.g.
    :func:`auto_solver`) gives each budget's solver settings, over those of ``sample_kwargs``.
    With ``teleport`` (:class:`~pdm.sampling.teleport.Teleport`) the time search may also move
    each path's first time below t_max, the teleport carrying the images there without the
    network; errors are still measured against the accurate solution from t_max."""
    fit, val = split_rows(noise.shape[0], validation)
    model_fn = RecallingModel(model_fn)  # candidates repeat the current path's calls until they differ
    if weights is not None and weights.shape != (noise.shape[0],):
        raise ValueError(f"need one weight per calibration image ({noise.shape[0]}), got shape {tuple(weights.shape)}")
    w_fit, w_val = (None, None) if weights is None else (_normalised(weights[fit]), _normalised(weights[val]))
    kwargs = dict(sample_kwargs.pop("model_kwargs", None) or {})
    grid_kw = {"skip_type": "logSNR", **sample_kwargs}
    whole = reference_for(model_fn, noise, schedule, steps, progress, model_kwargs=kwargs, **grid_kw)
    fit_ref = whole.rows(fit)
    fit_kw = {k: v[fit] for k, v in kwargs.items()}
    held = _Validation(model_fn, noise[val], schedule, whole.states[-1][val], {k: v[val] for k, v in kwargs.items()},
                       grid_kw, w_val) if val.stop > val.start else None
    fitting = _Validation(model_fn, noise[fit], schedule, fit_ref.states[-1], fit_kw, grid_kw, w_fit)
    paths = {}
    for nfe in sorted(set(budgets)):
        solver = {} if solver_for is None else solver_for(nfe)
        path = calibrate_skip_path(model_fn, noise[fit], schedule, nfe, steps=steps, progress=progress,
                                   reference=fit_ref, model_kwargs=fit_kw, continuous=continuous,
                                   halvings=halvings, refine_sweeps=refine_sweeps, time_search=time_search,
                                   error=lambda a, b: rms(a, b, w_fit),
                                   validate=None if held is None else held.times_error(nfe, solver, teleport),
                                   teleport=teleport, **{**grid_kw, **solver})
        def fit_error(corrections=None) -> float:
            kw = {**grid_kw, **path.sample_kwargs(), "corrections": corrections}
            return rms(sample(model_fn, noise[fit], schedule, model_kwargs=fit_kw, **kw).x, fit_ref.states[-1], w_fit)

        report = {"fit_images": fit.stop - fit.start, "validation_images": val.stop - val.start,
                  "fit_error": fit_error()}
        if coefficients:
            report |= _learn_corrections(path, fit_error, held)
        if held is not None:
            path, report = held.check(path, nfe, report, fitting)
        path.settings["calibration"] = report
        paths[nfe] = path
    return paths


def _normalised(weights: Tensor) -> Tensor | None:
    """Weights summing to 1 (None for an empty part)."""
    if weights.numel() == 0:
        return None
    if (weights < 0).any() or float(weights.sum()) <= 0:
        raise ValueError("calibration weights must be non-negative with a positive sum")
    return weights.double() / weights.double().sum()


def _learn_corrections(path: SkipPath, fit_error: Callable, held: _Validation | None) -> dict:
    """Fit the path's per-step corrections (stored in its settings); the errors before and after."""
    validate = None if held is None else (lambda c: held.error(**{**path.sample_kwargs(), "corrections": c}))
    before = {"fit_error_times_only": fit_error()}
    if held is not None:
        before["validation_error_times_only"] = held.error(**path.sample_kwargs())
    corrections, fitted = fit_corrections(fit_error, path.nfe, validate)
    if any(corrections):
        path.settings["corrections"] = corrections
    return before | {"fit_error": fitted}


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
        run = sample(self.model_fn, self.noise, self.schedule, model_kwargs=self.model_kwargs,
                     **{**self.grid_kw, **kwargs})
        return rms(run.x, self.target, self.weights)

    def times_error(self, nfe: int, solver: dict | None = None,
                    teleport: Teleport | None = None) -> Callable[[Tensor], float]:
        kw = {k: v for k, v in {**self.grid_kw, **(solver or {})}.items()
              if k not in ("skip_type", "steps", "timesteps")} | {"teleport": teleport}
        return lambda times: rms(sample(self.model_fn, self.noise, self.schedule, steps=nfe, timesteps=times,
                                        model_kwargs=self.model_kwargs, **kw).x, self.target, self.weights)

    def check(self, path: SkipPath, nfe: int, report: dict,
              fitting: _Validation | None = None) -> tuple[SkipPath, dict]:
        """The path, or the best plain setting of ``nfe`` steps (every solver, order, variant and
        built-in grid: :func:`~pdm.sampling.catalog.plain_settings`) if that is better on validation.

        The plain setting is chosen on every calibration image (these and the ``fitting`` ones:
        nothing of a plain setting was fitted to them, and 8 validation images alone chose
        settings that lost on new seeds, benchmarks/RESULTS.md); it meets the path on validation."""
        calibrated = self.error(**path.sample_kwargs())
        n_val, n_fit = self.noise.shape[0], 0 if fitting is None else fitting.noise.shape[0]
        plain = {}
        for label, kw in plain_settings(nfe):
            on_val = self.error(**kw)
            on_fit = fitting.error(**kw) if fitting is not None else 0.0
            plain[label] = (((n_val * on_val ** 2 + n_fit * on_fit ** 2) / (n_val + n_fit)) ** 0.5, on_val, kw)
        best = min(plain, key=lambda label: plain[label][0])
        all_images, error, settings = plain[best]
        report |= {"validation_error": calibrated, "builtin_setting": best, "builtin_grid": settings["skip_type"],
                   "builtin_validation_error": error, "builtin_error_all_images": all_images,
                   "builtin_chosen_on": n_val + n_fit, "fallback": calibrated >= error}
        if not report["fallback"]:
            return path, report
        settings = {k: v for k, v in settings.items() if v is not None}
        return SkipPath((True,) * nfe, fill="merge", settings=settings), report


def _with_teleport(path: SkipPath, gaussian: GaussianData | None, name: str) -> SkipPath:
    """The path with its :class:`Teleport` rebuilt from the file's Gaussian, when it teleports."""
    record = path.settings.get("teleport")
    if not record:
        return path
    if gaussian is None or gaussian.digest() != record.get("gaussian_sha256"):
        raise ValueError(f"{name}: a path teleports with a Gaussian the file does not hold")
    return replace(path, teleport=Teleport(gaussian, float(record["guidance_scale"]), int(record["rk_steps"])))


@dataclass
class PathFile:
    """Calibrated paths for several budgets (keyed by NFE) and what they were calibrated for."""

    paths: dict[int, SkipPath]
    calibrated_for: dict[str, Any] = field(default_factory=dict)
    gaussian: GaussianData | None = None  # the data Gaussian of the paths that teleport

    @property
    def budgets(self) -> list[int]:
        return sorted(self.paths)

    def select(self, nfe: int | None, name: str = "the path file") -> SkipPath:
        """The path of ``nfe`` evaluations (None: the only one); a ValueError names the budgets."""
        have = ", ".join(map(str, self.budgets))
        if nfe is None:
            if len(self.paths) == 1:
                return next(iter(self.paths.values()))
            raise ValueError(f"{name} holds paths for {have} NFE; choose one with --steps N")
        if nfe not in self.paths:
            raise ValueError(f"{name} has no path for {nfe} NFE (it holds {have}); pass --steps with one of those, "
                             f"or calibrate {nfe} with calibrate.py --nfe {nfe}")
        return self.paths[nfe]

    def to_json(self) -> str:
        paths = {str(n): p.to_dict() for n, p in sorted(self.paths.items())}
        data = {"format": PATH_FILE_FORMAT, "calibrated_for": self.calibrated_for, "paths": paths}
        if self.gaussian is not None:
            data["gaussian"] = self.gaussian.to_dict()
        return json.dumps(data, indent=1)

    def save(self, path: str | os.PathLike) -> None:
        """Write the file (atomically)."""
        from pdm.atomic import atomic_write_text

        atomic_write_text(path, self.to_json())

    @classmethod
    def from_json(cls, text: str, name: str) -> PathFile:
        """Parse either format; a malformed text is a ValueError naming ``name``."""
        try:
            data = json.loads(text)
            if "format" not in data and "evaluate" in data:  # the first format: one SkipPath
                one = SkipPath.from_dict(data)
                return cls({one.nfe: one}, dict(one.settings.get("calibrated_for") or {}))
            if data.get("format") != PATH_FILE_FORMAT:
                raise ValueError(f"unknown format {data.get('format')!r}")
            made_for = dict(data.get("calibrated_for") or {})
            paths = {int(n): SkipPath.from_dict(p, made_for) for n, p in data["paths"].items()}
            gaussian = GaussianData.from_dict(data["gaussian"]) if "gaussian" in data else None
            paths = {n: _with_teleport(p, gaussian, name) for n, p in paths.items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{name} is not a path file written by calibrate.py: {e}") from None
        if not paths:
            raise ValueError(f"{name} holds no paths")
        return cls(paths, made_for, gaussian)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PathFile:
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            raise ValueError(f"skip path {os.fspath(path)!r} does not exist") from None
        except OSError as e:
            raise ValueError(f"cannot read skip path {os.fspath(path)!r}: {e.strerror}") from None
        return cls.from_json(text, repr(os.fspath(path)))
