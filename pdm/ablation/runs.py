"""One run of an ablation: a (value, seed) with its own folder, and the train.py process that
trains it (resumed when its folder holds one, signals passed on, a marker when it is done)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pdm.ablation.configs import get_key
from pdm.atomic import atomic_write_text

TRAIN_PY = Path(__file__).resolve().parents[2] / "train.py"


@dataclass
class Run:
    """One (value, seed) of an ablation: its folder, steps (None under a time budget), the config
    overlay train.py layers last, and the config it trains (base + overlay)."""

    key: str
    value: object
    seed: int
    folder: Path
    steps: int | None
    overlay: dict
    config: dict
    forced: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The run's name in the report: the value, then ``/seed{s}`` for repeats."""
        return str(self.value) if self.seed == 0 else f"{self.value}/seed{self.seed}"

    @property
    def patch_size(self) -> int:
        return int(self.config["model"]["net"]["init_args"].get("patch_size", 1))


def folder_name(key: str, value, seed: int) -> str:
    """``P4``, ``P4_seed1``, ``target-eps``, ``target-eps_seed2``."""
    name = f"P{value}" if key == "patch_size" else f"{key.split('.')[-1]}-{value}"
    return name if seed == 0 else f"{name}_seed{seed}"


def finished(run: Run) -> bool:
    """Whether a run reached its budget (its driver-written marker)."""
    return (run.folder / "ablation_done.json").exists()


def run_forwarding_signals(cmd: list[str]) -> int:
    """Run ``cmd`` and wait for it; SIGTERM and SIGUSR1 sent to the driver alone (a scheduler that
    signals only the job's first process) are passed on, so train.py saves its step and exits
    128 + signal. SIGINT is not passed on: a terminal's Ctrl-C reaches both already, and a
    second one would stop train.py without saving."""
    import signal

    child = subprocess.Popen(cmd)
    forwarded = [getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name)]
    previous = {}

    def forward(signum, frame):
        if child.poll() is None:
            child.send_signal(signum)

    for num in forwarded:
        previous[num] = signal.signal(num, forward)
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        return child.wait()
    finally:
        for num, handler in previous.items():
            signal.signal(num, handler)


def describe(run: Run) -> str:
    """``P = 4``, ``P = 4, seed 1``, ``model.target = eps, seed 2``."""
    name = "P" if run.key == "patch_size" else run.key
    return f"{name} = {run.value}" + (f", seed {run.seed}" if run.seed else "")


def train(config_path: str, run: Run, extra: list[str]) -> None:
    """One train.py run (resumed when its folder holds one); a failure stops the driver naming it.

    The run's overlay is written to ``FOLDER/ablation.yaml`` and layered last, so train.py
    records the config it ran in the run's own ``config.yaml``; ``FOLDER/ablation_run.json``
    says which setting and seed it is and what the setting forced.
    """
    folder = run.folder
    folder.mkdir(parents=True, exist_ok=True)
    overlay = folder / "ablation.yaml"
    atomic_write_text(overlay, yaml.safe_dump(run.overlay, sort_keys=False))
    atomic_write_text(folder / "ablation_run.json", json.dumps(identity(run), indent=1))
    cmd = [
        sys.executable,
        str(TRAIN_PY),
        "fit",
        "--config",
        config_path,
        *extra,
        "--config",
        str(overlay),
        "--ckpt_path",
        "auto",
    ]
    print(f"ablation: {describe(run)}: {folder}", file=sys.stderr, flush=True)
    code = run_forwarding_signals(cmd)
    if code != 0:
        again = "run the same command again to resume it (finished runs are skipped)"
        if code >= 128:  # a scheduler's signal: the run saved its step; the exit code says so
            print(
                f"python -m pdm.ablation: the run of {describe(run)} was stopped by signal "
                f"{code - 128} and saved; {again}",
                file=sys.stderr,
            )
            raise SystemExit(code)
        raise ValueError(f"the run of {describe(run)} stopped (exit {code}); {again}")
    done = {"steps": run.steps, **identity(run)}
    if run.key == "patch_size":
        done["patch_size"] = run.value
    atomic_write_text(folder / "ablation_done.json", json.dumps(done))


def identity(run: Run) -> dict:
    """Which setting and seed a run is, and what its setting forced."""
    return {
        "key": run.key,
        "value": run.value,
        "seed": run.seed,
        "seed_everything": run.config.get("seed_everything"),
        "shuffle_seed": get_key(run.config, "data.init_args.shuffle_seed"),
        "forced": run.forced,
    }
