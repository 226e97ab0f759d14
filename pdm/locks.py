"""One run per folder at a time: a lock file whose holder proves itself alive by renewing it.

``FOLDER/.lock`` is created with O_CREAT | O_EXCL (of two runs started together exactly one
creates it) and holds the owner's host, pid, the pid's start time (boot id and start tick from
``/proc``), its SLURM job and restart count, and its command. While the run lives a daemon thread
renews the lease every :data:`HEARTBEAT` seconds (it touches the file's modification time); the
lock is removed when the run ends, however it ends short of a kill.

A lock left behind is taken over, with a note, when

- its lease was not renewed for :data:`STALE` seconds, whatever host wrote it (a node that died,
  a job killed by the OOM killer or a KillWait);
- it was written by an earlier start of this same SLURM job (``SLURM_JOB_ID`` equal,
  ``SLURM_RESTART_COUNT`` lower): a requeue, on this node or another, continues its own run at once;
- it names a process of this host (and this boot) that no longer exists, or a pid that now belongs
  to another process (its start time differs: pids are reused, containers restart at small ones).

Any other lock, one whose holder renewed it lately, refuses the run in one line that names the
holder and when its lock goes stale. Under torchrun or srun the processes of one run share rank
0's lock.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

LOCK_NAME = ".lock"
HEARTBEAT = 30.0  # seconds between renewals of a held lock
STALE = 180.0  # a lock not renewed for this long belongs to no live run, on any host


class FolderLock:
    """The lock of ``folder`` for one run (``what`` names the folder in messages)."""

    def __init__(self, folder: str | os.PathLike, what: str = "the folder") -> None:
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_NAME
        self.held = False
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

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
            self._stop.clear()
            self._renewer = threading.Thread(target=self._renew, name="pdm-lock", daemon=True)
            self._renewer.start()
            atexit.register(self.release)
            return self
        raise ValueError(f"could not take the lock of {self.what} {self.folder}; try again")

    def _renew(self) -> None:
        """Touch the lock every HEARTBEAT seconds while it is held (the lease)."""
        while not self._stop.wait(HEARTBEAT):
            try:
                if _read(self.path).get("pid") == os.getpid():
                    os.utime(self.path)
            except OSError:
                pass  # a full or vanished disk: the run itself will say so

    def release(self) -> None:
        """Remove the lock if this run holds it (idempotent)."""
        if self.held:
            self.held = False
            self._stop.set()
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
        """Move a lock that no live run holds aside (a note says why), or refuse in one line."""
        owner = _read(self.path)
        if not owner:  # being written by its creator this very moment, or damaged: look again
            time.sleep(0.05)
            owner = _read(self.path)
            if not owner:
                raise ValueError(
                    f"{self.path} is not a lock pdm wrote; if no run uses {self.folder}, remove it"
                )
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile; the creation will tell
        why = stale_reason(owner, age)
        if why is None:
            host, pid = owner.get("host"), owner.get("pid")
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
            stale_at = time.strftime("%H:%M:%S", time.localtime(time.time() - age + STALE))
            raise ValueError(
                f"{self.what} {self.folder} is in use by another run (pid {pid} on {host}, since "
                f"{since}: {owner.get('command', '?')}; renewed {age:.0f} s ago); wait for it or "
                f"choose another folder (if that run is gone its lock goes stale at {stale_at}, "
                f"{STALE:.0f} s after its last renewal)"
            )
        pid = owner.get("pid")
        try:
            os.replace(self.path, self.path.with_name(f"{LOCK_NAME}.stale-{pid}"))
            os.unlink(self.path.with_name(f"{LOCK_NAME}.stale-{pid}"))
        except FileNotFoundError:
            return  # another run took it over first; the creation will tell
        print(f"note: took over the lock of {self.folder} from pid {pid}: {why}", file=sys.stderr)


def stale_reason(owner: dict, age: float, environ=None) -> str | None:
    """Why the lock of ``owner``, last renewed ``age`` seconds ago, holds no live run (None
    where it may: the run is refused)."""
    environ = os.environ if environ is None else environ
    host, pid = owner.get("host"), owner.get("pid")
    job = environ.get("SLURM_JOB_ID")
    if job and owner.get("slurm_job") == job:
        theirs = _int(owner.get("slurm_restart"))
        mine = _int(environ.get("SLURM_RESTART_COUNT"))
        if theirs < mine:
            return f"an earlier start of this SLURM job {job} (restart {theirs}; this is {mine})"
    if age > STALE:
        return f"its lease was last renewed {age:.0f} s ago (stale after {STALE:.0f} s)"
    if host != socket.gethostname():
        return None  # another host's process cannot be checked from here: the lease decides
    if not _alive(pid):
        return "that process is no longer running"
    start = owner.get("pid_start")
    if start is not None and _start_of(pid) not in (None, start):
        return f"pid {pid} now belongs to another process"
    return None


def _owner() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": _start_of(os.getpid()),
        "started": time.time(),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart": _int(os.environ.get("SLURM_RESTART_COUNT")),
        "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[
            :300
        ],
    }


def _int(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _start_of(pid) -> str | None:
    """``BOOT_ID:START_TICK`` of a process (what tells a reused pid apart), None without /proc."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError, TypeError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
    return f"{boot}:{fields[19]}"  # field 22 of proc(5): the start time in clock ticks


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
