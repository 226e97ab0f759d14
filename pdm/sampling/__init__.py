"""Sampling: DPM-Solver(++), UniPC, iPNDM, DEIS, DDIM, DDPM; step skipping; guidance and expert routing.

Samplers see only a ``model_fn(x, t, **model_kwargs)`` and a schedule, never a network class.
"""

from pdm.sampling.catalog import SOLVER_TABLE, SolverSpec
from pdm.sampling.budgets import PathFile, calibrate_budgets
from pdm.sampling.calibration import calibrate_skip_path, greedy_skip_path
from pdm.sampling.guidance import classifier_free_guidance, dynamic_threshold, expert_router
from pdm.sampling.methods import StepInfo
from pdm.sampling.sampler import METHODS, SOLVERS, SampleResult, check_settings, sample
from pdm.sampling.skipping import AdaptiveSkip, SkipPath
from pdm.sampling.solvers import singlestep_orders

__all__ = [
    "AdaptiveSkip",
    "PathFile",
    "METHODS",
    "SOLVERS",
    "SOLVER_TABLE",
    "SolverSpec",
    "SampleResult",
    "SkipPath",
    "StepInfo",
    "calibrate_budgets",
    "calibrate_skip_path",
    "check_settings",
    "classifier_free_guidance",
    "dynamic_threshold",
    "expert_router",
    "greedy_skip_path",
    "sample",
    "singlestep_orders",
]
