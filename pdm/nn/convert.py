"""Official PatchDiffusion-Pytorch weights in pdm's layout.

The official ``UNetModel`` stores its blocks as ``input_blocks`` / ``middle_block`` /
``output_blocks`` sequences; pdm's :class:`~pdm.nn.UNet` names them by role. The mapping is
read off the keys themselves (a part holding ``qkv`` is attention, ``op`` a strided
convolution, ``conv`` an upsampler, ``in_layers`` a residual block), so no config is needed.
The learned-variance head (``variance_output_*``), which ODE sampling does not use, is dropped.
"""

from __future__ import annotations

import re
from collections import defaultdict

from torch import Tensor

VARIANCE_HEAD = ("variance_output_t_emb.", "variance_output_model.")
_DIRECT = {
    "time_embed.0.": "time_embed.0.",
    "time_embed.2.": "time_embed.2.",
    "label_embs.": "class_embed.",
    "input_blocks.0.0.": "input_conv.",
    "out.0.": "out_norm.",
    "out.2.": "out_conv.",
}
_RENAME = {
    "res": {
        "in_layers.0.": "in_norm.",
        "in_layers.2.": "in_conv.",
        "emb_layers.": "emb_proj.",
        "out_layers.2.": "out_conv.",
        "classemb_proj.": "gate.",
        "skip_connection.": "skip.",
    },
    "attn": {"norm.": "norm.", "qkv.": "qkv.", "proj_out.": "proj."},
    "down": {"op.": "op."},
    "up": {"conv.": "conv."},
}

Parts = dict[str, dict[str, Tensor]]  # part index -> {key inside the part: tensor}


def _kind(tensors: dict[str, Tensor]) -> str:
    """What a part of an official block is, from the names of its tensors."""
    for marker, kind in (("qkv.", "attn"), ("in_layers.", "res"), ("op.", "down"), ("conv.", "up")):
        if any(k.startswith(marker) for k in tensors):
            return kind
    raise ValueError(f"unrecognised part of an official block with tensors {sorted(tensors)}")


def _renamed(kind: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in tensors.items():
        new = next((n + key[len(o) :] for o, n in _RENAME[kind].items() if key.startswith(o)), None)
        if new is None:
            raise ValueError(f"unexpected tensor {key!r} in an official {kind} block")
        if kind == "attn" and new.startswith(("qkv.weight", "proj.weight")) and value.ndim == 3:
            value = value[..., None]  # conv1d (out, in, 1) -> 1x1 conv2d
        out[new] = value
    return out


def _level(parts: Parts, down_step: bool) -> dict[str, Tensor]:
    """One official block -> pdm ``_Level`` slots: its residual block, attention, resampler."""
    out: dict[str, Tensor] = {}
    res_seen = False
    for idx in sorted(parts, key=int):
        kind = _kind(parts[idx])
        if kind == "res":
            slot = "resample." if res_seen or down_step else "res."
            res_seen = True
        else:
            slot = "attn." if kind == "attn" else "resample."
        out.update({slot + k: v for k, v in _renamed(kind, parts[idx]).items()})
    return out


def convert_official_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map an official ``UNetModel`` state dict onto :class:`pdm.nn.UNet`'s keys.

    Every official tensor is used exactly once, except the learned-variance head, which is
    dropped. A key the mapping does not know is a ValueError naming it.
    """
    blocks: dict[str, dict[int, Parts]] = {
        p: defaultdict(lambda: defaultdict(dict))
        for p in ("input_blocks", "middle_block", "output_blocks")
    }
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith(VARIANCE_HEAD):
            continue
        prefix = next((p for p in _DIRECT if key.startswith(p)), None)
        if prefix is not None:
            out[_DIRECT[prefix] + key[len(prefix) :]] = value
            continue
        m = re.fullmatch(
            r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)|(middle_block)\.(\d+)\.(.+)", key
        )
        if m is None:
            raise ValueError(f"{key!r} is not a key of the official PDM UNetModel")
        if m.group(5):
            blocks["middle_block"][0][m.group(6)][m.group(7)] = value
        else:
            blocks[m.group(1)][int(m.group(2))][m.group(3)][m.group(4)] = value
    for part, tensors in blocks["middle_block"][0].items():
        out.update({f"middle.{part}.{k}": v for k, v in _renamed(_kind(tensors), tensors).items()})
    for index, parts in blocks["output_blocks"].items():
        out.update({f"up.{index}.{k}": v for k, v in _level(parts, down_step=False).items()})
    for index, parts in blocks["input_blocks"].items():
        down_step = index in _resblock_down_steps(blocks["output_blocks"])
        out.update({f"down.{index - 1}.{k}": v for k, v in _level(parts, down_step).items()})
    return out


def _resblock_down_steps(output_blocks: dict[int, Parts]) -> set[int]:
    """With resblock_updown, input blocks that are down-steps: the up path's first up-step (a
    block with two residual parts) sits at index num_res_blocks, so down-steps are the input
    blocks (num_res_blocks + 1) * j. Without it, down-steps carry ``op`` and need no rule."""
    ups = [
        i
        for i, parts in output_blocks.items()
        if sum(_kind(t) == "res" for t in parts.values()) == 2
    ]
    if not ups:
        return set()
    n = min(ups)
    levels = len(output_blocks) // (n + 1)
    return {(n + 1) * j for j in range(1, levels)}
