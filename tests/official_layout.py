"""The key names and shapes of an official PatchDiffusion-Pytorch ``UNetModel`` state dict.

Written from the official layout (``input_blocks`` / ``middle_block`` / ``output_blocks`` of
TimestepEmbedSequential blocks, conv1d attention projections, a learned-variance head), with
no pdm code, so the converter is tested against a description of the official network rather
than against itself. Only shapes matter here; values are random.
"""

from __future__ import annotations

import torch


def official_shapes(
    in_channels: int,
    patch_size: int,
    model_channels: int,
    channel_mult,
    num_res_blocks: int,
    attention_ds: set[int],
    num_classes: int | None = None,
    learn_sigma: bool = True,
    resblock_updown: bool = False,
) -> dict[str, tuple[int, ...]]:
    """{key: shape} of the official UNetModel with ``use_scale_shift_norm`` and 64-channel heads."""
    shapes: dict[str, tuple[int, ...]] = {}
    c_in = in_channels * patch_size**2
    widths = [int(model_channels * m) for m in channel_mult]
    ted, cls = widths[-1], widths[0]

    def lin(name, n_in, n_out):
        shapes[name + ".weight"], shapes[name + ".bias"] = (n_out, n_in), (n_out,)

    def conv(name, n_in, n_out, k, dims=2):
        shapes[name + ".weight"] = (n_out, n_in) + (k,) * dims
        shapes[name + ".bias"] = (n_out,)

    def norm(name, ch):
        shapes[name + ".weight"], shapes[name + ".bias"] = (ch,), (ch,)

    def res(name, n_in, n_out):
        norm(name + ".in_layers.0", n_in)
        conv(name + ".in_layers.2", n_in, n_out, 3)
        lin(name + ".emb_layers", ted, 2 * n_out)
        conv(name + ".out_layers.2", n_out, n_out, 3)
        if num_classes:
            lin(name + ".classemb_proj", cls, n_out)
        if n_in != n_out:
            conv(name + ".skip_connection", n_in, n_out, 1)

    def attn(name, ch):
        norm(name + ".norm", ch)
        conv(name + ".qkv", ch, 3 * ch, 1, dims=1)
        conv(name + ".proj_out", ch, ch, 1, dims=1)

    lin("time_embed.0", model_channels, 4 * model_channels)
    lin("time_embed.2", 4 * model_channels, ted)
    if num_classes:
        shapes["label_embs.weight"] = (num_classes + 1, cls)
    conv("input_blocks.0.0", c_in, widths[0], 3)
    chans, ch, ds, k = [widths[0]], widths[0], 1, 1
    for level, w in enumerate(widths):
        for _ in range(num_res_blocks):
            res(f"input_blocks.{k}.0", ch, w)
            ch = w
            if ds in attention_ds:
                attn(f"input_blocks.{k}.1", ch)
            chans.append(ch)
            k += 1
        if level != len(widths) - 1:
            nxt = widths[level + 1]
            if resblock_updown:
                res(f"input_blocks.{k}.0", ch, nxt)
            else:
                conv(f"input_blocks.{k}.0.op", ch, nxt, 3)
            ch, ds, k = nxt, ds * 2, k + 1
            chans.append(ch)
    res("middle_block.0", ch, ch)
    attn("middle_block.1", ch)
    res("middle_block.2", ch, ch)
    k = 0
    for level in reversed(range(len(widths))):
        w = widths[level]
        for i in range(num_res_blocks + 1):
            res(f"output_blocks.{k}.0", ch + chans.pop(), w)
            ch, part = w, 1
            if ds in attention_ds:
                attn(f"output_blocks.{k}.{part}", ch)
                part += 1
            if level and i == num_res_blocks:
                prev = widths[level - 1]
                if resblock_updown:
                    res(f"output_blocks.{k}.{part}", ch, prev)
                else:
                    conv(f"output_blocks.{k}.{part}.conv", ch, prev, 3)
                ch, ds = prev, ds // 2
            k += 1
    norm("out.0", ch)
    conv("out.2", widths[0], c_in, 3)
    if learn_sigma:
        conv("variance_output_t_emb", ted, 2 * model_channels, 1)
        conv("variance_output_model.0", 2 * model_channels, model_channels, 3)
        conv("variance_output_model.2", model_channels, c_in, 3)
    return shapes


def official_state_dict(seed: int = 0, **config) -> dict[str, torch.Tensor]:
    """Random tensors under the official keys and shapes of ``config``."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in official_shapes(**config).items()}
