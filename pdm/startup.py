"""Signals from a program's first line: what a scheduler sends while the job is still starting.

SLURM's ``--signal=USR1@T`` can arrive up to a minute early, cloud spot machines send SIGTERM at any
time, and a person may press Ctrl-C while Python is still importing. With Python's defaults the
first two kill the process at once (no checkpoint, no requeue) and the last raises wherever it
lands. :func:`hold_signals` is called by ``train.py`` before any heavy import (this module needs
only the standard library): from then on SIGTERM, SIGUSR1 and SIGINT are only recorded in
:data:`EARLY`, and the training callback :class:`pdm.training.Preemption` acts on the first one as
soon as the run can (it saves the step reached, requeues under SLURM, exits 128 + signal).
"""

from __future__ import annotations

import signal
import threading

EARLY: list[int] = []  # signals received before the run could act on them, in order
HELD = ("SIGTERM", "SIGUSR1", "SIGINT")


def _record(signum: int, frame) -> None:
    if signum == signal.SIGINT and signal.SIGINT in EARLY:  # Ctrl-C twice: stop now
        raise KeyboardInterrupt
    EARLY.append(signum)


def hold_signals(names: tuple[str, ...] = HELD) -> None:
    """Record ``names`` instead of dying of them (main thread only; others cannot set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for name in names:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _record)
