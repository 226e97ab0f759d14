"""Train a Patched Diffusion Model: ``python train.py fit --config configs/digits.yaml``.

LightningCLI builds the model (with its network from ``model.net``), data, trainer and
callbacks from the YAML. A run owns its ``--trainer.default_root_dir``: checkpoints go to
``<default_root_dir>/checkpoints`` (written atomically), logs and the saved config under
``lightning_logs/version_N``. ``--ckpt_path last`` resumes that run's latest checkpoint; a fresh
run into a folder that already holds checkpoints stops, so no run overwrites another's;
``--ckpt_path last`` with nothing to resume stops too (job scripts that run one command on every
start use ``--ckpt_path auto``: resume when there is a checkpoint, else start). Resuming a run that
has finished, or stretching a cosine learning-rate decay past the step it was made for, stops with
what to do instead. Any mistake in the config stops the run before any work, with a one-line
error and exit code 2.
"""

# first, before the imports that take seconds: a scheduler's signal during start-up is recorded
# and acted on once training can save (pdm.startup), not the death of the job
from pdm.startup import hold_signals

hold_signals()

import argparse
import logging
import os
import sys
import warnings

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from pdm.atomic import WriteError
from pdm.checkpoints import AtomicCheckpointIO, training_checkpoint
from pdm.training import PDMModule, Preemption
from pdm.training.module import check_data_fits_network, lr_factor
from pdm.training.preemption import catch_early_signals

CHECKPOINT_CALLBACKS = (
    "pdm.training.RunCheckpoint",
    "lightning.pytorch.callbacks.ModelCheckpoint",
    "ModelCheckpoint",
    "RunCheckpoint",
)


class PDMCLI(LightningCLI):
    """LightningCLI with pdm's run rules, checked on the parsed config before anything is built."""

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint's hyper-parameters here, before any hook (and before the
        # seed or a log folder): check what would be resumed first
        subcommand = self.config.get("subcommand")
        if subcommand == "fit":
            cfg = self.config[subcommand]
            cfg.ckpt_path = _resolve_resume(cfg)
            if cfg.ckpt_path is not None and cfg.ckpt_path not in ("hpc", "best", "registry"):
                path = (
                    max(_last_checkpoints(cfg), key=os.path.getmtime)
                    if cfg.ckpt_path == "last"
                    else os.fspath(cfg.ckpt_path)
                )
                _check_resumable(path, training_checkpoint(path), cfg)
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        if self.subcommand != "fit":
            return
        cfg = self.config[self.subcommand]
        _lock_run_folder(cfg)
        if cfg.get("ckpt_path") is None:
            for folder in _checkpoint_folders(cfg):
                if os.path.isdir(folder) and any(f.endswith(".ckpt") for f in os.listdir(folder)):
                    raise ValueError(
                        f"{folder} already holds checkpoints of another run; resume it with "
                        "--ckpt_path last, or start a new run with another --trainer.default_root_dir"
                    )

    def instantiate_trainer(self, **kwargs):
        check_data_fits_network(
            self.datamodule, getattr(self.model, "net", None)
        )  # before the Trainer exists
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        strategy = self.trainer.strategy
        if (
            type(strategy.checkpoint_io) is TorchCheckpointIO
        ):  # set here, so saved configs stay plain and re-run
            strategy.checkpoint_io = AtomicCheckpointIO()
        if not any(isinstance(cb, Preemption) for cb in self.trainer.callbacks):
            # SIGTERM / SIGUSR1 / SIGINT: finish the step, save last.ckpt, exit 128 + signal (requeue under SLURM)
            self.trainer.callbacks.append(Preemption())


def _lock_run_folder(cfg) -> None:
    """One run per folder: rank 0 holds ``<default_root_dir>/.lock`` until it exits (a run that
    writes nothing, the smoke overlay, takes no lock)."""
    from pdm.launch import detect
    from pdm.locks import FolderLock

    writes = cfg.trainer.get("enable_checkpointing") is not False or cfg.trainer.get(
        "logger"
    ) not in (False, None)
    if writes and detect().rank == 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        root = cfg.trainer.get("default_root_dir") or os.getcwd()
        _HELD.append(FolderLock(root, "the run folder").acquire())


_HELD: list = []  # this process's run-folder locks, released when main() returns or raises


def _checkpoint_folders(cfg) -> list[str]:
    """Where the configured checkpoint callbacks will write."""
    root = cfg.trainer.get("default_root_dir") or os.getcwd()
    folders = []
    for cb in cfg.trainer.get("callbacks") or []:
        class_path = getattr(cb, "class_path", "")
        if class_path in CHECKPOINT_CALLBACKS or class_path.endswith(
            ("ModelCheckpoint", "RunCheckpoint")
        ):
            dirpath = (cb.get("init_args") or {}).get("dirpath")
            folders.append(str(dirpath) if dirpath else os.path.join(str(root), "checkpoints"))
    return folders


def _last_checkpoints(cfg) -> list[str]:
    """The ``last*.ckpt`` files of the run's checkpoint folders (``--ckpt_path last`` takes the newest)."""
    return [
        os.path.join(d, f)
        for d in _checkpoint_folders(cfg)
        if os.path.isdir(d)
        for f in os.listdir(d)
        if f.startswith("last") and f.endswith(".ckpt")
    ]


def _resolve_resume(cfg):
    """``--ckpt_path`` with ``auto`` made concrete (``last`` when the run has a checkpoint, else a
    fresh start), and ``last`` refused when there is nothing to resume."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path not in ("last", "auto"):
        return ckpt_path
    has_last = bool(_last_checkpoints(cfg))
    if ckpt_path == "auto":
        return "last" if has_last else None
    if not has_last:
        where = ", ".join(_checkpoint_folders(cfg)) or "(no checkpoint callback is configured)"
        raise ValueError(
            f"--ckpt_path last: there is no last.ckpt to resume in {where}; drop --ckpt_path to start "
            "this run, or use --ckpt_path auto in job scripts (resume when there is one)"
        )
    return "last"


def _check_resumable(path: str, ckpt: dict, cfg) -> None:
    """Refuse to resume a finished run (Lightning would start a logger, then do nothing) or to
    stretch a cosine decay made for fewer steps (the run would go on at a learning rate near 0)."""
    step = int(ckpt.get("global_step", 0))
    max_steps = cfg.trainer.get("max_steps")
    made_for = ckpt.get("pdm_max_steps")
    model = cfg.get("model") or {}
    cosine = (
        model.get("lr_decay") or (ckpt.get("hyper_parameters") or {}).get("lr_decay")
    ) == "cosine"
    if max_steps is None or max_steps < 0:
        _check_same_settings(path, ckpt, cfg)
        return
    if cosine and made_for is not None and max_steps != made_for:
        lr = float(model.get("lr") or 0.0)
        now = lr * lr_factor(step, int(model.get("warmup_steps") or 1), "cosine", max_steps)
        raise ValueError(
            f"{path} was trained with a cosine learning-rate decay ending at step {made_for}; resuming at "
            f"step {step} with --trainer.max_steps {max_steps} would stretch it (learning rate {now:.1e} "
            f"of {lr:.1e}). Resume with --trainer.max_steps {made_for}, or train on from its weights in "
            f"a new run: --model.init_from {path} --trainer.default_root_dir NEW_FOLDER"
        )
    if step >= max_steps:
        raise ValueError(
            f"{path} has finished (step {step}, --trainer.max_steps {max_steps}); nothing to resume. "
            "Sample it, or train on from its weights in a new run: --model.init_from "
            f"{path} --trainer.default_root_dir NEW_FOLDER"
        )
    _check_same_settings(path, ckpt, cfg)


def _check_same_settings(path: str, ckpt: dict, cfg) -> None:
    """A resume continues the run it resumes: a model setting that differs from the checkpoint's
    would not be honoured (Lightning restores the checkpoint's), so it is refused, named."""
    saved = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if not k.startswith("_")}
    model = cfg.get("model")
    now = model.as_dict() if hasattr(model, "as_dict") else dict(model or {})
    changed = [f"{key} {old!r} -> {new!r}" for key, old, new in _differences(saved, now)]
    if changed:
        raise ValueError(
            f"{path} was trained with other settings than this command gives ({'; '.join(changed[:3])}"
            f"{' ...' if len(changed) > 3 else ''}); a resume continues a run as it was made. Drop the "
            f"change to resume, or train on from its weights in a new run: --model.init_from {path} "
            "--trainer.default_root_dir NEW_FOLDER"
        )


def _differences(saved, now, prefix: str = ""):
    """(dotted key, saved value, value now) where both name a setting and the values differ."""
    if isinstance(saved, dict) and isinstance(now, dict):
        for key in saved:
            if key in now:
                yield from _differences(saved[key], now[key], f"{prefix}{key}.")
        return
    if _plain(saved) != _plain(now):
        yield prefix.rstrip("."), saved, now


def _plain(value):
    """Numbers as floats and sequences as lists, so that 2 == 2.0 and (1, 2) == [1, 2]."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return value


class _DropAdvertisements(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


class _DropSeedLine(logging.Filter):
    """Lightning logs "Seed set to 0" before any config check; the seed is in the saved config,
    and a refusal should be the only line a mistake prints."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Seed set to")


class _SaveConfigWithLogs(SaveConfigCallback):
    """Save config.yaml beside the logs; a run without a logger (the smoke overlay) writes nothing."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.loggers:
            super().setup(trainer, pl_module, stage)


def _quiet_warnings() -> None:
    """Warnings that are not the user's to act on."""
    # Lightning compares log_every_n_steps with one epoch's batches, but counts logging steps
    # across epochs, so small datasets (the digits) log as configured despite the warning
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
    warnings.filterwarnings(
        "ignore", message=r".*'set_vital' is deprecated.*"
    )  # torchdata's own call
    warnings.filterwarnings(
        "ignore", message=r".*isinstance\(treespec, LeafSpec\).*"
    )  # Lightning on torch >= 2.9


def main() -> None:
    """Run LightningCLI on :class:`pdm.training.PDMModule` with any LightningDataModule."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdvertisements())
    logging.getLogger("lightning.fabric.utilities.seed").addFilter(_DropSeedLine())
    _quiet_warnings()
    catch_early_signals()  # a scheduler's signal during start-up is acted on after the first step
    try:
        PDMCLI(
            PDMModule,
            subclass_mode_data=True,
            save_config_callback=_SaveConfigWithLogs,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False, "allow_abbrev": False},
        )
    except (ValueError, argparse.ArgumentError, WriteError, MisconfigurationException) as e:
        cause = e
        while cause.__cause__ is not None and isinstance(cause.__cause__, ValueError):
            cause = cause.__cause__
        text = str(cause)
        if (
            "Original Traceback" in text
        ):  # re-raised from a DataLoader worker: keep the worker's own message
            text = text.strip().splitlines()[-1].split(": ", 1)[-1]
        message = " ".join(text.split())  # one line, whatever the parser's layout
        hint = "; see `python train.py fit --help`" if isinstance(e, argparse.ArgumentError) else ""
        print(f"train.py: error: {message}{hint}", file=sys.stderr)
        raise SystemExit(2) from None
    except FloatingPointError as e:  # a non-finite loss: the run stops, its last checkpoint intact
        print(f"train.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        _release()


def _release() -> None:
    while _HELD:
        _HELD.pop().release()


if __name__ == "__main__":
    main()
