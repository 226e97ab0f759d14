"""Shared pieces of the dataset preparation scripts: arguments, errors, progress, safe output."""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class PrepareError(Exception):
    """A problem with the input or output that the user can fix; printed as one line, exit code 2."""


def parser(description: str, default_out: str) -> argparse.ArgumentParser:
    """The arguments every prepare script takes."""
    p = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )  # a mistyped flag is an error, not a guess
    p.add_argument("--source", required=True, help="the local copy to read (what it may be: above)")
    p.add_argument(
        "--out", default=default_out, help=f"where the config reads it (default {default_out})"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--limit", type=int, default=None, help="use only the first N images (a quick try)"
    )
    return p


def fresh_output(out: Path, overwrite: bool) -> Path:
    """A temporary folder beside ``out``; the caller renames it to ``out`` when complete, so an
    interrupted run never leaves a half-written dataset under the name the config reads."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PrepareError(
            f"{out} exists and is not empty; pass --overwrite to replace it or choose another --out"
        )
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    return tmp


def finish(tmp: Path, out: Path) -> None:
    """Move a completed temporary output into place."""
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def progress(items: Iterable[T], total: int | None, desc: str) -> Iterator[T]:
    """A tqdm progress bar on stderr."""
    from tqdm.auto import tqdm

    yield from tqdm(items, total=total, desc=desc, unit="img", file=sys.stderr)


def dataset_from_rows(rows, features, workdir: Path):
    """``datasets.Dataset.from_generator`` with its cache in ``workdir`` (not the user's home) and
    a PrepareError raised inside the generator passed through as itself."""
    import datasets

    try:
        return datasets.Dataset.from_generator(rows, features=features, cache_dir=str(workdir))
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, PrepareError):
            raise cause from None
        raise


def run(main) -> None:
    """Run ``main()``; a PrepareError becomes one line on stderr and exit code 2, Ctrl-C exit 130."""
    try:
        main()
    except PrepareError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(
            f"{Path(sys.argv[0]).name}: interrupted; nothing was written under --out",
            file=sys.stderr,
        )
        raise SystemExit(130) from None  # 128 + SIGINT, as a shell reports Ctrl-C
