"""Ablations as researchers run them: one ordinary train.py run per setting and seed.

    python -m pdm.ablation --config configs/digits.yaml --patch-sizes 1 2 4 8 --seeds 3 \\
        --budget flops 2e13 --root runs/ablation [--reference REF.npz] [-- TRAIN.PY OVERRIDES ...]
    python -m pdm.ablation --config configs/photos.yaml --vary model.target eps x0 v --seeds 3 ...

The axis is the patch size (``--patch-sizes``) or any config key (``--vary KEY V1 V2 ...``, e.g.
``model.target``, also spelt ``model.prediction`` with ``x`` for ``x0``, or ``model.weighting``).
Each (value, seed) gets its own run folder: ``ROOT/P{p}`` for the config's own seed and
``ROOT/P{p}_seed{s}`` for repeat s (``ROOT/{key}-{value}[_seed{s}]`` on other axes). Repeat s adds
s to the run's seed and to the data order's seed, never to the held-out split. The change and
what it forces (for P, the attention kept on the same levels of the U-Net, so every P has the
same parameters) are recorded in the run's own ``config.yaml`` and ``ablation_run.json``. A
:class:`~pdm.training.QualityMonitor` scores EMA samples about ten times along each run (FD-8x8 on
digits; FID against ``--reference`` otherwise; off without one). Runs resume when the command is
re-run (``--ckpt_path auto``) and finished ones are skipped. Under SLURM give each array task
``--task $SLURM_ARRAY_TASK_ID`` (``--plan`` lists the tasks), or one ``--only VALUE`` (with
``--seed S``) per job, and run ``--report`` once they end.

After training, each run is scored on held-out images (the data module's validation set) with
its EMA weights and fixed noise: the x-prediction's RMSE in log-SNR bins and the variational
bound in bits/dim (:mod:`pdm.metrics.likelihood`), cached in the run's ``heldout.json``.

Budgets, the same for every run: ``steps N`` (equal optimiser steps), ``flops F`` (equal training
FLOPs, counted by ``torch.utils.flop_counter`` on one step of each setting; the steps follow),
``time S`` (equal seconds of training, the quality checks not counted; the learning rate does not
decay, as no step count is fixed).

The report (:mod:`~pdm.ablation.report`): ``ROOT/ablation.md`` and ``.json`` (per run and, over
seeds, mean and 95% interval per setting, with the differences the intervals support),
``ROOT/ablation.png`` (quality along training), ``ROOT/noise_levels.png`` (held-out error by noise
level, the PDM paper's figure) and ``ROOT/samples.png`` (each setting's final EMA samples).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import yaml

from pdm.ablation.configs import (
    axis_overlay,
    canonical_key,
    check_data,
    get_key,
    is_digits,
    load_config,
    merge,
    parse_value,
    seed_overlay,
)
from pdm.ablation.cost import print_plan, step_cost, step_flops
from pdm.ablation.runs import Run, describe, finished, folder_name, train
from pdm.atomic import WriteError

BUDGETS = ("steps", "flops", "time")


def _parser() -> argparse.ArgumentParser:
    from pdm.cli import parser

    p = parser(__doc__, prog="python -m pdm.ablation")
    p.add_argument("--config", required=True, help="the training config (its P is replaced)")
    p.add_argument(
        "--patch-sizes",
        type=int,
        nargs="+",
        default=None,
        help="the patch sizes to compare (default 1 2 4 8; the axis unless --vary is given)",
    )
    p.add_argument(
        "--vary",
        nargs="+",
        metavar=("KEY", "VALUE"),
        default=None,
        help="another axis: a config key and its values, e.g. --vary model.target eps x0 v",
    )
    p.add_argument(
        "--seeds", type=int, default=1, help="repeats of every setting (seed 0 is the config's)"
    )
    p.add_argument(
        "--budget",
        nargs=2,
        metavar=("KIND", "VALUE"),
        required=True,
        help="steps N | flops F | time SECONDS, the same for every run",
    )
    p.add_argument("--root", required=True, help="the ablation's folder: one run folder per run")
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
    _add_scoring_and_picking(p)
    return p


def _add_scoring_and_picking(p: argparse.ArgumentParser) -> None:
    """The held-out scoring flags and those that pick runs or only report or plan."""
    p.add_argument(
        "--heldout-images",
        type=int,
        default=256,
        help="held-out evaluations per run (the held-out set taken in turn, fresh noise each time)",
    )
    p.add_argument("--bins", type=int, default=24, help="log-SNR bins of the held-out error curve")
    p.add_argument(
        "--only",
        default=None,
        help="train this value only (all its seeds, or --seed S): one SLURM job per value",
    )
    p.add_argument("--seed", type=int, default=None, help="with --only: train this seed only")
    p.add_argument(
        "--task",
        type=int,
        default=None,
        help="train run number I only (0-based, value-major; --plan lists them): a SLURM array task",
    )
    p.add_argument(
        "--report", action="store_true", help="only write the report from the runs so far"
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="only print the runs and what each will cost (counted FLOPs, estimated GPU-hours)",
    )
    p.add_argument("--gpu", default="H100", help="--plan's GPU for the hours (its bf16 peak)")
    p.add_argument(
        "--mfu",
        type=float,
        default=0.3,
        help="--plan's model FLOPs utilisation (0.3: measured for LSUN P = 4, bf16 + compile)",
    )


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
    if args.vary is not None and args.patch_sizes is not None:
        raise ValueError(
            "give --patch-sizes or --vary, not both (--vary patch_size 2 4 is the same)"
        )
    if args.vary is not None:
        if len(args.vary) < 2:
            raise ValueError("--vary needs a config key and at least one value")
        args.key = canonical_key(args.vary[0])
        args.values = [parse_value(args.key, v) for v in args.vary[1:]]
    else:
        args.key, args.values = "patch_size", list(args.patch_sizes or [1, 2, 4, 8])
    if args.key == "patch_size":  # finest first: the reference the others are compared with
        args.values = sorted(int(v) for v in args.values)
        args.patch_sizes = args.values
    if len(set(map(str, args.values))) != len(args.values):
        raise ValueError(f"the values {args.values} repeat one")
    if args.seeds < 1:
        raise ValueError("--seeds needs at least 1")
    if args.only is not None:
        args.only = parse_value(args.key, str(args.only))
        if str(args.only) not in map(str, args.values):
            raise ValueError(f"--only {args.only} is not one of the values {args.values}")
    if args.seed is not None and not 0 <= args.seed < args.seeds:
        raise ValueError(f"--seed {args.seed} is not one of the seeds 0..{args.seeds - 1}")
    if args.seed is not None and args.only is None:
        raise ValueError("--seed picks a seed of --only VALUE; give --only too (or --task)")
    count = len(args.values) * args.seeds
    if args.task is not None and not 0 <= args.task < count:
        raise ValueError(f"--task {args.task}: there are {count} runs, numbered 0..{count - 1}")
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


def selected(args: argparse.Namespace, index: int, value, seed: int) -> bool:
    """Whether ``--only``/``--seed``/``--task`` pick this run (all do without them)."""
    if args.task is not None:
        return index == args.task
    if args.only is not None and str(value) != str(args.only):
        return False
    return args.seed is None or seed == args.seed


def plan(config: dict, args: argparse.Namespace, every_run: bool = False) -> list[Run]:
    """The runs, value-major: each with its folder, steps (None under a time budget) and the config
    overlay of its run; only those ``--only``/``--task`` pick unless ``every_run``.

    The overlay sets the axis and what it forces, the seed of a repeat, and the budget, and swaps
    the config's sample-grid and FD callbacks for one :class:`~pdm.training.QualityMonitor` (so
    all sampling along the run is the monitor's, kept out of the training time it measures).
    """
    kind, runs = args.budget[0], []
    feature = quality_feature(config, args)
    kept = [
        cb
        for cb in (config.get("trainer") or {}).get("callbacks") or []
        if not (isinstance(cb, dict) and cb.get("class_path") in SAMPLERS)
    ]
    flops: dict[str, int] = {}  # per value: the same for every seed
    index = -1
    for value in args.values:
        axis, forced = axis_overlay(config, args.key, value)
        for seed in range(args.seeds):
            index += 1
            if not (every_run or selected(args, index, value, seed)):
                continue
            overlay = merge(axis, seed_overlay(config, seed))
            run_config = merge(config, overlay)
            p = int(get_key(run_config, "model.net.init_args.patch_size") or 1)
            steps = None
            if kind == "steps":
                steps = int(args.value)
            elif kind == "flops":
                if str(value) not in flops:
                    flops[str(value)] = step_flops(run_config, p)
                steps = max(1, math.ceil(args.value / flops[str(value)]))
            folder = Path(args.root) / folder_name(args.key, value, seed)
            expected, every = steps, None
            if steps is None and (folder / "ablation.yaml").exists():  # a resume keeps its checks
                previous = yaml.safe_load((folder / "ablation.yaml").read_text())
                every = previous["trainer"]["callbacks"][-1]["init_args"]["every_n_steps"]
            elif steps is None and not (args.report or args.plan):  # checks spread by a step
                expected = int(args.value / step_cost(run_config, p, iters=2)["seconds_per_step"])
            every = every or max(1, (expected or 1000) // args.checks)
            monitor = {
                "every_n_steps": every,
                "num_samples": args.samples,
                "feature": feature,
                "reference": args.reference,
                "max_cost": args.max_cost,
            }
            trainer = {"default_root_dir": str(folder), "max_steps": steps or -1}
            overlay = merge(overlay, {"trainer": trainer})
            if steps is None:  # a time budget: no step count for a decay to aim at
                trainer["max_epochs"] = -1
                monitor["max_train_seconds"] = args.value
                overlay = merge(overlay, {"model": {"lr_decay": "none"}})
            overlay["trainer"]["callbacks"] = [
                *kept,
                {"class_path": "pdm.training.QualityMonitor", "init_args": monitor},
            ]
            runs.append(Run(args.key, value, seed, folder, steps, overlay, run_config, forced))
    return runs


def main(argv: list[str] | None = None) -> dict | None:
    """Train what is missing, score each run on held-out images, then write the report."""
    from pdm.cli import fail

    try:
        args, extra = parse_args(argv)
        config = load_config(args.config, extra)
        if args.plan:
            print_plan(config, plan(config, args, every_run=True), args)
            return None
        if not args.report:
            check_data(config)
            if args.reference is not None:
                from pdm.metrics import FeatureStats

                FeatureStats.load(args.reference)
        partial = args.only is not None or args.task is not None
        runs = plan(config, args, every_run=args.report)
        if not args.report:
            if args.reference is None and runs and quality_feature(config, args) == "inception":
                print(
                    "ablation: no --reference, so quality is not scored along the runs (the report "
                    "gives their costs and held-out bits/dim); make one with `python -m pdm.metrics "
                    "ref-stats`",
                    file=sys.stderr,
                )
            from pdm.ablation.heldout import heldout

            for run in runs:
                if finished(run):
                    print(f"ablation: {describe(run)} is finished; skipped", file=sys.stderr)
                else:
                    train(args.config, run, extra)
                heldout(run, args.heldout_images, args.bins)
            if partial:
                return None
        from pdm.ablation.report import write_report

        return write_report(config, runs, args)
    except (ValueError, WriteError) as e:  # bad input, or a full disk (the files stay whole)
        fail("python -m pdm.ablation", str(e))


if __name__ == "__main__":
    main()
