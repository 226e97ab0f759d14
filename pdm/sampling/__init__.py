"""Sampling: DPM-Solver(++), UniPC, iPNDM, DEIS, DDIM, DDPM; step skipping; guidance and expert
routing; replaying a learned schedule.

Samplers see only a ``model_fn(x, t, **model_kwargs)`` and a schedule, never a network class.
``sample(model_fn, noise, schedule, Settings(...))`` is the whole interface; ``Settings()`` is
the project's default sampler.
"""

from pdm.sampling.catalog import SOLVER_TABLE, SOLVERS, SolverSpec
from pdm.sampling.guidance import classifier_free_guidance, dynamic_threshold, expert_router
from pdm.sampling.learned import LearnedSchedule, ScheduleFile
from pdm.sampling.methods import StepInfo
from pdm.sampling.sampler import METHODS, SampleResult, sample
from pdm.sampling.settings import Settings, check_settings
from pdm.sampling.skipping import AdaptiveSkip, FixedSkip
from pdm.sampling.solvers import singlestep_orders


def __getattr__(name: str):
    """The calibration functions' earlier home: ``from pdm.sampling import calibrate_skip_path``
    still works (they live in :mod:`pdm.calibration`, a room below this one)."""
    if name in ("calibrate_skip_path", "calibrate_budgets", "greedy_skip_path"):
        import pdm.calibration

        return getattr(pdm.calibration, name)
    raise AttributeError(f"module 'pdm.sampling' has no attribute {name!r}")


SkipPath = LearnedSchedule  # the earlier name of a learned schedule (its files still load)
PathFile = ScheduleFile  # the earlier name of the schedule file


__all__ = [
    "AdaptiveSkip",
    "FixedSkip",
    "LearnedSchedule",
    "METHODS",
    "PathFile",
    "SOLVERS",
    "SOLVER_TABLE",
    "SampleResult",
    "ScheduleFile",
    "Settings",
    "SkipPath",
    "SolverSpec",
    "StepInfo",
    "check_settings",
    "classifier_free_guidance",
    "dynamic_threshold",
    "expert_router",
    "sample",
    "singlestep_orders",
]
