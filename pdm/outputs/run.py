"""Making a sampling run's images: per-image noise, the shards of one invocation, Ctrl-C.

Image i's noise and label depend on (seed, i) only, so the batch size, an interruption or a
split over processes or machines never changes the images (:mod:`pdm.outputs.folder` keeps the
shards of all of them apart or together).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pdm.atomic import WriteError, atomic_write_text, file_sha256
from pdm.images import to_uint8
from pdm.locks import FolderLock
from pdm.outputs.folder import (
    hash_path,
    is_recorded,
    prepare_out,
    save_npz,
    shard_paths,
    shard_state,
    write_manifest,
)


def noise_and_label(
    seed: int, index: int, shape: tuple[int, ...], num_classes: int | None, labels: list[int] | None
) -> tuple[torch.Tensor, int]:
    """The starting noise and label of image ``index``: a function of (seed, index) only."""
    g = torch.Generator().manual_seed((seed << 32) + index)
    noise = torch.randn(shape, generator=g)
    if num_classes is None:
        return noise, -1
    if labels:
        return noise, labels[index % len(labels)]
    return noise, int(torch.randint(0, num_classes, (1,), generator=g))


def make_shard(
    path: Path,
    indices: range,
    shape: tuple[int, ...],
    num_classes: int | None,
    seed: int,
    labels: list[int] | None,
    batch_size: int,
    device: torch.device,
    sample_batch: Callable[[torch.Tensor, dict], Any],
    total: int | None = None,
) -> int:
    """Sample the images ``indices`` and write them as one shard; returns their count (progress
    lines count to ``total``, the run's images, when given).

    ``sample_batch(noise, model_kwargs)`` returns a :class:`pdm.sampling.SampleResult`. When it
    has a ``stream`` attribute (per-image step control), images go through
    ``sample_batch.stream(items)`` instead, which keeps its batch full: a slot whose image is done
    takes the next one (:func:`pdm.sampling.per_image.stream`).
    """

    def item(i: int) -> tuple[int, Tensor, dict]:
        noise, label = noise_and_label(seed, i, shape, num_classes, labels)
        kwargs = {"y": torch.tensor(label, device=device)} if num_classes is not None else {}
        return i, noise.to(device), kwargs

    t0 = time.perf_counter()
    with torch.no_grad():
        if getattr(sample_batch, "stream", None) is not None:
            made = _streamed(sample_batch.stream, map(item, indices), indices, total)
        else:
            made = _batched(sample_batch, [item(i) for i in indices], batch_size, indices, total)
    if device.type == "cuda":
        torch.cuda.synchronize()
    label_of = [noise_and_label(seed, i, shape, num_classes, labels)[1] for i in indices]
    arrays = {**made, "labels": np.asarray(label_of, dtype=np.int64)}
    save_npz(path, arrays | {"seconds": np.float64(time.perf_counter() - t0)})
    atomic_write_text(hash_path(path), file_sha256(str(path)) + "\n")  # finished from here on
    return len(indices)


def _batched(
    sample_batch: Callable, items: list, batch_size: int, indices: range, total: int | None
) -> dict:
    """Fixed batches of ``batch_size`` images, in order."""
    images, nfes, masks = [], [], []
    for b0 in range(0, len(items), batch_size):
        part = items[b0 : b0 + batch_size]
        noise = torch.stack([x for _, x, _ in part])
        kwargs = {k: torch.stack([kw[k] for _, _, kw in part]) for k in part[0][2]}
        res = sample_batch(noise, kwargs)
        images.append(to_uint8(res.x))
        nfes.append(res.nfe_per_sample.cpu().numpy())
        masks.append(res.evaluated.cpu().numpy().T)
        _say(indices.start + b0 + len(part), total or indices.stop, res.nfe)
    width = max(m.shape[1] for m in masks)  # adaptive batches take different numbers of steps
    masks = [np.pad(m, ((0, 0), (0, width - m.shape[1]))) for m in masks]
    return {
        "images": np.concatenate(images),
        "nfe": np.concatenate(nfes),
        "evaluated": np.concatenate(masks),
    }


def _streamed(stream: Callable, items, indices: range, total: int | None) -> dict:
    """Images as each finishes (continuous batching), put back in index order."""
    done: dict[int, tuple[Tensor, int]] = {}
    for index, x, nfe in stream(items):
        done[index] = (x, nfe)
        if len(done) % 64 == 0 or len(done) == len(indices):
            _say(
                indices.start + len(done),
                total or indices.stop,
                float(np.mean([n for _, n in done.values()])),
            )
    xs = torch.stack([done[i][0] for i in indices])
    return {
        "images": to_uint8(xs),
        "nfe": np.asarray([done[i][1] for i in indices], dtype=np.int64),
        "evaluated": np.zeros((len(indices), 0), dtype=bool),
    }


def _say(upto: int, total: int, nfe: float) -> None:
    print(f"images {upto}/{total}  nfe {nfe:.2f}", file=sys.stderr, flush=True)


class Interrupt:
    """SIGINT handling that cannot be lost: the handler records the interrupt before raising
    KeyboardInterrupt, and every batch checks the record. (Python swallows an exception raised
    while a finalizer runs, so a bare handler would let such a Ctrl-C pass unnoticed.) Once the
    run has claimed its shards it knows them, so the exit message can say what was kept."""

    def __init__(self) -> None:
        self.seen = False
        self.run: Run | None = None

    def __call__(self, signum: int, frame) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def check(self) -> None:
        """Raise KeyboardInterrupt if an interrupt arrived (even one swallowed on the way)."""
        if self.seen:
            raise KeyboardInterrupt

    def kept(self, out: str) -> str:
        """What an interrupted run leaves in ``out``, in words."""
        if self.run is None:
            return "interrupted before any image was made; nothing was written"
        paths = [self.run.paths[k] for k in self.run.mine]
        done = sum(map(is_recorded, paths))
        if done == 0:
            return f"interrupted before the first shard was finished; no images kept in {out}"
        return (
            f"interrupted; {done} of {len(paths)} shards are finished in {out} ({self.run.made} made by this "
            "run); re-run the same command to resume"
        )


class Run:
    """One invocation's part of a sampling run's folder: the shards it owns (every
    ``num_shards``-th from ``shard_index``), which of them are unfinished, and the loop that makes
    them. Under torchrun or srun (``launch``) rank 0 prepares the folder and the ranks deal the
    unfinished shards out round-robin."""

    def __init__(
        self,
        out: Path,
        num_samples: int,
        shard_size: int,
        num_shards: int,
        shard_index: int,
        launch,
    ) -> None:
        self.out, self.num_samples, self.shard_size, self.launch = (
            out,
            num_samples,
            shard_size,
            launch,
        )
        self.num_shards, self.shard_index = num_shards, shard_index
        self.paths = shard_paths(out, num_samples, shard_size)
        self.mine = [k for k in range(len(self.paths)) if k % num_shards == shard_index]
        self.todo: list[int] = []
        self.made = 0
        self.lock: FolderLock | None = None

    def claim(self, identity: dict, overwrite: bool, ckpt_files: list[str], info: dict) -> None:
        """Rank 0 makes the folder this run's (or refuses, for every rank) and reads which shards
        are unfinished; every rank gets the same list before any rank writes."""
        refused, states = None, None
        if self.launch.rank == 0:
            try:
                self.lock = FolderLock(
                    self.out, "the output folder"
                ).acquire()  # one run per folder
                prepare_out(self.out, identity, overwrite, ckpt_files)
                write_manifest(self.out, identity, info)
                states = {k: shard_state(self.paths[k]) for k in self.mine}
            except (ValueError, WriteError) as e:  # every rank stops with rank 0's one line
                refused = str(e)
                if self.lock is not None:
                    self.lock.release()
        refused, states = self.launch.broadcast((refused, states))
        if refused is not None:
            raise ValueError(refused)
        self.todo = [k for k in self.mine if states[k] != "finished"]
        finished = len(self.mine) - len(self.todo)
        if self.launch.rank == 0 and finished:
            print(
                f"resuming {self.out}: {finished} of {len(self.mine)} shards already finished, "
                f"{len(self.todo)} to make",
                file=sys.stderr,
            )
        if self.launch.rank == 0:
            for k in (k for k in self.todo if states[k] == "damaged"):
                print(
                    f"{self.paths[k].name} does not match its recorded hash (damaged or unfinished); remaking it",
                    file=sys.stderr,
                )

    def make(
        self,
        batch: Callable[[torch.Tensor, dict], Any],
        shape: tuple[int, ...],
        num_classes: int | None,
        seed: int,
        labels: list[int] | None,
        batch_size: int,
        device: torch.device,
    ) -> int:
        """Make this rank's unfinished shards with ``batch(noise, model_kwargs)``; the images made
        by all ranks together."""
        done = 0
        for k in self.todo[self.launch.rank :: self.launch.world_size]:
            indices = range(k * self.shard_size, min((k + 1) * self.shard_size, self.num_samples))
            done += make_shard(
                self.paths[k],
                indices,
                shape,
                num_classes,
                seed,
                labels,
                batch_size,
                device,
                batch,
                total=self.num_samples,
            )
            self.made += 1
        return sum(self.launch.gather(done))

    def missing(self) -> int:
        """Shards of the whole run not yet finished (rank 0 counts; a part's run says how to merge)."""
        if self.launch.rank != 0:
            return 0
        missing = sum(not is_recorded(p) for p in self.paths)  # write_outputs checks every hash
        if missing:
            print(
                f"part {self.shard_index} of {self.num_shards} done: {len(self.paths) - missing} of "
                f"{len(self.paths)} shards in {self.out}; when every part is done, join them with "
                "`python sample.py --merge PART_DIR ... --out DIR`",
                file=sys.stderr,
            )
        return missing
