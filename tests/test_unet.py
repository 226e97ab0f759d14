"""The PDM U-Net: shapes for P = 1/2/4/8, rejections, conditioning, official parameter counts."""

import pytest
import torch

from pdm.nn import UNet

SMALL = dict(in_channels=3, image_size=32, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
             attention_resolutions=(4, 8))


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
    assert torch.allclose(seen["h"] - first_conv, positional_encoding_2d(32, 8, 8).expand(2, -1, -1, -1), atol=1e-6)


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
    net = UNet(image_size=32, patch_size=2, model_channels=128, channel_mult=(1, 1.5), num_res_blocks=1,
               attention_resolutions=(8,))
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


def test_time_embedding_width_is_pdm_choice():
    net = UNet(image_size=32, patch_size=2, model_channels=32, channel_mult=(1, 2, 4), attention_resolutions=())
    assert net.time_embed_dim == 128  # model_channels * channel_mult[-1], not 4 * model_channels


def test_dropout_is_active_in_training_only():
    net = UNet(patch_size=2, dropout=0.5, **SMALL)
    _perturb(net)
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([1.0])
    net.eval()
    assert torch.equal(net(x, t), net(x, t))
    net.train()
    assert not torch.equal(net(x, t), net(x, t))


OFFICIAL = {
    "lsun_church_p2": (dict(image_size=256, patch_size=2, model_channels=128, channel_mult=(1, 2, 2, 4, 4), num_res_blocks=2), 123e6),
    "lsun_church_p4": (dict(image_size=256, patch_size=4, model_channels=256, channel_mult=(1, 1, 2, 2), num_res_blocks=2), 121e6),
    "lsun_church_p8": (dict(image_size=256, patch_size=8, model_channels=256, channel_mult=(1, 1.5, 2), num_res_blocks=3), 121e6),
    "imagenet256_expert": (dict(image_size=256, patch_size=4, model_channels=256, channel_mult=(1, 2, 2, 2), num_res_blocks=3, num_classes=1000), 202e6),
    "ffhq1024_p4": (dict(image_size=1024, patch_size=4, model_channels=128, channel_mult=(1, 2, 2, 4, 4, 4), num_res_blocks=2), 163e6),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_configurations_match_published_parameter_counts(name):
    cfg, published = OFFICIAL[name]
    with torch.device("meta"):  # counts only; no memory, no init time
        net = UNet(in_channels=3, attention_resolutions=(16, 8), **cfg)
    count = sum(p.numel() for p in net.parameters())
    assert abs(count / published - 1) < 0.03, f"{name}: {count / 1e6:.1f}M vs {published / 1e6:.0f}M"
