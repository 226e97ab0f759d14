"""A callback for the pre-emption tests: the process sends itself a signal at the start of one
optimiser step (so the signal arrives in the middle of that step, as a scheduler's would)."""

import os
import signal

import lightning as L


class SignalAt(L.Callback):
    """Send ``signame`` to this process when optimiser step ``step`` begins (rank 0 only)."""

    def __init__(self, step: int = 3, signame: str = "SIGTERM") -> None:
        self.step, self.signame = step, signame

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == 0:
            os.kill(os.getpid(), getattr(signal, self.signame))
