"""What a calibration spends, and the one memory of repeated calls that saves most of it.

A calibration scores many candidate schedules that differ from the current best in one time or
one coefficient: until that step every candidate's trajectory is the current one's, bit for
bit, so its network calls there are repeats (and so are a teleport's closed-form starts).
:class:`RecallingModel` answers them from memory; :class:`CountingModel` counts what reaches
the network.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

ModelFn = Callable[..., Tensor]


class CountingModel:
    """A ``model_fn`` that records how many calls it got and how many images (rows) they held:
    what a calibration or a test spends, whoever calls the model (with guidance each image counts
    once, though the guided network runs twice)."""

    def __init__(self, fn: ModelFn) -> None:
        self.fn, self.rows, self.calls = fn, 0, 0

    def __call__(self, x: Tensor, t: Tensor, **kwargs) -> Tensor:
        self.rows += x.shape[0]
        self.calls += 1
        return self.fn(x, t, **kwargs)


def input_digest(named: Iterable[tuple[str, Any]]) -> bytes:
    """BLAKE2 digest of named inputs: each tensor's dtype, shape, device and bytes (others by repr),
    so two calls get the same digest exactly when their inputs are the same bit for bit."""
    h = hashlib.blake2b(digest_size=20)
    for name, value in named:
        h.update(name.encode())
        if isinstance(value, Tensor):
            h.update(f"{value.dtype}{tuple(value.shape)}{value.device}".encode())
            flat = value.detach().cpu().reshape(-1)
            dense = torch.empty(flat.shape, dtype=flat.dtype).copy_(
                flat
            )  # an expanded t has stride 0
            h.update(dense.view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(value).encode())
    return h.digest()


class RecallingModel:
    """A function (a ``model_fn``, a teleport) that remembers its outputs for the last inputs it
    saw and answers a repeated call (the same arguments, bit for bit) from memory.

    The result is exactly the one without memory (on a CPU the network is deterministic on the
    same input; with non-deterministic GPU kernels the remembered output is one the network gave
    for it). Inputs are recognised by a BLAKE2 digest of their bytes; the oldest entries are
    forgotten beyond ``max_bytes`` of remembered outputs. ``hits`` counts the calls answered from
    memory. Attributes of the wrapped function (e.g. a teleport's ``record``) show through."""

    def __init__(self, fn: Callable[..., Tensor], max_bytes: int = 1 << 30) -> None:
        self.fn, self.max_bytes, self.hits, self.held = fn, max_bytes, 0, 0
        self.memory: OrderedDict[bytes, Tensor] = OrderedDict()

    def __getattr__(self, name: str) -> Any:
        if name == "fn":  # not yet set (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.fn, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        key = input_digest([(f"{i}", a) for i, a in enumerate(args)] + sorted(kwargs.items()))
        if key in self.memory:
            self.hits += 1
            self.memory.move_to_end(key)
            return self.memory[key].clone()
        out = self.fn(*args, **kwargs)
        size = out.numel() * out.element_size()
        if size <= self.max_bytes:
            self.memory[key], self.held = out.detach().clone(), self.held + size
            while self.held > self.max_bytes:
                _, old = self.memory.popitem(last=False)
                self.held -= old.numel() * old.element_size()
        return out
