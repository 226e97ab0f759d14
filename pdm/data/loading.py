"""The loading every data module shares: the resumable training order and loader, the
train/validation split, batch size and workers (:class:`DataModuleBase`)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, random_split
from torchdata.stateful_dataloader import StatefulDataLoader

from pdm.data.decoding import ImageSource


class EpochShuffle(DistributedSampler):
    """The training order: a shuffle that is a function of (seed, epoch) alone, this process's
    share of it under DDP (every ``world_size``-th index), the whole of it otherwise.

    It is a DistributedSampler, so Lightning keeps it under DDP and sets its epoch; its epoch
    is also restored from the data module's checkpoint state before the first batch, because
    Lightning builds the resumed iterator before it sets the epoch.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, epoch: int = 0) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        super().__init__(
            dataset,
            num_replicas=None if distributed else 1,
            rank=None if distributed else 0,
            shuffle=True,
            seed=seed,
            drop_last=True,
        )
        self.set_epoch(epoch)


class _Loader(StatefulDataLoader):
    """StatefulDataLoader that can be told to start its epoch afresh whatever state it is given."""

    def __init__(self, *args, ignore_saved_position: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ignore_saved_position = ignore_saved_position

    def load_state_dict(self, state_dict: dict) -> None:
        if not self.ignore_saved_position:
            super().load_state_dict(state_dict)


class DataModuleBase(L.LightningDataModule):
    """Shared loader settings: batch size, workers, a seeded train/val split (``seed``) and a
    seeded training order (``shuffle_seed``, by default ``seed``).

    The training loader is torchdata's ``StatefulDataLoader`` over an :class:`EpochShuffle`:
    how many batches of the epoch were served goes into every checkpoint, so a run resumed
    mid-epoch sees exactly the batches the uninterrupted run would have seen, in a single
    process and under DDP (where Lightning puts its distributed sampler, also a function of
    (seed, epoch), in its place and the loader fast-forwards through the served batches).
    """

    def __init__(
        self,
        batch_size: int,
        num_workers: int,
        val_fraction: float,
        seed: int,
        skip_bad_images: bool = False,
        max_bad_fraction: float = 0.01,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.skip_bad_images, self.max_bad_fraction = skip_bad_images, max_bad_fraction
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(
                f"val_fraction must be in [0, 1), got {val_fraction}; 0 trains on everything"
            )
        self.batch_size, self.num_workers, self.val_fraction, self.seed = (
            batch_size,
            num_workers,
            val_fraction,
            seed,
        )
        # the training order's seed; ``seed`` when not given. Apart from ``seed`` (which also
        # draws the train/validation split), so that repeats of an ablation train on different
        # orders and are all scored on the same held-out images
        self.shuffle_seed = seed if shuffle_seed is None else int(shuffle_seed)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._restored: dict | None = None

    def _split(self, full: Dataset) -> None:
        if isinstance(full, ImageSource):
            full.set_bad_image_policy(self.skip_bad_images, self.max_bad_fraction)
        n_val = int(len(full) * self.val_fraction)
        if len(full) - n_val < self.batch_size:
            raise ValueError(
                f"{len(full) - n_val} training images are fewer than one batch of {self.batch_size}; "
                "lower data.batch_size or data.val_fraction"
            )
        if n_val == 0:
            self.train_set, self.val_set = full, None
            return
        g = torch.Generator().manual_seed(self.seed)
        self.train_set, self.val_set = random_split(full, [len(full) - n_val, n_val], generator=g)

    def train_dataloader(self) -> StatefulDataLoader:
        restored = self._restored or {}
        finished = bool(
            restored.get("epoch_finished")
        )  # saved on the last batch: start the next epoch afresh
        return _Loader(
            self.train_set,
            batch_size=self.batch_size,
            drop_last=True,
            ignore_saved_position=finished,
            sampler=EpochShuffle(
                self.train_set, self.shuffle_seed, restored.get("epoch", 0) + finished
            ),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def state_dict(self) -> dict:
        """The epoch training is in and whether it was finished (the loader's own state holds
        the position inside it)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {
            "epoch": trainer.current_epoch,
            "epoch_finished": done >= trainer.num_training_batches,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Remember the epoch to resume in (applied when the train loader is built)."""
        self._restored = dict(state_dict or {})

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return DataLoader(
            self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers
        )
