"""GroupNorm + SiLU (+ the time embedding's scale-shift) as one fusable expression.

The reference is the same function in float64 through PyTorch's own ``F.group_norm``; the
eager modules (GroupNorm32, SiLU, addcmul) and ``group_norm_act`` (eager and compiled) must both
meet it within their dtype's tolerance, forward and backward, in both memory formats.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdm.nn import UNet
from pdm.nn.layers import group_norm, group_norm_act, silu_
from pdm.nn.runtime import fuse_norms

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}  # relative to the output's scale


def _case(dtype, channels_last: bool, affine: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    norm = group_norm(64, affine=affine, eps=1e-5 if affine else 1e-3)
    if affine:
        with torch.no_grad():
            norm.weight.copy_(1 + 0.3 * torch.randn(64, generator=g))
            norm.bias.copy_(0.3 * torch.randn(64, generator=g))
    x = (3 * torch.randn(3, 64, 6, 5, generator=g) + 1).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    scale = shift = None
    if not affine:  # the out-norm of a ResBlock: no affine, the time embedding's scale-shift
        scale = (0.5 * torch.randn(3, 64, 1, 1, generator=g)).to(dtype)
        shift = (0.5 * torch.randn(3, 64, 1, 1, generator=g)).to(dtype)
    weights = torch.randn(3, 64, 6, 5, generator=g, dtype=torch.float64)  # d loss / d out
    return norm, x, scale, shift, weights


def _reference(norm, x, scale, shift):
    w = None if norm.weight is None else norm.weight.double()
    b = None if norm.bias is None else norm.bias.double()
    h = F.group_norm(x.double(), norm.num_groups, w, b, norm.eps)
    if scale is not None:
        h = h * (1 + scale.double()) + shift.double()
    return F.silu(h)


def _eager(norm, x, scale, shift):
    h = norm(x)
    if scale is not None:
        h = torch.addcmul(shift, h, 1.0 + scale)
    return silu_(h)


def _value_and_grads(fn, norm, x, scale, shift, weights):
    leaves = [x.detach().clone().requires_grad_()]
    if scale is not None:
        leaves += [scale.detach().clone().requires_grad_(), shift.detach().clone().requires_grad_()]
    norm.zero_grad(set_to_none=True)
    out = fn(norm, *leaves, *([None, None] if scale is None else []))
    (out.double() * weights).sum().backward()
    grads = [leaf.grad for leaf in leaves]
    if norm.weight is not None:
        grads += [norm.weight.grad, norm.bias.grad]
    return out, grads


def _close(a, b, dtype, what):
    a, b = a.double(), b.double()
    err = float((a - b).abs().max() / b.abs().max())
    assert err < TOLERANCE[dtype], f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("affine", [True, False], ids=["in_norm", "out_norm_scale_shift"])
def test_fused_expression_matches_the_float64_reference_forward_and_backward(
    dtype, channels_last, affine
):
    norm, x, scale, shift, weights = _case(dtype, channels_last, affine)
    ref_out, ref_grads = _value_and_grads(
        lambda n, *a: _reference(n, *a), norm, x, scale, shift, weights
    )
    fused = lambda n, x, s, sh: group_norm_act(x, n, s, sh)  # noqa: E731
    for name, fn in (("eager modules", _eager), ("group_norm_act", fused)):
        out, grads = _value_and_grads(fn, norm, x, scale, shift, weights)
        assert out.dtype == dtype and out.shape == x.shape
        _close(out, ref_out, dtype, f"{name} output")
        for i, (g, r) in enumerate(zip(grads, ref_grads)):
            _close(g, r, dtype, f"{name} gradient {i}")
    if channels_last:  # the groups are a view: the layout is kept, nothing goes through NCHW
        assert group_norm_act(x, norm, scale, shift).is_contiguous(
            memory_format=torch.channels_last
        )


def test_a_network_switched_to_the_fused_form_computes_the_same_function():
    torch.manual_seed(0)
    net = UNet(
        in_channels=3,
        image_size=16,
        patch_size=2,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        num_classes=10,
    )
    with torch.no_grad():  # wake the zero-initialised layers, so every path carries signal
        for p in net.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.05)
    x, t, y = torch.randn(4, 3, 16, 16), torch.rand(4) * 999, torch.arange(4)

    def run():
        net.zero_grad(set_to_none=True)
        out = net(x, t, y)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}

    eager_out, eager_grads = run()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    fuse_norms(net)
    fused_out, fused_grads = run()
    assert fused_out.abs().mean() > 0.1
    _close(fused_out, eager_out, torch.float32, "network output")
    # one vector: some gradients are zero in exact arithmetic (a bias before a one-channel group)
    flat = lambda grads: torch.cat([grads[n].flatten() for n in sorted(grads)])  # noqa: E731
    _close(flat(fused_grads), flat(eager_grads), torch.float32, "gradients")
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())  # weights untouched
    fuse_norms(net, False)
    assert torch.equal(net(x, t, y), eager_out)


def _compiled_case(dtype, channels_last, affine):
    norm, x, scale, shift, weights = _case(dtype, channels_last, affine, seed=1)
    compiled = torch.compile(group_norm_act, dynamic=False)
    ref_out, ref_grads = _value_and_grads(
        lambda n, *a: _reference(n, *a), norm, x, scale, shift, weights
    )
    out, grads = _value_and_grads(
        lambda n, x, s, sh: compiled(x, n, s, sh), norm, x, scale, shift, weights
    )
    _close(out, ref_out, dtype, "compiled output")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        _close(g, r, dtype, f"compiled gradient {i}")
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_the_compiled_form_matches_the_reference_channels_last():
    """Inductor's CPU code for the fused expression (one compile, ~15-30 s on 2 cores)."""
    _compiled_case(torch.float32, True, False)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("affine", [True, False], ids=["in_norm", "out_norm_scale_shift"])
def test_the_compiled_form_matches_the_reference_everywhere(dtype, channels_last, affine):
    """The whole matrix compiled (eight compiles: several minutes, hence slow)."""
    _compiled_case(dtype, channels_last, affine)
