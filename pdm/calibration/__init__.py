"""Calibration: learning a schedule (times, solver coefficients, a teleport) for one model.

:func:`calibrate_budgets` is what ``calibrate.py`` runs: one accurate solution of the calibration
images, then for each budget :func:`calibrate_schedule` on the fitting images, early-stopped and
checked on the validation images against every plain setting of the same NFE. The result is a
:class:`pdm.sampling.LearnedSchedule` per budget, saved together in a
:class:`pdm.sampling.ScheduleFile`, which ``sample.py --schedule FILE`` replays.

Rooms: the reference solution (``reference``), the one coordinate search (``search``) behind the
time search (``times``) and the coefficients (``coefficients``), the fine-grid stages and the
greedy yardstick (``grid_points``), one budget (``schedules``), several budgets with validation
(``budgets``), the teleport's Gaussian (``teleport``), screened calibration images
(``screening``), and the memory of repeated calls with the evaluation count (``memory``).
"""

from pdm.calibration.budgets import auto_solver, calibrate_budgets, split_rows
from pdm.calibration.grid_points import greedy_skip_path
from pdm.calibration.memory import CountingModel, RecallingModel
from pdm.calibration.reference import Reference, reference_for, rms
from pdm.calibration.schedules import calibrate_schedule, calibrate_skip_path
from pdm.calibration.teleport import fit_gaussian

__all__ = [
    "CountingModel",
    "RecallingModel",
    "Reference",
    "auto_solver",
    "calibrate_budgets",
    "calibrate_schedule",
    "calibrate_skip_path",
    "fit_gaussian",
    "greedy_skip_path",
    "reference_for",
    "rms",
    "split_rows",
]
