"""Prepare LSUN Church for configs/lsun_church_p*.yaml: the LMDB folder under data/lsun.

    python data/prepare_lsun.py --source church_outdoor_train_lmdb.zip --out data/lsun

--source is the zip that LSUN's download script fetches (download.py -c church_outdoor), or the
``church_outdoor_train_lmdb`` folder it unpacks to (data.mdb, lock.mdb). The LMDB is checked
(it opens, holds images that decode) and placed at ``<out>/church_outdoor_train_lmdb``, the path
pdm.data.LSUNDataModule(root="data/lsun") reads. With --limit a smaller LMDB of the first N
images is written instead. Needs ``pip install lmdb``.
"""

from __future__ import annotations

import io
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PrepareError, finish, fresh_output, parser, progress, run  # noqa: E402


def locate(source: Path, category: str, workdir: Path) -> Path:
    """The LMDB folder inside ``source`` (unzipping it first when it is an archive)."""
    name = f"{category}_train_lmdb"
    if source.is_file():
        if not zipfile.is_zipfile(source):
            raise PrepareError(
                f"{source} is not a zip archive; pass {name}.zip or the folder it unpacks to"
            )
        with zipfile.ZipFile(source) as z:
            z.extractall(workdir)
        source = workdir
    for candidate in (source, source / name):
        if (candidate / "data.mdb").exists():
            return candidate
    raise PrepareError(f"no {name} LMDB (data.mdb) found in {source}")


def check_and_copy(lmdb_dir: Path, dest: Path, limit: int | None) -> int:
    """Open the LMDB, decode its images (all of them with --limit, else a sample), copy it to dest."""
    try:
        import lmdb
    except ImportError:
        raise PrepareError("reading LSUN needs the lmdb package: pip install lmdb") from None
    from PIL import Image, UnidentifiedImageError

    env = lmdb.open(str(lmdb_dir), readonly=True, lock=False, readahead=False, meminit=False)
    count = env.stat()["entries"]
    if count == 0:
        raise PrepareError(f"{lmdb_dir} holds no images")
    keep = count if limit is None else min(limit, count)
    out_env = lmdb.open(str(dest), map_size=1 << 36) if limit is not None else None
    with env.begin() as txn:
        cursor = txn.cursor()
        for i, (key, value) in enumerate(progress(cursor, keep, "lsun")):
            if i >= keep:
                break
            if (
                limit is not None or i < 100
            ):  # decode every kept image, or the first 100 of a full copy
                try:
                    Image.open(io.BytesIO(value)).verify()
                except (UnidentifiedImageError, OSError):
                    raise PrepareError(
                        f"entry {key!r} of {lmdb_dir} is not an image; is the download complete?"
                    ) from None
            if out_env is not None:
                with out_env.begin(write=True) as out_txn:
                    out_txn.put(key, value)
    env.close()
    if out_env is None:
        shutil.copytree(lmdb_dir, dest)
    else:
        out_env.close()
    return keep


def main() -> None:
    p = parser(__doc__, "data/lsun")
    p.add_argument(
        "--category", default="church_outdoor", help="LSUN category (default church_outdoor)"
    )
    args = p.parse_args()
    source, out = Path(args.source), Path(args.out)
    if not source.exists():
        raise PrepareError(
            f"--source {source} does not exist; fetch {args.category}_train_lmdb.zip with LSUN's "
            "download.py on a machine with internet"
        )
    tmp = fresh_output(out, args.overwrite)
    with tempfile.TemporaryDirectory() as work:
        lmdb_dir = locate(source, args.category, Path(work))
        tmp.mkdir(parents=True)
        n = check_and_copy(lmdb_dir, tmp / f"{args.category}_train_lmdb", args.limit)
    finish(tmp, out)
    print(f"wrote {out / (args.category + '_train_lmdb')}: {n} images")


if __name__ == "__main__":
    run(main)
