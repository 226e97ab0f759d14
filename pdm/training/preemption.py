"""Pre-emption: a signal to a training run finishes the step, saves it, and exits unfinished.

Clusters stop jobs with a signal before the kill: SLURM sends SIGUSR1 (``--signal=USR1@90``) or
SIGTERM, cloud spot machines SIGTERM, a person Ctrl-C (SIGINT). :class:`Preemption` turns any
of them into Lightning's own stop: Lightning raises ``SIGTERMException`` at the end of a
training step once ``trainer.received_sigterm`` is set, its ``on_exception`` hooks run, and the
exception leaves ``trainer.fit``. This callback

1. records the signal (the handler only writes a number: no I/O, no collective, so it is safe
   wherever the signal lands, e.g. inside a gradient all-reduce);
2. after each optimiser step, lets every rank agree whether any rank was signalled (one
   boolean reduction) and, if so, sets ``received_sigterm`` on all ranks at that same step;
3. on the resulting ``SIGTERMException``, saves the state of that step as the run's
   ``last.ckpt`` through the checkpoint callback's own last-save (atomic: the previous
   ``last.ckpt`` stays loadable until the new one is complete), asks SLURM to requeue the job
   when its requeue signal arrived under Lightning's SLURM environment with auto-requeue, and
   gives the exception the exit code 128 + signal (143 SIGTERM, 138 SIGUSR1, 130 SIGINT):
   Lightning's ``SIGTERMException`` is a ``SystemExit`` with code 0, which a scheduler reads
   as success.

Why not Lightning's handlers as they are: its SIGTERM handler broadcasts a tensor from inside
the signal handler, which under DDP meets whatever collective the other ranks are in, and its
SLURM SIGUSR1 handler saves at once, in the middle of a step. Why not ``OnExceptionCheckpoint``:
it saves on every exception (a crash in the middle of a step would replace the last good state
with a half-made one) and deletes its file when a run ends. ``--ckpt_path last`` resumes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from pdm.startup import EARLY, hold_signals  # EARLY: signals received before training started

SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


def catch_early_signals() -> None:
    """Record SIGTERM, SIGUSR1 and SIGINT from now on instead of dying of them: a scheduler's
    signal can come while the job is still starting (importing, loading data, restoring a
    checkpoint, compiling), before :class:`Preemption` listens. It acts on them after the first
    step, as on any other. ``train.py`` does this on its first line (:mod:`pdm.startup`)."""
    hold_signals()


class Preemption(L.Callback):
    """Finish the step, save ``last.ckpt`` and exit with 128 + signal on SIGTERM, SIGUSR1 or SIGINT.

    A second SIGINT (Ctrl-C twice) stops at once, without saving.

    Args:
        signals: the signals that stop the run this way.
    """

    def __init__(self, signals: tuple[str, ...] = SIGNALS) -> None:
        unknown = [s for s in signals if not hasattr(signal, s)]
        if unknown:
            raise ValueError(
                f"unknown signal names {unknown}; use names such as {', '.join(SIGNALS)}"
            )
        self.signals = tuple(signals)
        self.signum: int | None = None  # the first signal this process received
        self.agreed: int | None = None  # the signal all ranks stop for
        self.saved: str | None = None
        self._previous: dict[int, Any] = {}
        self._trainer: L.Trainer | None = None

    # --- the signal -------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Install the handlers (after Lightning's own, which this replaces for these signals)."""
        self._trainer, self.signum, self.agreed, self.saved = trainer, None, None, None
        if not _main_thread():
            return
        for name in self.signals:
            num = getattr(signal, name)
            self._previous[num] = signal.signal(num, self._record)
        if EARLY:  # a signal that came while the run was starting: stop after the first step
            self._record(EARLY[0], None)

    def _record(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:  # Ctrl-C again: stop now
                raise KeyboardInterrupt
            return
        self.signum = signum
        launcher = (
            getattr(self._trainer.strategy, "launcher", None) if self._trainer is not None else None
        )
        if launcher is not None and hasattr(launcher, "kill"):
            launcher.kill(
                signum
            )  # ranks Lightning started itself get the signal too, as Lightning does

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        """Every rank stops at the same step if any rank was signalled."""
        local = self.signum or 0
        if (
            trainer.world_size > 1
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        ):
            value = torch.tensor([local], device=trainer.strategy.root_device)
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
            local = int(value.item())
        if local:
            self.agreed = local
            trainer._signal_connector.received_sigterm = (
                True  # Lightning raises SIGTERMException after this step
            )

    # --- the stop ---------------------------------------------------------------------------------
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Save the step reached, requeue under SLURM, and make the exit code say 'unfinished'."""
        self._restore()
        if not isinstance(exception, SIGTERMException) or self.agreed is None:
            return
        signum = self.agreed
        self.saved = save_last(trainer)
        requeued = self._requeue(trainer, signum)
        exception.code = 128 + signum
        if trainer.is_global_zero:
            name = signal.Signals(signum).name
            where = f"saved {self.saved}" if self.saved else "no checkpoint callback, nothing saved"
            then = "the job is requeued" if requeued else "resume with --ckpt_path last"
            print(
                f"train.py: stopped by {name} after step {trainer.global_step}; {where}; {then}",
                file=sys.stderr,
                flush=True,
            )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def _restore(self) -> None:
        if _main_thread():
            for num, handler in self._previous.items():
                signal.signal(num, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    @staticmethod
    def _requeue(trainer: L.Trainer, signum: int) -> bool:
        """``scontrol requeue`` the job (rank 0) when SLURM's requeue signal stopped it under
        Lightning's SLURM environment with auto-requeue on."""
        env = trainer._accelerator_connector.cluster_environment
        if not (
            isinstance(env, SLURMEnvironment) and env.auto_requeue and signum == env.requeue_signal
        ):
            return False
        if not trainer.is_global_zero:
            return True
        array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = (
            f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            if array_job
            else os.environ["SLURM_JOB_ID"]
        )
        try:
            return subprocess.call(["scontrol", "requeue", job]) == 0
        except OSError:
            print(
                f"train.py: could not run `scontrol requeue {job}`; resubmit the job",
                file=sys.stderr,
            )
            return False


def save_last(trainer: L.Trainer) -> str | None:
    """Save the trainer's state as the checkpoint callback's ``last.ckpt`` (through its own
    last-save, so its bookkeeping and atomic IO apply); the path, or None without one."""
    callback = next(
        (cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)), None
    )
    if callback is None:
        return None
    if getattr(callback, "dirpath", None) is None and hasattr(callback, "folder"):
        callback.folder(trainer)
    candidates = callback._monitor_candidates(trainer)
    if callback.save_last:
        callback._save_last_checkpoint(trainer, candidates)
        return callback.last_model_path
    path = os.path.join(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
    trainer.save_checkpoint(path)
    return path


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
