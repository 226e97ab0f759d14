"""Replaying a learned schedule, and the one file format that holds them.

A *learned schedule* is what :mod:`pdm.calibration` finds for one model and one budget of
network evaluations: the times at which the network runs, the solver that steps between them,
and optionally learned per-step solver corrections and a teleport (a closed-form start below
t_max). :class:`LearnedSchedule` is one budget; :class:`ScheduleFile` is the file of several
budgets, with what they were calibrated for (checkpoint hashes, guidance scale) and the data
Gaussian of the schedules that teleport.

The file is JSON, ``{"format": "pdm-schedule-v3", "calibrated_for": ..., "schedules": {"10": ...}}``.
Every earlier version loads: ``pdm-skip-paths-v2`` (``"paths"``, each an evaluate mask over a
fine grid and its settings) and the first format (one path, no ``format`` key). A schedule kept
as points of a fine grid (what calibration finds before it frees the times) becomes a plain list
of times once the noise schedule is known (:meth:`LearnedSchedule.settings_for`). An export
(``python -m pdm.checkpoints CKPT OUT.safetensors --schedule FILE``) carries the file's text in
its metadata under :data:`EMBEDDED_KEY`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from pdm.sampling.settings import Settings
from pdm.sampling.skipping import FixedSkip
from pdm.sampling.teleport import GaussianData, Teleport
from pdm.schedule import VPSchedule

SCHEDULE_FORMAT = "pdm-schedule-v3"
READABLE_FORMATS = (
    SCHEDULE_FORMAT,
    "pdm-skip-paths-v2",
    "the first format (one path, no format key)",
)
EMBEDDED_KEY = "pdm_skip_paths"  # safetensors metadata key of an export's schedule file
# the fields of Settings a schedule fixes (the rest, e.g. thresholding, stay the sampler's choice)
REPLAY_FIELDS = (
    "steps",
    "solver",
    "order",
    "method",
    "grid",
    "variant",
    "lower_order_final",
    "t_start",
    "t_end",
    "timesteps",
    "corrections",
)
# what the sampler's keyword form meant when an old file left a setting out
_OLD_DEFAULTS = {
    "solver": "dpmsolver++",
    "order": 2,
    "method": "multistep",
    "skip_type": "time_uniform",
}


@dataclass(frozen=True)
class LearnedSchedule:
    """One budget's learned schedule.

    Attributes:
        settings: the replay settings (steps = the budget, ``timesteps`` the learned times, the
            solver, ``corrections``, ``teleport``).
        grid_points: for a schedule kept on a fine grid, the indices of the evaluated points of
            ``settings.steps`` steps of ``settings.grid`` (None for a list of times).
        calibration: the calibration's report (fit, validation and best plain errors).
        calibrated_for: checkpoint hashes, files and guidance scale it was calibrated for.
    """

    settings: Settings
    grid_points: tuple[int, ...] | None = None
    calibration: dict[str, Any] = field(default_factory=dict, compare=False)
    calibrated_for: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def nfe(self) -> int:
        """Network evaluations of one replay (not counting ``denoise_to_zero``)."""
        if self.grid_points is not None:
            return len(self.grid_points)
        skip = self.settings.skip
        return skip.nfe if isinstance(skip, FixedSkip) else self.settings.steps

    @property
    def teleport(self) -> Teleport | None:
        return self.settings.teleport

    def settings_for(self, schedule: VPSchedule | None = None) -> Settings:
        """The replay settings; a schedule of fine-grid points needs the noise ``schedule`` to
        become its list of times."""
        if self.grid_points is None:
            return self.settings
        if schedule is None:
            raise ValueError(
                f"this schedule keeps {self.nfe} points of a {self.settings.steps}-step "
                f"{self.settings.grid} grid; pass the noise schedule to settings_for(schedule)"
            )
        s = self.settings
        fine = schedule.timesteps(s.steps, s.grid, s.t_start, s.t_end, dtype=torch.float64)
        times = fine[[*self.grid_points, s.steps]]
        return replace(s, steps=self.nfe, timesteps=times)

    def sample_kwargs(self, schedule: VPSchedule | None = None) -> dict[str, Any]:
        """The keyword form of :func:`pdm.sampling.sample` that replays this schedule."""
        s = self.settings_for(schedule)
        kw = {name: getattr(s, name) for name in REPLAY_FIELDS if getattr(s, name) is not None}
        kw["skip_type"], kw["solver_type"] = kw.pop("grid"), kw.pop("variant", None)
        if s.timesteps is not None:
            kw["timesteps"] = torch.tensor(s.timesteps, dtype=torch.float64)
        return kw | {k: getattr(s, k) for k in ("teleport", "skip") if getattr(s, k) is not None}

    def check_calibrated_for(
        self,
        checkpoints: list[str],
        guidance_scale: float,
        files: list[str] | None = None,
        name: str = "the schedule",
    ) -> None:
        """Refuse (ValueError, one line naming both sides) to replay a schedule calibrated for
        other checkpoints (sha256 of the files) or another guidance scale. A schedule without a
        record (made by hand) is accepted."""
        made = self.calibrated_for
        if not made:
            return

        def short(hashes) -> str:
            return ", ".join(f"{h[:8]}..." for h in hashes)

        old = sorted(made.get("checkpoints") or [])
        if old and old != sorted(checkpoints):
            where = " ".join(made.get("files") or []) or "another checkpoint"
            raise ValueError(
                f"{name} was calibrated for {where} (sha256 {short(old)}), not {' '.join(files or [])} "
                f"(sha256 {short(sorted(checkpoints))}); calibrate this checkpoint, or pass "
                "--force-schedule to replay it anyway"
            )
        scale = made.get("guidance_scale")
        if scale is not None and float(scale) != float(guidance_scale):
            raise ValueError(
                f"{name} was calibrated at --guidance-scale {scale}, not {guidance_scale}; calibrate at "
                f"{guidance_scale}, sample at {scale}, or pass --force-schedule to replay it anyway"
            )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of one budget (a teleport by its record; the file stores its Gaussian)."""
        s = self.settings
        out: dict[str, Any] = {
            name: _plain(getattr(s, name)) for name in REPLAY_FIELDS if getattr(s, name) is not None
        }
        if self.grid_points is not None:
            out["grid_points"] = list(self.grid_points)
        if isinstance(s.skip, FixedSkip):
            out["skip"] = {
                "evaluate": list(s.skip.evaluate),
                "fill": s.skip.fill,
                "forecast_order": s.skip.forecast_order,
            }
        if s.teleport is not None:
            out["teleport"] = s.teleport.record()
        return {"settings": out, "calibration": self.calibration}

    @classmethod
    def from_dict(cls, data: dict, calibrated_for: dict | None = None) -> LearnedSchedule:
        """Inverse of :meth:`to_dict` (a teleporting schedule needs its file: :class:`ScheduleFile`)."""
        return _from_v3(data, dict(calibrated_for or {}), None, "a schedule")

    @classmethod
    def load(cls, path: str | os.PathLike, nfe: int | None = None) -> LearnedSchedule:
        """The schedule of ``nfe`` evaluations in a schedule file of any version (None: its only one)."""
        return ScheduleFile.load(path).select(nfe, repr(os.fspath(path)))

    def save(self, path: str | os.PathLike) -> None:
        """Write a schedule file holding this one budget (atomically)."""
        gaussian = self.teleport.data if self.teleport is not None else None
        ScheduleFile({self.nfe: self}, dict(self.calibrated_for), gaussian).save(path)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _from_v3(
    data: dict, made_for: dict, gaussian: GaussianData | None, name: str
) -> LearnedSchedule:
    raw = dict(data["settings"])
    skip = raw.pop("skip", None)
    points = raw.pop("grid_points", None)
    record = raw.pop("teleport", None)
    unknown = sorted(set(raw) - set(REPLAY_FIELDS))
    if unknown:
        raise ValueError(f"unknown schedule settings {', '.join(unknown)}")
    settings = Settings(
        **raw,
        skip=None
        if skip is None
        else FixedSkip(tuple(skip["evaluate"]), skip["fill"], int(skip["forecast_order"])),
        teleport=_teleport(record, gaussian, name),
    )
    return LearnedSchedule(
        settings,
        None if points is None else tuple(int(p) for p in points),
        dict(data.get("calibration") or {}),
        made_for,
    )


def _from_v2(
    data: dict, made_for: dict, gaussian: GaussianData | None, name: str
) -> LearnedSchedule:
    """A path of the first two formats: an evaluate mask over a fine grid and the sampler keywords
    it replayed with (missing ones meant the sampler's defaults of that time)."""
    raw = dict(data.get("settings") or {})
    made_for = dict(raw.get("calibrated_for") or made_for)
    evaluate = tuple(bool(e) for e in data["evaluate"])
    if not evaluate or not evaluate[0]:
        raise ValueError("a path must evaluate its first step")
    kw = {k: raw.get(k, default) for k, default in _OLD_DEFAULTS.items()}
    settings = Settings(
        steps=len(evaluate),
        solver=kw["solver"],
        order=kw["order"],
        method=kw["method"],
        grid=kw["skip_type"] or _OLD_DEFAULTS["skip_type"],
        variant=raw.get("solver_type"),
        corrections=raw.get("corrections"),
        teleport=_teleport(raw.get("teleport"), gaussian, name),
    )
    calibration = dict(raw.get("calibration") or {})
    fill = data.get("fill", "merge")
    if fill != "merge":  # a fixed skip pattern on its grid (the greedy yardstick's kind)
        skip = FixedSkip(evaluate, fill, int(data.get("forecast_order", 2)))
        return LearnedSchedule(replace(settings, skip=skip), None, calibration, made_for)
    if raw.get("timesteps") is not None:
        times = tuple(float(t) for t in raw["timesteps"])
        if len(times) != sum(evaluate) + 1:
            raise ValueError(
                f"a path's time grid has {len(times)} times for {sum(evaluate)} evaluations"
            )
        return LearnedSchedule(
            replace(settings, steps=len(times) - 1, timesteps=times), None, calibration, made_for
        )
    points = tuple(i for i, e in enumerate(evaluate) if e)
    return LearnedSchedule(settings, points, calibration, made_for)


def _teleport(record: dict | None, gaussian: GaussianData | None, name: str) -> Teleport | None:
    """A schedule's :class:`Teleport`, rebuilt from the file's Gaussian."""
    if not record:
        return None
    if gaussian is None or gaussian.digest() != record.get("gaussian_sha256"):
        raise ValueError(f"{name}: a schedule teleports with a Gaussian the file does not hold")
    return Teleport(gaussian, float(record["guidance_scale"]), int(record["rk_steps"]))


@dataclass
class ScheduleFile:
    """Learned schedules for several budgets (keyed by NFE) and what they were calibrated for."""

    schedules: dict[int, LearnedSchedule]
    calibrated_for: dict[str, Any] = field(default_factory=dict)
    gaussian: GaussianData | None = None  # the data Gaussian of the schedules that teleport

    @property
    def budgets(self) -> list[int]:
        return sorted(self.schedules)

    def select(self, nfe: int | None, name: str = "the schedule file") -> LearnedSchedule:
        """The schedule of ``nfe`` evaluations (None: the only one); a ValueError names the budgets."""
        have = ", ".join(map(str, self.budgets))
        if nfe is None:
            if len(self.schedules) == 1:
                return next(iter(self.schedules.values()))
            raise ValueError(f"{name} holds schedules for {have} NFE; choose one with --steps N")
        if nfe not in self.schedules:
            raise ValueError(
                f"{name} has no schedule for {nfe} NFE (it holds {have}); pass --steps with one of "
                f"those, or calibrate {nfe} with calibrate.py --nfe {nfe}"
            )
        return self.schedules[nfe]

    def to_json(self) -> str:
        schedules = {str(n): s.to_dict() for n, s in sorted(self.schedules.items())}
        data = {
            "format": SCHEDULE_FORMAT,
            "calibrated_for": self.calibrated_for,
            "schedules": schedules,
        }
        if self.gaussian is not None:
            data["gaussian"] = self.gaussian.to_dict()
        return json.dumps(data, indent=1)

    def save(self, path: str | os.PathLike) -> None:
        """Write the file (atomically)."""
        from pdm.atomic import atomic_write_text

        atomic_write_text(path, self.to_json())

    @classmethod
    def from_json(cls, text: str, name: str) -> ScheduleFile:
        """Parse any version; a malformed text is a ValueError naming ``name``."""
        try:
            data = json.loads(text)
            version = data.get("format")
            if version is not None and version not in READABLE_FORMATS:
                raise ValueError(
                    f"its format {version!r} is newer than this pdm reads ({', '.join(READABLE_FORMATS[:2])}"
                    "); upgrade pdm to read it"
                )
            made_for = dict(data.get("calibrated_for") or {})
            gaussian = GaussianData.from_dict(data["gaussian"]) if "gaussian" in data else None
            if version is None and "evaluate" in data:  # the first format: one path
                one = _from_v2(data, made_for, None, name)
                return cls({one.nfe: one}, dict(one.calibrated_for))
            if version == SCHEDULE_FORMAT:
                entries = {
                    int(n): _from_v3(e, made_for, gaussian, name)
                    for n, e in data["schedules"].items()
                }
            else:
                entries = {
                    int(n): _from_v2(e, made_for, gaussian, name) for n, e in data["paths"].items()
                }
        except KeyError as e:  # a field missing: say so in words, not as a bare key
            raise ValueError(
                f"{name} is not a schedule file written by calibrate.py: it has no {e.args[0]!r} "
                "field; make it again with calibrate.py"
            ) from None
        except (TypeError, ValueError, AttributeError) as e:
            raise ValueError(
                f"{name} is not a schedule file written by calibrate.py: {e}"
            ) from None
        if not entries:
            raise ValueError(f"{name} holds no schedules")
        return cls(entries, made_for, gaussian)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ScheduleFile:
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            raise ValueError(f"schedule file {os.fspath(path)!r} does not exist") from None
        except OSError as e:
            raise ValueError(
                f"cannot read schedule file {os.fspath(path)!r}: {e.strerror}"
            ) from None
        return cls.from_json(text, repr(os.fspath(path)))

    @classmethod
    def from_export(cls, path: str | os.PathLike) -> ScheduleFile:
        """The schedule file embedded in a safetensors export; a ValueError when it holds none."""
        from safetensors import safe_open

        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                text = (f.metadata() or {}).get(EMBEDDED_KEY)
        except Exception as e:  # safetensors raises its own error types for a file that is not one
            raise ValueError(f"{os.fspath(path)!r} is not a safetensors export: {e}") from None
        if text is None:
            raise ValueError(
                f"{os.fspath(path)!r} holds no schedules; embed them with python -m pdm.checkpoints CKPT "
                "OUT.safetensors --schedule FILE"
            )
        return cls.from_json(text, f"the schedules embedded in {os.fspath(path)}")
