"""The PDM U-Net: shapes for P = 1/2/4/8, rejections, conditioning, the official network's
parameter counts, its layout facts, and the converter of official weights."""

import math

import official_layout
import pytest
import torch

from pdm.nn import UNet

SMALL = dict(
    in_channels=3,
    image_size=32,
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4, 8),
)


def _perturb(net: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("patch_size", [1, 2, 4, 8])
def test_output_shape_equals_input_shape_for_every_patch_size(patch_size):
    cfg = dict(SMALL, channel_mult=(1, 2) if patch_size < 8 else (1,))
    net = UNet(patch_size=patch_size, **cfg)
    x = torch.randn(2, 3, 32, 32)
    out = net(x, torch.tensor([0.0, 999.0]))
    assert out.shape == x.shape
    assert net.input_conv.in_channels == 3 * patch_size**2
    assert net.out_conv.out_channels == 3 * patch_size**2


def test_zero_initialised_output_conv_gives_zero_output():
    net = UNet(patch_size=2, **SMALL)
    assert torch.count_nonzero(net(torch.randn(1, 3, 32, 32), torch.tensor([5.0]))) == 0


def test_patch_size_one_is_plain_unet_without_positional_encoding():
    assert UNet(patch_size=1, **SMALL).pos_enc is None
    assert UNet(patch_size=2, **SMALL).pos_enc.shape == (32, 16, 16)


def test_positional_encoding_is_added_right_after_the_first_conv():
    net = UNet(patch_size=4, **SMALL)
    seen = {}

    def grab(module, args):
        seen["h"] = args[0]

    net.down[0].register_forward_pre_hook(grab)
    x = torch.randn(2, 3, 32, 32)
    net(x, torch.tensor([1.0, 2.0]))
    from pdm.patching import patchify, positional_encoding_2d

    first_conv = net.input_conv(patchify(x, 4))
    assert torch.allclose(
        seen["h"] - first_conv, positional_encoding_2d(32, 8, 8).expand(2, -1, -1, -1), atol=1e-6
    )


def test_image_size_not_divisible_by_patch_size_is_rejected():
    with pytest.raises(ValueError, match="not divisible by patch_size=4"):
        UNet(image_size=30, patch_size=4)


def test_grid_too_small_for_the_levels_is_rejected():
    with pytest.raises(ValueError, match="cannot be halved"):
        UNet(image_size=32, patch_size=8, channel_mult=(1, 2, 2, 2))


def test_input_with_wrong_size_or_channels_is_rejected():
    net = UNet(patch_size=4, **SMALL)
    with pytest.raises(ValueError, match="not divisible by patch_size=4"):
        net(torch.randn(1, 3, 30, 32), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="expected input of shape"):
        net(torch.randn(1, 1, 32, 32), torch.tensor([1.0]))


def test_fractional_channel_multiplier():
    net = UNet(
        image_size=32,
        patch_size=2,
        model_channels=128,
        channel_mult=(1, 1.5),
        num_res_blocks=1,
        attention_resolutions=(8,),
    )
    assert net.widths == [128, 192]
    assert net(torch.randn(1, 3, 32, 32), torch.tensor([3.0])).shape == (1, 3, 32, 32)


def test_class_conditioning_uses_labels_and_a_null_row():
    net = UNet(patch_size=2, num_classes=10, **SMALL)
    assert net.class_embed.num_embeddings == 11
    _perturb(net)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([100.0, 100.0])
    a = net(x, t, torch.tensor([1, 1]))
    b = net(x, t, torch.tensor([2, 2]))
    null = net(x, t, torch.tensor([10, 10]))
    assert not torch.allclose(a, b)
    assert torch.allclose(net(x, t, None), null)  # no labels means the null label
    with pytest.raises(ValueError, match="unconditional"):
        UNet(patch_size=2, **SMALL)(x, t, torch.tensor([1, 1]))


def test_time_embedding_mlp_is_pdm_choice():
    net = UNet(
        image_size=32,
        patch_size=2,
        model_channels=32,
        channel_mult=(1, 2, 4),
        attention_resolutions=(),
    )
    # model_channels -> 4 model_channels -> model_channels * channel_mult[-1], ending in SiLU
    assert [m.out_features for m in net.time_embed if isinstance(m, torch.nn.Linear)] == [128, 128]
    assert net.time_embed[0].in_features == 32 and isinstance(net.time_embed[-1], torch.nn.SiLU)
    assert net.time_embed_dim == 128


def test_dropout_is_active_in_training_only():
    net = UNet(patch_size=2, dropout=0.5, **SMALL)
    _perturb(net)
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([1.0])
    net.eval()
    assert torch.equal(net(x, t), net(x, t))
    net.train()
    assert not torch.equal(net(x, t), net(x, t))


# (config, parameters of the official UNetModel without its learned-variance head, with it).
# The counts were taken by building the official PatchDiffusion-Pytorch network side by side;
# with the head they round to the published 123 / 121 / 121 / 202 / 163 M.
OFFICIAL = {
    "lsun_church_p2": (
        dict(
            image_size=256,
            patch_size=2,
            model_channels=128,
            channel_mult=(1, 2, 2, 4, 4),
            num_res_blocks=2,
        ),
        122_475_916,
        122_916_120,
    ),
    "lsun_church_p4": (
        dict(
            image_size=256,
            patch_size=4,
            model_channels=256,
            channel_mult=(1, 1, 2, 2),
            num_res_blocks=2,
        ),
        119_863_344,
        121_416_544,
    ),
    "lsun_church_p8": (
        dict(
            image_size=256,
            patch_size=8,
            model_channels=256,
            channel_mult=(1, 1.5, 2),
            num_res_blocks=3,
        ),
        119_126_464,
        121_011_584,
    ),
    "imagenet256_expert": (
        dict(
            image_size=256,
            patch_size=4,
            model_channels=256,
            channel_mult=(1, 2, 2, 2),
            num_res_blocks=3,
            num_classes=1000,
        ),
        200_595_504,
        202_148_704,
    ),
    "ffhq1024_p4": (
        dict(
            image_size=1024,
            patch_size=4,
            model_channels=128,
            channel_mult=(1, 2, 2, 4, 4, 4),
            num_res_blocks=2,
        ),
        162_163_632,
        162_645_344,
    ),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_configurations_have_the_official_parameter_count(name):
    cfg, without_head, with_head = OFFICIAL[name]
    with torch.device("meta"):  # counts only; no memory, no init time
        net = UNet(in_channels=3, attention_resolutions=(16, 8), **cfg)
    assert sum(p.numel() for p in net.parameters()) == without_head
    official = official_layout.official_shapes(
        3,
        cfg["patch_size"],
        cfg["model_channels"],
        cfg["channel_mult"],
        cfg["num_res_blocks"],
        _attention_ds(cfg),
        cfg.get("num_classes"),
    )
    assert (
        sum(math.prod(s) for s in official.values()) == with_head
    )  # the layout description agrees


def _attention_ds(cfg, resolutions=(16, 8)):
    grid = cfg["image_size"] // cfg["patch_size"]
    return {grid // r for r in resolutions}


CONVERT_CASES = {
    "lsun_p4": dict(
        image_size=256, patch_size=4, model_channels=64, channel_mult=(1, 1, 2, 2), num_res_blocks=2
    ),
    "fractional_conditional": dict(
        image_size=64,
        patch_size=2,
        model_channels=128,
        channel_mult=(1, 1.5, 2),
        num_res_blocks=3,
        num_classes=7,
    ),
    "resblock_updown": dict(
        image_size=64,
        patch_size=4,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=2,
        resblock_updown=True,
        num_classes=3,
    ),
}


@pytest.mark.parametrize("name", sorted(CONVERT_CASES))
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_converter_maps_every_official_key_exactly_once_and_loads_strictly(name, learn_sigma):
    from pdm.nn import convert_official_state_dict

    cfg = CONVERT_CASES[name]
    official = official_layout.official_state_dict(
        in_channels=3,
        patch_size=cfg["patch_size"],
        model_channels=cfg["model_channels"],
        channel_mult=cfg["channel_mult"],
        num_res_blocks=cfg["num_res_blocks"],
        attention_ds=_attention_ds(cfg),
        num_classes=cfg.get("num_classes"),
        learn_sigma=learn_sigma,
        resblock_updown=cfg.get("resblock_updown", False),
    )
    converted = convert_official_state_dict(official)
    kept = {k: v for k, v in official.items() if not k.startswith("variance_output")}
    assert len(converted) == len(kept)
    assert sorted(v.data_ptr() for v in converted.values()) == sorted(
        v.data_ptr() for v in kept.values()
    )  # each once
    net = UNet(in_channels=3, attention_resolutions=(16, 8), **cfg)
    net.load_state_dict(converted, strict=True)
    assert torch.equal(net.input_conv.weight, official["input_blocks.0.0.weight"])
    assert torch.equal(net.middle[1].qkv.weight[..., 0], official["middle_block.1.qkv.weight"])


def test_converter_names_an_unknown_key():
    from pdm.nn import convert_official_state_dict

    with pytest.raises(ValueError, match="not a key of the official"):
        convert_official_state_dict({"encoder.weight": torch.zeros(1)})


def test_stride_two_downsampling_pads_like_tensorflow_same():
    # 4x4 input, 3x3 stride-2 kernel of ones: TF "SAME" pads one row/column at the bottom/right
    # only, so output (i, j) sums input rows 2i..2i+2 and columns 2j..2j+2 (the last ones missing)
    from pdm.nn.layers import Downsample

    down = Downsample(1, 1)
    with torch.no_grad():
        down.op.weight.fill_(1.0)
        down.op.bias.zero_()
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    expected = torch.tensor(
        [
            [0 + 1 + 2 + 4 + 5 + 6 + 8 + 9 + 10, 2 + 3 + 6 + 7 + 10 + 11],
            [8 + 9 + 10 + 12 + 13 + 14, 10 + 11 + 14 + 15],
        ],
        dtype=torch.float32,
    )
    assert torch.equal(down(x)[0, 0], expected)


def test_downsampling_and_upsampling_change_the_width_to_the_next_level():
    net = UNet(
        image_size=32,
        patch_size=2,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(),
    )
    down = [b.resample for b in net.down if b.resample is not None]
    up = [b.resample for b in net.up if b.resample is not None]
    assert [(d.op.in_channels, d.op.out_channels) for d in down] == [(32, 64)]
    assert [(u.conv.in_channels, u.conv.out_channels) for u in up] == [(64, 32)]
    assert [b.res.in_conv.in_channels for b in net.up] == [128, 128, 64, 64]  # 2 w_level everywhere


def test_time_embedding_is_sin_then_cos_with_frequencies_over_half_minus_one():
    from pdm.nn.layers import timestep_embedding

    t = torch.tensor([0.0, 7.0, 500.0])
    emb = timestep_embedding(t, 8)  # half = 4, frequencies 10000^(-i/3)
    freqs = torch.tensor([10000.0 ** (-i / 3) for i in range(4)])
    expected = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], dim=1)
    assert torch.allclose(emb, expected, atol=1e-5)


def test_positional_encoding_is_sine_only_with_pdm_frequency_scaling():
    from pdm.patching import positional_encoding_2d

    pe = positional_encoding_2d(8, 4, 4)  # half = 4, f_i = 10000^(-i/3), positions scaled by 64/4
    f = torch.tensor([10000.0 ** (-i / 3) for i in range(4)], dtype=torch.float64)
    pos = torch.arange(4, dtype=torch.float64)
    x_part = torch.sin(f[:, None] * pos[None] * 16.0)  # (4 channels, 4 columns)
    assert torch.allclose(
        pe[:4], x_part[:, None, :].expand(4, 4, 4).float(), atol=1e-6
    )  # first half: columns
    assert torch.allclose(
        pe[4:], x_part[:, :, None].expand(4, 4, 4).float(), atol=1e-6
    )  # second half: rows


def test_residual_block_normalises_without_affine_and_starts_as_identity():
    from pdm.nn.layers import ResBlock

    block = ResBlock(32, 32, emb_channels=16)
    assert block.out_norm.weight is None and block.out_norm.eps == 1e-3
    assert (
        torch.count_nonzero(block.emb_proj.weight) == 0
        and torch.count_nonzero(block.out_conv.weight) == 0
    )
    x = torch.randn(2, 32, 8, 8)
    assert torch.equal(block(x, torch.randn(2, 16)), x)


def test_convert_cli_writes_an_export_that_sample_py_loads_and_that_computes_the_same(
    tmp_path, capsys
):
    """`python -m pdm.checkpoints convert` on an official-layout .pt (learned-variance head included): the
    export rebuilds the network with exactly the converted weights and samples through sample.py."""
    import yaml

    import sample as sample_cli
    from pdm.checkpoints import load_model
    from pdm.checkpoints.__main__ import main as nn_main
    from pdm.nn import convert_official_state_dict

    cfg = CONVERT_CASES["fractional_conditional"] | {"model_channels": 32}
    official = official_layout.official_state_dict(
        in_channels=3,
        patch_size=cfg["patch_size"],
        model_channels=cfg["model_channels"],
        channel_mult=cfg["channel_mult"],
        num_res_blocks=cfg["num_res_blocks"],
        attention_ds=_attention_ds(cfg),
        num_classes=cfg["num_classes"],
        learn_sigma=True,
    )
    torch.save({"model": official}, tmp_path / "official.pt")
    net_cfg = dict(
        cfg, in_channels=3, attention_resolutions=[16, 8], channel_mult=list(cfg["channel_mult"])
    )
    (tmp_path / "cfg.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {
                    "net": {"class_path": "pdm.nn.UNet", "init_args": net_cfg},
                    "target": "x0",
                    "beta_end": 0.02,
                }
            }
        )
    )
    out = str(tmp_path / "conv.safetensors")
    nn_main(["convert", str(tmp_path / "official.pt"), out, "--config", str(tmp_path / "cfg.yaml")])
    model = load_model(out)
    expected = convert_official_state_dict(official)
    assert model.target == "x0" and set(model.net.state_dict()) == set(expected)
    assert all(torch.equal(model.net.state_dict()[k], v) for k, v in expected.items())
    stats = sample_cli.main(
        [
            "--ckpt",
            out,
            "--num-samples",
            "2",
            "--steps",
            "3",
            "--out",
            str(tmp_path / "s"),
            "--device",
            "cpu",
        ]
    )
    assert stats["num_samples"] == 2
    with pytest.raises(SystemExit) as e:  # the output exists now: refused, nothing replaced
        nn_main(
            ["convert", str(tmp_path / "official.pt"), out, "--config", str(tmp_path / "cfg.yaml")]
        )
    assert e.value.code == 2 and "exists" in capsys.readouterr().err
    (tmp_path / "other.yaml").write_text(
        yaml.safe_dump({"model": {"net": {"init_args": dict(net_cfg, model_channels=128)}}})
    )
    with pytest.raises(SystemExit) as e:  # another architecture: one line naming the fix
        nn_main(
            [
                "convert",
                str(tmp_path / "official.pt"),
                str(tmp_path / "x.safetensors"),
                "--config",
                str(tmp_path / "other.yaml"),
            ]
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "does not fit the network" in err[0]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_attention_reaches_a_fused_sdpa_kernel_and_keeps_the_layout_in_both_layouts(layout):
    # a stride-d (transposed) q/k/v sends SDPA to its math path, which made the contiguous network's
    # forward slower than the official one on CPUs (benchmarks/unet_profile.py)
    from torch.profiler import ProfilerActivity, profile

    from pdm.nn.layers import AttentionBlock

    torch.manual_seed(0)
    block = AttentionBlock(128, 64).eval().to(memory_format=layout)
    with torch.no_grad():
        block.proj.weight.normal_(0, 0.1)
        x = torch.randn(2, 128, 8, 8).contiguous(memory_format=layout)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = block(x)
        names = {e.key for e in prof.key_averages()}
        assert "aten::_scaled_dot_product_attention_math" not in names
        assert any("flash_attention" in n or "efficient_attention" in n for n in names)
        assert out.is_contiguous(memory_format=layout)
        # the same function as plain attention written out
        qkv = block.qkv(block.norm(x)).flatten(2).reshape(2, 3, 2, 64, 64)  # (B, qkv, heads, d, HW)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(1))
        ref = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1) @ v  # (B, heads, HW, d)
        ref = ref.transpose(-1, -2).reshape(2, 128, 8, 8)
        assert torch.allclose(out, x + block.proj(ref), atol=1e-5)
