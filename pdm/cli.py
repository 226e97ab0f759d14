"""What every command line of pdm shares: the parser's rules, the device, the seed and guidance
checks, and how a refusal is printed.

Scripts (``sample.py``, ``calibrate.py``, ``python -m pdm.*``, the data and benchmark scripts)
build their parsers here, so that they all refuse abbreviated flags (argparse would otherwise take
``--max-skip`` for ``--max-skips`` and ``--ord`` for ``--order``, and the "a flag that does nothing
is an error" checks would never see them). No script imports another script.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

import torch

SEED_LIMIT = 2**32  # (seed << 32) + index seeds torch's 64-bit generator
EXIT_BAD_INPUT = 2  # argparse's own code for a usage error; every refusal uses it
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def parser(description: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """An argument parser that takes flags only as written in full (``allow_abbrev=False``)."""
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def given_flags(argv: Sequence[str] | None) -> set[str]:
    """The long flags written on the command line, as argparse's destinations (``--max-skips`` ->
    ``max_skips``): what the user asked for, as opposed to a default."""
    argv = sys.argv[1:] if argv is None else argv
    return {
        a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--") and len(a) > 2
    }


def fail(prog: str, message: str, code: int = EXIT_BAD_INPUT) -> None:
    """Print ``prog: error: message`` on one line of stderr and exit with ``code``."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(code)


def parse_device(name: str | None) -> torch.device:
    """A usable torch device (default: CUDA when available), or a ValueError naming the choices."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {name} asked for, but no CUDA GPU is available; use --device cpu"
        )
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name!r} is not supported; use cpu or cuda")
    return device


def check_seed(seed: int, flag: str = "--seed") -> None:
    """A seed must fit the 32 bits that per-image seeding leaves it."""
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{flag} must be in [0, 2^32), got {seed}")


def check_guidance_scale(scale: float) -> None:
    """Classifier-free guidance scales are finite and >= 0: 0 samples the unconditional model, 1
    the conditional one, above 1 pushes away from the unconditional prediction. A negative scale
    extrapolates past the unconditional prediction, away from the class asked for (a newcomer's
    digits samples then scored 0% classifier accuracy), which nobody means to do."""
    if not math.isfinite(scale):
        raise ValueError(f"--guidance-scale must be a finite number, got {scale}")
    if scale < 0:
        raise ValueError(
            f"--guidance-scale must be >= 0 (0: unconditional, 1: conditional, >1: guided; "
            f"PDM uses 1.5), got {scale}"
        )
