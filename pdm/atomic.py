"""Atomic file writes: a file is either its old version or its complete new one, never half.

Every output pdm writes (checkpoints, exported weights, samples, grids, statistics, skip
paths) goes through :func:`atomic_write`: the data is written to a temporary file in the
target folder, flushed to disk, then renamed over the target (``os.replace`` is atomic on
POSIX), so a kill at any moment leaves no truncated file behind. A write that fails (a full
disk, an I/O error) removes its temporary file and raises :class:`WriteError`, one line that
names the folder and its free space; the previous version of the file is untouched.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def default_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give: 0o666 minus the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class WriteError(RuntimeError):
    """A file could not be written (disk full, I/O error, no permission); nothing was replaced."""


def free_space(folder: str | os.PathLike) -> str:
    """The free space of the file system holding ``folder``, for a person ("3.2 GiB free")."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "free space unknown"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if free >= size:
            return f"{free / size:.1f} {unit} free"
    return f"{free} bytes free"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` to fill a temporary file, fsync it and rename it to ``path``.

    An ``OSError`` on the way (ENOSPC, EIO, ...; also one a writer wraps in its own error type,
    as safetensors does) becomes a :class:`WriteError` after the temporary file is removed;
    ``path`` keeps its previous content.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise WriteError(_describe(path, e)) from e
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(
            tmp, default_file_mode()
        )  # mkstemp makes 0600 files; outputs should be readable as usual
        os.replace(tmp, path)
    except OSError as e:
        raise WriteError(_describe(path, e)) from e
    except Exception as e:  # a writer that wraps the OS error in its own type
        code = _wrapped_errno(e, path.parent)
        if code is None:
            raise
        raise WriteError(_describe(path, OSError(code, os.strerror(code)))) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _describe(path: Path, error: OSError) -> str:
    reason = error.strerror or str(error) or type(error).__name__
    return (
        f"could not write {path.name} in {path.parent} ({reason}; {free_space(path.parent)}); the previous "
        f"{path.name} is intact: free some space or write elsewhere, then run the same command again"
    )


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


TORCH_WRITER_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


def _wrapped_errno(e: Exception, folder: Path) -> int | None:
    """The OS error behind a writer's own exception: safetensors says "(os error 28)"; torch.save's
    zip writer says only "unexpected pos" or "PytorchStreamWriter failed writing file" when the
    disk fills mid-file, so a nearly full disk is taken to be the cause. None for other errors."""
    found = re.search(r"\(os error (\d+)\)", str(e))
    if found is not None:
        return int(found.group(1))
    if any(text in str(e) for text in TORCH_WRITER_FAILURES):
        try:
            full = shutil.disk_usage(folder).free < (1 << 20)
        except OSError:
            full = False
        return errno.ENOSPC if full else errno.EIO
    return None
