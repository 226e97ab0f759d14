"""One run per folder at a time: a lock file naming the process that holds the folder.

``FOLDER/.lock`` is created with O_CREAT | O_EXCL (of two runs started together exactly one
creates it), holds the owner's host, pid and command, and is removed when the run ends, however
it ends short of a kill. A lock left by a process that no longer exists on this host is taken
over with a note; a lock of a live process, or of another host (which this one cannot check),
refuses the run in one line that says what to do. Under torchrun or srun the processes of one run
share rank 0's lock.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".lock"


class FolderLock:
    """The lock of ``folder`` for one run (``what`` names the folder in messages)."""

    def __init__(self, folder: str | os.PathLike, what: str = "the folder") -> None:
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_NAME
        self.held = False

    def acquire(self) -> FolderLock:
        """Take the lock (creating the folder), or raise ValueError naming its holder."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(
                f"cannot write to {self.what.removeprefix('the ')} {self.folder}: {e.strerror}; "
                "choose another folder"
            ) from None
        for _ in range(3):  # a stale lock is moved away and the creation tried again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._clear_stale()
                continue
            except OSError as e:
                raise ValueError(f"cannot lock {self.what} {self.folder}: {e.strerror}") from None
            with os.fdopen(fd, "w") as f:
                json.dump(_owner(), f)
            self.held = True
            atexit.register(self.release)
            return self
        raise ValueError(f"could not take the lock of {self.what} {self.folder}; try again")

    def release(self) -> None:
        """Remove the lock if this run holds it (idempotent)."""
        if self.held:
            self.held = False
            try:
                if _read(self.path).get("pid") == os.getpid():
                    self.path.unlink()
            except OSError:
                pass

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _clear_stale(self) -> None:
        """Move a dead process's lock aside (a note says so), or refuse for a live or foreign one."""
        owner = _read(self.path)
        if not owner:  # being written by its creator this very moment, or damaged: look again
            time.sleep(0.05)
            owner = _read(self.path)
            if not owner:
                raise ValueError(
                    f"{self.path} is not a lock pdm wrote; if no run uses {self.folder}, remove it"
                )
        host, pid = owner.get("host"), owner.get("pid")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
        if host != socket.gethostname():
            raise ValueError(
                f"{self.what} {self.folder} is in use by pid {pid} on host {host} (since {since}); "
                f"run elsewhere, or remove {self.path} if that run is gone"
            )
        if _alive(pid):
            raise ValueError(
                f"{self.what} {self.folder} is in use by another run (pid {pid}, since {since}: "
                f"{owner.get('command', '?')}); wait for it or choose another folder"
            )
        try:
            os.replace(self.path, self.path.with_name(f"{LOCK_NAME}.stale-{pid}"))
            os.unlink(self.path.with_name(f"{LOCK_NAME}.stale-{pid}"))
        except FileNotFoundError:
            return  # another run took it over first; the creation will tell
        print(
            f"note: took over the lock of {self.folder} from pid {pid}, which is no longer running",
            file=sys.stderr,
        )


def _owner() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.time(),
        "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[
            :300
        ],
    }


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
