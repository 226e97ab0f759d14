"""Decoding training images, and what an unreadable or truncated one does to a run.

Every dataset of encoded images (an image folder, LSUN's LMDB, a Hugging Face dataset) is an
:class:`ImageSource`: it says how to load item i and how to name it, and this class decides
what a file that will not decode does. By default the run stops at once with a one-line error
naming the file (a damaged dataset should be fixed, not silently trained around). With
``skip_bad_images`` the item is replaced by the next readable one (so batches keep their size
and a resumed run sees the same replacement), each skipped file is named in a warning with the
count so far, and the run stops once more than ``max_bad_fraction`` of the dataset has proved
unreadable. Counts are per loader worker.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch.utils.data import Dataset


def decode_errors() -> tuple[type[BaseException], ...]:
    """What PIL raises for a file that is not an image, is truncated or is corrupt."""
    from PIL import Image

    return (OSError, SyntaxError, Image.DecompressionBombError)


class ImageSource(Dataset):
    """A dataset of encoded images with a policy for the ones that do not decode.

    Subclasses implement :meth:`load` (item i, decoded and transformed) and :meth:`describe`
    (a name a person can find the item by: a path, an LMDB key, a dataset row).
    """

    skip_bad: bool = False
    max_bad_fraction: float = 0.01

    def set_bad_image_policy(self, skip: bool, max_fraction: float) -> None:
        """Stop at the first unreadable image (``skip`` False) or skip up to ``max_fraction`` of them."""
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_fraction}")
        self.skip_bad, self.max_bad_fraction = skip, max_fraction

    def load(self, i: int) -> tuple[Any, int]:
        raise NotImplementedError

    def describe(self, i: int) -> str:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[Any, int]:
        errors = decode_errors()
        n = len(self)
        for j in range(i, i + n):  # an unreadable item is replaced by the next readable one
            k = j % n
            try:
                return self.load(k)
            except errors as e:
                self._bad(k, e)
        raise ValueError(f"none of the {n} images can be read; check the dataset")

    def _bad(self, k: int, error: BaseException) -> None:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        if not self.skip_bad:
            raise ValueError(
                f"cannot read image {self.describe(k)}: {reason}; replace or delete it, or set "
                "data.init_args.skip_bad_images: true to skip unreadable images"
            ) from None
        bad = self.__dict__.setdefault("_bad_items", set())
        bad.add(k)
        if len(bad) > self.max_bad_fraction * len(self):
            raise ValueError(
                f"{len(bad)} of {len(self)} images cannot be read, more than max_bad_fraction="
                f"{self.max_bad_fraction} (the last: {self.describe(k)}); repair the dataset"
            ) from None
        warnings.warn(
            f"skipped unreadable image {self.describe(k)} ({reason}); {len(bad)} skipped so far",
            stacklevel=2,
        )

    @property
    def skipped(self) -> int:
        """How many distinct items this process found unreadable."""
        return len(self.__dict__.get("_bad_items", ()))
