"""The patch-size ablation as researchers run it: one ordinary train.py run per patch size.

    python -m pdm.ablation --config configs/digits.yaml --patch-sizes 1 2 4 8 --budget steps 1000 \\
        --root runs/ablation [--reference REF.npz] [-- TRAIN.PY OVERRIDES ...]

Each P gets its own run folder ``ROOT/P{p}``: the config with only the patch size changed, and
what it forces (the attention stays on the same levels of the U-Net, so every P has the same
parameters), recorded in the run's own ``config.yaml``. A :class:`~pdm.training.QualityMonitor`
scores EMA samples about ten times along each run (FD-8x8 on digits; FID against ``--reference``
otherwise) with the step, images seen, training FLOPs and wall time. Runs resume when the command
is re-run (``--ckpt_path auto``) and finished ones are skipped, so a pre-empted ablation goes on
where it stopped; under SLURM, give each job one ``--only P`` and run ``--report`` once they end.

Budgets, the same for every P: ``steps N`` (equal optimiser steps), ``flops F`` (equal training
FLOPs, counted by ``torch.utils.flop_counter`` on one step of each P; the steps follow), ``time S``
(equal seconds of training, the quality checks not counted; the learning rate does not decay, as
no step count is fixed).
The report, from the runs' quality logs and checkpoints: ``ROOT/ablation.md`` and ``.json`` (per P:
parameters, step cost and memory, steps, FLOPs, seconds, best and final score),
``ROOT/ablation.png`` (quality against steps, training FLOPs and wall time) and
``ROOT/samples.png`` (each P's final EMA samples side by side).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import yaml

from pdm.ablation.configs import check_data, is_digits, load_config, net_for
from pdm.ablation.cost import print_plan, step_cost, step_flops
from pdm.atomic import WriteError, atomic_write_text

BUDGETS = ("steps", "flops", "time")
TRAIN_PY = Path(__file__).resolve().parents[2] / "train.py"


def _parser() -> argparse.ArgumentParser:
    from pdm.cli import parser

    p = parser(__doc__, prog="python -m pdm.ablation")
    p.add_argument("--config", required=True, help="the training config (its P is replaced)")
    p.add_argument("--patch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument(
        "--budget",
        nargs=2,
        metavar=("KIND", "VALUE"),
        required=True,
        help="steps N | flops F | time SECONDS, the same for every P",
    )
    p.add_argument(
        "--root", required=True, help="the ablation's folder: one run folder per P inside"
    )
    p.add_argument(
        "--reference", default=None, help="reference statistics for FID (not needed on digits)"
    )
    p.add_argument(
        "--feature",
        choices=["inception", "digits"],
        default=None,
        help="the score's features: inception (FID; the default, needs --reference) or digits "
        "(FD on 8x8 grey levels; the default on the embedded digits)",
    )
    p.add_argument("--samples", type=int, default=500, help="images per quality check")
    p.add_argument("--checks", type=int, default=10, help="quality checks along each run")
    p.add_argument(
        "--max-cost",
        type=float,
        default=0.1,
        help="the largest share of training time the checks may take (later checks are skipped)",
    )
    p.add_argument("--only", type=int, default=None, help="train this P only (one SLURM job per P)")
    p.add_argument(
        "--report", action="store_true", help="only write the report from the runs so far"
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="only print what each run will cost (counted FLOPs, estimated GPU-hours)",
    )
    p.add_argument("--gpu", default="H100", help="--plan's GPU for the hours (its bf16 peak)")
    p.add_argument(
        "--mfu",
        type=float,
        default=0.3,
        help="--plan's model FLOPs utilisation (0.3: measured for LSUN P = 4, bf16 + compile)",
    )
    return p


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The driver's flags, and train.py overrides after ``--``."""
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    args = _parser().parse_args(argv)
    if args.budget[0] not in BUDGETS:
        raise ValueError(f"--budget {args.budget[0]!r}: choose steps, flops or time")
    try:
        args.value = float(args.budget[1])
    except ValueError:
        raise ValueError(
            f"--budget {args.budget[0]} needs a number, got {args.budget[1]!r}"
        ) from None
    if args.value <= 0:
        raise ValueError("--budget needs a positive value")
    if args.only is not None and args.only not in args.patch_sizes:
        raise ValueError(f"--only {args.only} is not one of --patch-sizes {args.patch_sizes}")
    return args, extra


def quality_feature(config: dict, args: argparse.Namespace) -> str:
    """The quality checks' features (see ``--feature``); a ValueError where they cannot score."""
    feature = args.feature or ("digits" if is_digits(config) else "inception")
    if feature == "digits" and args.reference is None and not is_digits(config):
        raise ValueError(
            "--feature digits on data other than the embedded digits needs --reference: compute it "
            "with `python -m pdm.metrics ref-stats --images DATA --feature digits --out REF.npz`"
        )
    return feature


# replaced by the driver's own quality checks
SAMPLERS = ("pdm.training.SampleGrid", "pdm.training.DigitsFD", "pdm.training.QualityMonitor")


def plan(config: dict, args: argparse.Namespace) -> dict[int, dict]:
    """Per P: its run folder, steps (None under a time budget) and the config overlay of its run.

    The overlay changes the patch size and the attention levels, sets the budget, and swaps the
    config's sample-grid and FD callbacks for one :class:`~pdm.training.QualityMonitor` (so all
    sampling along the run is the monitor's, kept out of the training time it measures).
    """
    kind, out = args.budget[0], {}
    feature = quality_feature(config, args)
    kept = [
        cb
        for cb in (config.get("trainer") or {}).get("callbacks") or []
        if not (isinstance(cb, dict) and cb.get("class_path") in SAMPLERS)
    ]
    for p in args.patch_sizes:
        if args.only not in (None, p):  # one SLURM job per P: count and time only its own
            continue
        net = net_for(config, p)
        steps = None
        if kind == "steps":
            steps = int(args.value)
        elif kind == "flops":
            steps = max(1, math.ceil(args.value / step_flops(config, p)))
        folder = Path(args.root) / f"P{p}"
        expected = steps
        every = None
        if steps is None and (folder / "ablation.yaml").exists():  # a resumed run keeps its checks
            previous = yaml.safe_load((folder / "ablation.yaml").read_text())
            every = previous["trainer"]["callbacks"][-1]["init_args"]["every_n_steps"]
        elif steps is None and not (
            args.report or args.plan
        ):  # a time budget: checks spread by a measured step
            expected = int(args.value / step_cost(config, p, iters=2)["seconds_per_step"])
        every = every or max(1, (expected or 1000) // args.checks)
        monitor = {
            "every_n_steps": every,
            "num_samples": args.samples,
            "feature": feature,
            "reference": args.reference,
            "max_cost": args.max_cost,
        }
        trainer = {"default_root_dir": str(folder), "max_steps": steps or -1}
        overlay = {
            "model": {
                "net": {
                    "init_args": {
                        "patch_size": p,
                        "attention_resolutions": net["attention_resolutions"],
                    }
                }
            },
            "trainer": trainer,
        }
        if steps is None:  # a time budget: no step count for a decay to aim at
            trainer["max_epochs"] = -1
            monitor["max_train_seconds"] = args.value
            overlay["model"]["lr_decay"] = "none"
        trainer["callbacks"] = [
            *kept,
            {"class_path": "pdm.training.QualityMonitor", "init_args": monitor},
        ]
        out[p] = {"folder": folder, "steps": steps, "every": every, "overlay": overlay}
    return out


def finished(run: dict) -> bool:
    """Whether a run reached its budget (its driver-written marker)."""
    return (run["folder"] / "ablation_done.json").exists()


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


def train(config_path: str, run: dict, extra: list[str], patch_size: int) -> None:
    """One train.py run (resumed when its folder holds one); a failure stops the driver naming it.

    The run's overlay is written to ``ROOT/P{p}/ablation.yaml`` and layered last, so train.py
    records the config it ran in the run's own ``config.yaml``.
    """
    folder = run["folder"]
    folder.mkdir(parents=True, exist_ok=True)
    overlay = folder / "ablation.yaml"
    atomic_write_text(overlay, yaml.safe_dump(run["overlay"], sort_keys=False))
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
    print(f"ablation: P = {patch_size}: {folder}", file=sys.stderr, flush=True)
    code = run_forwarding_signals(cmd)
    if code != 0:
        again = "run the same command again to resume it (finished runs are skipped)"
        if code >= 128:  # a scheduler's signal: the run saved its step; the exit code says so
            print(
                f"python -m pdm.ablation: the run of P = {patch_size} was stopped by signal "
                f"{code - 128} and saved; {again}",
                file=sys.stderr,
            )
            raise SystemExit(code)
        raise ValueError(f"the run of P = {patch_size} stopped (exit {code}); {again}")
    atomic_write_text(
        folder / "ablation_done.json", json.dumps({"patch_size": patch_size, "steps": run["steps"]})
    )


def main(argv: list[str] | None = None) -> dict | None:
    """Train what is missing, then write the report."""
    from pdm.cli import fail

    try:
        args, extra = parse_args(argv)
        config = load_config(args.config, extra)
        if args.plan:
            print_plan(config, plan(config, args), args)
            return None
        if not args.report:
            check_data(config)
            if args.reference is not None:
                from pdm.metrics import FeatureStats

                FeatureStats.load(args.reference)
        runs = plan(config, args)
        if not args.report:
            if args.reference is None and runs and quality_feature(config, args) == "inception":
                print(
                    "ablation: no --reference, so quality is not scored along the runs (the report "
                    "gives their costs only); make one with `python -m pdm.metrics ref-stats`",
                    file=sys.stderr,
                )
            for p in [args.only] if args.only is not None else args.patch_sizes:
                if finished(runs[p]):
                    print(f"ablation: P = {p} is finished; skipped", file=sys.stderr)
                    continue
                train(args.config, runs[p], extra, p)
            if args.only is not None:
                return None
        from pdm.ablation.report import write_report

        return write_report(config, runs, args)
    except (ValueError, WriteError) as e:  # bad input, or a full disk (the files stay whole)
        fail("python -m pdm.ablation", str(e))


if __name__ == "__main__":
    main()
