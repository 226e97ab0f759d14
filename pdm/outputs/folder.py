"""A sampling run's output folder: what produced it, its shards and its final files.

    OUT/run.json      what produced the images (identity) and where it ran (info)
    OUT/shards/       shard_00000.npz ... (images, labels, nfe, seconds, evaluated): the resumable unit,
                      each with shard_00000.npz.sha256, its content hash, written once the shard is whole
    OUT/samples.npz   arr_0 uint8 NHWC, arr_1 labels when conditional
    OUT/grid.png      the first 64 images
    OUT/stats.json    nfe, seconds, images_per_second, ...

The identity in run.json guards that shards made by different invocations (a resumed run,
another machine) were made with the same checkpoint, settings and code. A shard counts as
finished only when its bytes match its recorded hash: one damaged by a crash or a disk error is
remade on resume and refused by a merge, never taken into samples.npz.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from pdm.atomic import atomic_write, atomic_write_text, file_sha256
from pdm.images import save_grid
from pdm.locks import FolderLock

RUN_FORMAT = 1  # run.json's "format"; a newer one is refused by name
PIXEL_CODE = (
    "sampling",
    "nn",
    "schedule.py",
    "patching.py",
    "objectives.py",
    "checkpoints",
    "outputs",
)


def code_fingerprint() -> str:
    """A hash of the pdm source that decides the pixels (sampling, network, schedule, noise)."""
    root = Path(__file__).resolve().parent.parent
    files = sorted(
        f
        for part in PIXEL_CODE
        for f in ((root / part).rglob("*.py") if (root / part).is_dir() else [root / part])
    )
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def describe_difference(
    old: dict, new: dict, old_files: list[str] | None = None, new_files: list[str] | None = None
) -> str:
    """'steps 20 -> 10, solver dpmsolver++ -> unipc' for the entries that differ; a changed
    checkpoint is named by its file (``old_files`` / ``new_files``: the --ckpt paths) and hash."""

    def flat(d: dict) -> dict:
        return {**{k: v for k, v in d.items() if k != "settings"}, **d.get("settings", {})}

    a, b = flat(old), flat(new)
    diffs = [
        _checkpoint_change(a.get(k), b.get(k), old_files, new_files)
        if k == "checkpoints"
        else f"{k} {a.get(k)} -> {b.get(k)}"
        for k in b
        if a.get(k) != b.get(k)
    ]
    return ", ".join(diffs[:4]) + (" ..." if len(diffs) > 4 else "")


def _checkpoint_change(
    old: list[str] | None,
    new: list[str] | None,
    old_files: list[str] | None,
    new_files: list[str] | None,
) -> str:
    """'checkpoint runs/x/last.ckpt changed (sha256 e242ab01... -> 685c0f2e...); last.ckpt moves ...'."""

    def short(hashes: list[str] | None) -> str:
        return ", ".join(f"{h[:8]}..." for h in hashes or []) or "none"

    old_files, new_files = list(old_files or []), list(new_files or [])
    if old_files and sorted(old_files) == sorted(new_files):
        text = (
            f"checkpoint {', '.join(new_files)} changed since (sha256 {short(old)} -> {short(new)})"
        )
    else:
        text = (
            f"checkpoint {', '.join(old_files) or 'unknown'} (sha256 {short(old)}) -> "
            f"{', '.join(new_files) or 'unknown'} (sha256 {short(new)})"
        )
    if any(Path(f).name == "last.ckpt" for f in new_files):
        text += (
            "; last.ckpt moves with training: sample a fixed step file (checkpoints/stepNNNNNNN.ckpt) "
            "or an export"
        )
    return text


OUTPUT_FILES = ("shards", "samples.npz", "stats.json", "grid.png", "run.json")


def prepare_out(
    out: Path, identity: dict, overwrite: bool, ckpt_files: list[str] | None = None
) -> None:
    """Make ``out`` this run's: start afresh with ``overwrite`` (whatever it holds), else resume
    when its run.json matches, otherwise a ValueError naming what differs (``ckpt_files``: this run's --ckpt paths, to name a
    changed checkpoint by its file); nothing is touched then."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; choose a folder")
    # an empty shards/ holds nothing (a run stopped before its manifest, e.g. on a full disk)
    held = [
        p
        for p in OUTPUT_FILES
        if (out / p).exists() and not (p == "shards" and not any((out / p).iterdir()))
    ]
    if held:
        old = read_identity(out)
        if old == identity and not overwrite:
            return
        if not overwrite and extends(old, identity):
            _extend(out, old, identity)
            return
        if not overwrite:
            old_files = (read_info(out) or {}).get("ckpt")
            why = (
                describe_difference(old, identity, old_files, ckpt_files)
                if old
                else "by an unknown run (no readable run.json)"
            )
            raise ValueError(
                f"{out} holds samples made with other settings ({why}); use another --out, or pass "
                "--overwrite to discard them"
            )
        for p in held:
            shutil.rmtree(out / p) if (out / p).is_dir() else (out / p).unlink()
    try:
        (out / "shards").mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(
            f"cannot write to output folder {out}: {e.strerror}; choose another --out"
        ) from None


def extends(old: dict | None, new: dict) -> bool:
    """Whether ``new`` asks for more images of the run ``old`` made, with nothing else changed."""
    if not old or old.get("num_samples") is None:
        return False
    same = {**old, "num_samples": new["num_samples"]} == new
    return same and new["num_samples"] > old["num_samples"]


def _extend(out: Path, old: dict, new: dict) -> None:
    """Make room for more images: the old outputs go (they are made again at the end) and a last
    shard that the new count makes longer is made again (its images come out the same: image i
    depends only on the seed and i); the whole shards stay."""
    size, before = old["shard_size"], old["num_samples"]
    print(
        f"extending {out} from {before} to {new['num_samples']} images (the first {before} are "
        "kept and come out the same)",
        file=sys.stderr,
    )
    if before % size:
        last = shard_paths(out, before, size)[-1]
        for path in (last, hash_path(last)):
            path.unlink(missing_ok=True)
    for name in ("samples.npz", "stats.json", "grid.png"):
        (out / name).unlink(missing_ok=True)


def read_identity(out: Path) -> dict | None:
    """The identity recorded in ``out/run.json``, or None; a ValueError for a newer format."""
    try:
        manifest = json.loads((out / "run.json").read_text())
        found = int(manifest.get("format", 1))
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    if found > RUN_FORMAT:
        raise ValueError(
            f"{out / 'run.json'} was written by a newer pdm (run format {found}; this pdm reads up "
            f"to {RUN_FORMAT}); upgrade pdm, or sample into another --out"
        )
    return manifest.get("identity")


def read_info(out: Path) -> dict | None:
    """The run facts recorded in ``out/run.json`` (device, batch size, --ckpt paths ...), or None."""
    try:
        return json.loads((out / "run.json").read_text()).get("info")
    except (OSError, ValueError, AttributeError):
        return None


def write_manifest(out: Path, identity: dict, info: dict) -> None:
    """Record what produces this folder's images (before the first shard is written)."""
    manifest = {"format": RUN_FORMAT, "identity": identity, "info": info}
    atomic_write_text(out / "run.json", json.dumps(manifest, indent=1, default=str))


def shard_paths(out: Path, num_samples: int, shard_size: int) -> list[Path]:
    """The shard files of a run, in image order."""
    return [
        out / "shards" / f"shard_{k:05d}.npz"
        for k in range((num_samples + shard_size - 1) // shard_size)
    ]


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an .npz atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


def hash_path(shard: Path) -> Path:
    """Where a shard's content hash is recorded."""
    return shard.with_name(shard.name + ".sha256")


def is_recorded(shard: Path) -> bool:
    """Whether a shard and its hash file exist (a cheap check; :func:`shard_state` reads the bytes)."""
    return shard.exists() and hash_path(shard).exists()


def shard_state(shard: Path) -> str:
    """``finished`` (bytes match the recorded hash), ``missing``, or ``damaged`` (no hash recorded,
    or bytes that do not match it)."""
    if not shard.exists():
        return "missing"
    try:
        recorded = hash_path(shard).read_text().strip()
    except OSError:
        return "damaged"
    return "finished" if recorded == file_sha256(str(shard)) else "damaged"


def write_outputs(
    out: Path,
    shards: list[Path],
    conditional: bool,
    image_size: int,
    sampled_now: int,
    with_masks: bool,
    network: dict | None = None,
) -> dict:
    """samples.npz, grid.png and stats.json from a complete set of shards; returns the stats.
    ``network``: the calls per expert and sampling FLOPs per image of this run's images."""
    damaged = [p.name for p in shards if shard_state(p) != "finished"]
    if damaged:
        raise ValueError(
            f"shard {damaged[0]} in {out} does not match its recorded hash ({len(damaged)} such); "
            "run the same command again to remake it"
        )
    parts = [dict(np.load(p)) for p in shards]
    images = np.concatenate([p["images"] for p in parts])
    arrays = {"arr_0": images}
    if conditional:
        arrays["arr_1"] = np.concatenate([p["labels"] for p in parts])
    save_npz(out / "samples.npz", arrays)
    save_grid(images[:64], out / "grid.png", scale=2 if image_size <= 64 else 1)
    seconds = float(sum(p["seconds"] for p in parts))
    nfe = np.concatenate([p["nfe"] for p in parts]).astype(np.float64)
    stats = {
        "nfe": float(nfe.mean()),
        "nfe_per_image": {
            "mean": float(nfe.mean()),
            "p50": float(np.quantile(nfe, 0.5)),
            "p99": float(np.quantile(nfe, 0.99)),
            "max": float(nfe.max()),
        },
        "seconds": seconds,
        "images_per_second": len(images) / seconds if seconds > 0 else None,
        "images_sampled_this_run": sampled_now,
        "num_samples": int(len(images)),
        "peak_memory_bytes": torch.cuda.max_memory_allocated()
        if torch.cuda.is_available()
        else None,
        "run": json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else None,
    }
    if network is not None:
        stats["network_this_run"] = network
    if with_masks:
        stats["evaluated"] = [
            m.tolist() for p in parts for m in p["evaluated"]
        ]  # per image, per step
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=1, default=str))
    print(json.dumps({k: stats[k] for k in ("nfe", "seconds", "images_per_second", "num_samples")}))
    return stats


def merge_parts(parts: list[Path], out: Path) -> dict:
    """Join the shards of parts made with ``--num-shards`` into ``out``, after checking that every
    part's run.json has the same identity and that each shard is present."""
    identities = [read_identity(p) for p in parts]
    if any(i is None for i in identities):
        bad = parts[identities.index(None)]
        raise ValueError(f"{bad} has no readable run.json; it is not a sample.py output folder")
    if any(i != identities[0] for i in identities[1:]):
        other = next(i for i in identities[1:] if i != identities[0])
        raise ValueError(
            f"the parts were made with different settings ({describe_difference(identities[0], other)}); "
            "merge only parts of one run"
        )
    identity = identities[0]
    names = [p.name for p in shard_paths(out, identity["num_samples"], identity["shard_size"])]
    found = {
        n: next((p / "shards" / n for p in parts if (p / "shards" / n).exists()), None)
        for n in names
    }
    missing = [n for n, f in found.items() if f is None]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(names)} shards are missing from the parts (first: {missing[0]}); "
            "finish every --shard-index first"
        )
    damaged = [f for f in found.values() if shard_state(f) != "finished"]
    if damaged:
        raise ValueError(
            f"shard {damaged[0]} does not match its recorded hash ({len(damaged)} such); re-run that "
            "part's command to remake it, then merge"
        )
    lock = FolderLock(out, "the output folder").acquire()
    try:
        return _merge_into(out, parts, identity, found, names)
    finally:
        lock.release()


def _merge_into(
    out: Path, parts: list[Path], identity: dict, found: dict, names: list[str]
) -> dict:
    prepare_out(out, identity, overwrite=False)
    info = json.loads((parts[0] / "run.json").read_text()).get("info", {})
    write_manifest(out, identity, {**info, "merged_from": [str(p) for p in parts]})
    for n, f in found.items():
        if shard_state(out / "shards" / n) != "finished":
            atomic_write(out / "shards" / n, lambda tmp, f=f: shutil.copyfile(f, tmp))
            atomic_write(
                hash_path(out / "shards" / n), lambda tmp, f=f: shutil.copyfile(hash_path(f), tmp)
            )
    first = np.load(out / "shards" / names[0])
    conditional = bool((first["labels"] >= 0).all())
    return write_outputs(
        out,
        [out / "shards" / n for n in names],
        conditional,
        first["images"].shape[1],
        0,
        identity["settings"].get("skip") is not None,
    )
