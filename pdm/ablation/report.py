"""The report of an ablation (:mod:`pdm.ablation`), drawn from its runs' quality logs, held-out
scores and checkpoints: per run and, over seeds, the mean and 95% interval per setting with the
differences the intervals support (:mod:`~pdm.ablation.stats`); quality along training; the
held-out error by noise level (where the settings part); the final samples side by side."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from pdm.ablation.configs import batch_size
from pdm.ablation.cost import device_name, step_cost, step_flops
from pdm.ablation.figures import plot, plot_noise_levels, samples_side_by_side
from pdm.ablation.runs import finished
from pdm.ablation.stats import holm, t_interval, welch
from pdm.atomic import atomic_write_text

LEVEL = 0.95


def read_quality(folder: Path) -> list[dict]:
    """The quality checks of one run, one per step (a resumed run's repeat of a step wins)."""
    path = folder / "quality.jsonl"
    if not path.exists():
        return []
    by_step = {}
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a check cut off by a kill or a full disk: not scored
                break
            raise ValueError(f"{path}: line {i + 1} is not a quality record") from None
        by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def write_report(config: dict, runs: list, args) -> dict:
    """ROOT/ablation.{md,json,png}, ROOT/noise_levels.png and ROOT/samples.png; returns the
    report as a dict."""
    root = Path(args.root)
    rows, curves, held = run_rows(runs, args)
    values = list(dict.fromkeys(str(r.value) for r in runs))
    summary = summarise(rows, values)
    supported = differences(rows, values)
    parting = part_points(held, rows, values)
    report = {
        "config": args.config,
        "axis": args.key,
        "values": values,
        "seeds": args.seeds,
        "budget": list(args.budget),
        "device": device_name(),
        "batch_size": batch_size(config),
        "test": TEST,
        "runs": rows,
        "summary": summary,
        "differences": supported,
        "noise_levels": {
            "curves": {
                k: None if v is None else {"log_snr_edges": v["log_snr_edges"], "rmse": v["rmse"]}
                for k, v in held.items()
            },
            "parting": parting,
        },
        "curves": curves,
    }
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "ablation.json", json.dumps(report, indent=1, default=str))
    text = markdown(report)
    atomic_write_text(root / "ablation.md", text)
    plot(curves, rows, root / "ablation.png")
    plot_noise_levels(held, rows, values, parting, args.key, root / "noise_levels.png")
    samples_side_by_side([r for r in runs if r.seed == 0], root / "samples.png")
    print(text)
    return report


def run_rows(runs: list, args) -> tuple[dict, dict, dict]:
    """Per run: its row (cost, steps, scores), its quality checks and its held-out curve."""
    from pdm.ablation.heldout import heldout

    rows, curves, costs, held = {}, {}, {}, {}
    for run in runs:
        checks = read_quality(run.folder)
        curves[run.label] = checks
        name = next((k for k in ("fd8x8", "fid") if checks and k in checks[-1]), "score")
        last = checks[-1] if checks else {}
        cost_key = (run.patch_size, batch_size(run.config))
        if cost_key not in costs:
            costs[cost_key] = step_cost(run.config)
        held[run.label] = heldout(run, args.heldout_images, args.bins)
        steps, flops = last.get("step"), last.get("train_flops")
        if steps is None and finished(run):  # no quality log (no reference): the run's own count
            steps = json.loads((run.folder / "ablation_done.json").read_text()).get("steps")
            flops = None if steps is None else steps * step_flops(run.config)
        rows[run.label] = {
            **costs[cost_key],
            "value": run.value,
            "seed": run.seed,
            "patch_size": run.patch_size,
            "steps": steps,
            "train_flops": flops,
            "train_seconds": last.get("train_seconds"),
            "checks": len(checks),
            "metric": name,
            "best": min((c[name] for c in checks), default=None),
            "final": last.get(name),
            "bits_per_dim": None if held[run.label] is None else held[run.label]["bits_per_dim"],
        }
    return rows, curves, held


SCORES = ("final", "best", "bits_per_dim")


def summarise(rows: dict[str, dict], values: list[str]) -> dict[str, dict]:
    """Per value: the seeds' scores and each score's mean and 95% Student-t half-width."""
    out = {}
    for v in values:
        mine = [r for r in rows.values() if str(r["value"]) == v]
        entry = {"seeds": len(mine), "steps": [r["steps"] for r in mine]}
        for score in SCORES:
            got = [r[score] for r in mine if r[score] is not None]
            mean, half = t_interval(got, LEVEL)
            entry[score] = {"values": got, "mean": mean, "half_width": half}
        flops = [r["train_flops"] for r in mine if r["train_flops"]]
        entry["train_flops"] = float(np.mean(flops)) if flops else None
        out[v] = entry
    return out


TEST = (
    "Welch's t-test on the logarithm of each score (the scores are positive and their seed spread "
    "grows with their size, so a difference is a ratio), Holm-adjusted over the pairs of a score, 95%"
)


def differences(rows: dict[str, dict], values: list[str]) -> dict[str, list[dict]]:
    """Per score, every pair of values tested (:data:`TEST`): the ratio of the two geometric
    means, its 95% interval, the Holm-adjusted p-value and whether the 95% level supports it."""
    out = {}
    for score in SCORES:
        by_value = {
            v: [
                math.log(r[score])
                for r in rows.values()
                if str(r["value"]) == v and r[score] is not None and r[score] > 0
            ]
            for v in values
        }
        pairs = [(a, b) for i, a in enumerate(values) for b in values[i + 1 :]]
        tests = [welch(by_value[a], by_value[b], LEVEL) for a, b in pairs]
        adjusted = holm([t["p"] for t in tests])
        out[score] = [
            {
                "a": a,
                "b": b,
                "ratio": math.exp(t["difference"]) if t["difference"] == t["difference"] else None,
                "ratio_low": math.exp(t["low"]) if t["low"] == t["low"] else None,
                "ratio_high": math.exp(t["high"]) if t["high"] == t["high"] else None,
                "p": t["p"],
                "p_holm": p,
                "supported": bool(p == p and p < 1 - LEVEL),
            }
            for (a, b), t, p in zip(pairs, tests, adjusted)
        ]
    return out


def part_points(held: dict, rows: dict[str, dict], values: list[str]) -> dict[str, dict]:
    """Where each value's held-out error curve parts from the reference value's (the first
    value: the finest P, or the first of --vary): per log-SNR bin the Welch 95% interval of the
    log-ratio of the RMSEs over seeds; ``above`` is the lowest bin edge from which every bin up to the
    top is worse than the reference (None where the top bin is not), ``worse``/``better`` the
    bins where the interval says so."""
    curves = {}
    for label, h in held.items():
        if h is not None:
            curves.setdefault(str(rows[label]["value"]), []).append(np.asarray(h["rmse"]))
    if not curves or values[0] not in curves:
        return {}
    ref = np.stack(curves[values[0]])
    edges = next(np.asarray(h["log_snr_edges"]) for h in held.values() if h is not None)
    centres = 0.5 * (edges[1:] + edges[:-1])
    out = {}
    for v in values[1:]:
        if v not in curves:
            continue
        mine = np.stack(curves[v])
        logs, ref_logs = np.log(mine), np.log(ref)  # ratios, as for the scores
        tests = [welch(logs[:, k], ref_logs[:, k], LEVEL) for k in range(len(centres))]
        worse = [bool(t["low"] > 0) for t in tests]
        better = [bool(t["high"] < 0) for t in tests]
        above = None
        k = len(centres)
        while k > 0 and worse[k - 1]:
            k -= 1
        if k < len(centres):
            above = float(edges[k])
        ratio = (mine.mean(0) / ref.mean(0)).tolist()
        out[v] = {
            "reference": values[0],
            "above_log_snr": above,
            "worse_bins": [float(c) for c, w in zip(centres, worse) if w],
            "better_bins": [float(c) for c, b in zip(centres, better) if b],
            "ratio": ratio,
        }
    return out


def _pm(entry: dict, fmt: str) -> str:
    mean, half = entry["mean"], entry["half_width"]
    if mean is None or mean != mean:
        return "–"
    return format(mean, fmt) + ("" if half != half else f" ± {format(half, fmt)}")


def markdown(report: dict) -> str:
    """The report as Markdown: runs, the summary over seeds, what the intervals support, and
    where the noise-level curves part."""
    rows, summary = report["runs"], report["summary"]
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    axis = "P" if report["axis"] == "patch_size" else report["axis"]
    metric = next(iter(rows.values()))["metric"] if rows else "score"
    out = [
        f"Axis: {axis}; {report['seeds']} seed(s) per value; budget: {report['budget'][0]} "
        f"{report['budget'][1]}; score: {metric} (lower is better); held-out bound in bits/dim "
        f"(lower is better). Step cost measured at batch {report['batch_size']} on "
        f"{report['device']} when the report was written; steps, FLOPs and seconds are the runs' "
        "own.",
        "",
        "| run | P | parameters | s/step | ms/image | activations MiB | steps | training FLOPs | "
        "train s | checks | best | final | bits/dim |",
        "|" + "---|" * 13,
    ]
    for label, r in rows.items():
        out.append(
            f"| {label} | {r['patch_size']} | {r['parameters'] / 1e6:.2f}M | "
            f"{r['seconds_per_step']:.3f} | {r['train_ms_per_image']:.2f} | "
            f"{r['activation_mib']:.1f} | {fmt(r['steps'], 'd')} | "
            f"{fmt(r['train_flops'], '.3g')} | {fmt(r['train_seconds'], '.0f')} | {r['checks']} | "
            f"{fmt(r['best'], '.4g')} | {fmt(r['final'], '.4g')} | {fmt(r['bits_per_dim'], '.4f')} |"
        )
    out += [
        "",
        "Mean ± 95% Student-t half-width over seeds; the differences below: " + report["test"],
        "",
        f"| {axis} | seeds | final {metric} | best {metric} | bits/dim |",
        "|---|---|---|---|---|",
    ]
    for v, e in summary.items():
        out.append(
            f"| {v} | {e['seeds']} | {_pm(e['final'], '.4g')} | {_pm(e['best'], '.4g')} | "
            f"{_pm(e['bits_per_dim'], '.4f')} |"
        )
    out += ["", "Differences the intervals support:", ""]
    out += _claims(report, axis, metric)
    out += _parting_lines(report, axis)
    return "\n".join(out) + "\n"


def _claims(report: dict, axis: str, metric: str) -> list[str]:
    """One line per difference the intervals support, or why there is none."""
    out, claims = [], []
    names = {"final": f"final {metric}", "best": f"best {metric}", "bits_per_dim": "bits/dim"}
    for score, tests in report["differences"].items():
        for t in tests:
            if t["supported"]:
                claims.append(
                    f"- {names[score]}: {axis} = {t['a']} is {t['ratio']:.3g}x {axis} = {t['b']} "
                    f"(95% interval {t['ratio_low']:.3g}-{t['ratio_high']:.3g}x; Holm p = "
                    f"{t['p_holm']:.3g})"
                )
    if claims:
        out += claims
    elif report["seeds"] < 2:
        out.append("- none can be: one seed per value gives no interval (use --seeds 3 or more)")
    else:
        out.append("- none: every difference lies within what the seeds' spread allows")
    return out


def _parting_lines(report: dict, axis: str) -> list[str]:
    """Where each value's noise-level curve parts from the reference's."""
    out = []
    parting = report["noise_levels"]["parting"]
    if parting:
        out += [
            "",
            "Held-out error by noise level (noise_levels.png), against "
            f"{axis} = {next(iter(parting.values()))['reference']}:",
            "",
        ]
        for v, p in parting.items():
            where = (
                f"worse in every bin above log SNR {p['above_log_snr']:.2f} "
                f"(SNR {math.exp(p['above_log_snr']):.3g})"
                if p["above_log_snr"] is not None
                else "not worse in the lowest-noise bin"
            )
            out.append(
                f"- {axis} = {v}: {where}; worse in {len(p['worse_bins'])} and better in "
                f"{len(p['better_bins'])} of {len(p['ratio'])} bins; RMSE ratio "
                f"{min(p['ratio']):.3g} to {max(p['ratio']):.3g}"
            )
    return out
