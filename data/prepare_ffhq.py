"""Prepare FFHQ for configs/ffhq1024_p4.yaml: a folder of images under data/ffhq.

    python data/prepare_ffhq.py --source /datasets/ffhq/images1024x1024 --out data/ffhq

--source is the ``images1024x1024`` folder of the official FFHQ release (00000/00000.png, ...),
a zip of it, or any folder of the face images. Every image is checked (it opens and is at least
--size pixels on its short side) and copied (or, with --link, symlinked) flat into --out, the
folder pdm.data.ImageFolderDataModule(root="data/ffhq") reads.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PrepareError, finish, fresh_output, parser, progress, run  # noqa: E402

SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def main() -> None:
    from PIL import Image, UnidentifiedImageError

    p = parser(__doc__, "data/ffhq")
    p.add_argument(
        "--size", type=int, default=1024, help="the smallest short side accepted (default 1024)"
    )
    p.add_argument("--link", action="store_true", help="symlink the images instead of copying them")
    args = p.parse_args()
    source, out = Path(args.source), Path(args.out)
    if not source.exists():
        raise PrepareError(
            f"--source {source} does not exist; download FFHQ's images1024x1024 on a machine with "
            "internet (github.com/NVlabs/ffhq-dataset)"
        )
    tmp = fresh_output(out, args.overwrite)
    with tempfile.TemporaryDirectory() as work:
        if source.is_file():
            if not zipfile.is_zipfile(source):
                raise PrepareError(f"{source} is neither a folder nor a zip of images")
            if args.link:
                raise PrepareError("--link needs a folder, not a zip")
            with zipfile.ZipFile(source) as z:
                z.extractall(work)
            source = Path(work)
        files = sorted(f for f in source.rglob("*") if f.suffix.lower() in SUFFIXES)[: args.limit]
        if not files:
            raise PrepareError(f"no images ({', '.join(sorted(SUFFIXES))}) under {source}")
        tmp.mkdir(parents=True)
        for f in progress(files, len(files), "ffhq"):
            try:
                with Image.open(f) as im:
                    size = im.size
                    im.verify()
            except (UnidentifiedImageError, OSError):
                raise PrepareError(f"cannot read {f}; delete it or re-download it") from None
            if min(size) < args.size:
                raise PrepareError(f"{f} is {size[0]}x{size[1]}, smaller than --size {args.size}")
            target = tmp / f"{f.parent.name}_{f.name}" if f.parent != source else tmp / f.name
            if args.link:
                os.symlink(f.resolve(), target)
            else:
                shutil.copyfile(f, target)
    finish(tmp, out)
    print(f"wrote {out}: {len(files)} images")


if __name__ == "__main__":
    run(main)
