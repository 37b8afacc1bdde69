"""Triton residual_modulate_layernorm and residual_layernorm against their references: the updated residual
stream (in place) and the normed output, each within `kernels.testing`'s bound (twice the error of the same
computation done plainly in the dtype, plus the rounding floor), across awkward shapes, strided inputs and
tables, batch > 1, float32 and bfloat16. The reference path itself must equal the two ops it fuses, bit for bit."""

import pytest
import torch
from helios_rt.kernels import residual_norm
from helios_rt.kernels.testing import check_op, kernel_device, to_device, upcast

from helios_rt.ops import OpSet, reference

DTYPES = [torch.float32, torch.bfloat16]
D = kernel_device()
# (B, L, D, n_hist): awkward D (113, 203), all-history, all-noisy, batch 2 and 3.
SHAPES = [(1, 7, 113, 3), (2, 37, 203, 13), (1, 5, 256, 0), (3, 9, 64, 9)]
EPS = 1e-6


def _stream(b, n, d, dtype, g, strided=False):  # on the CPU
    """`[B, L, D]` activations; strided: rows of a wider tensor (row stride 2d), as the noisy rows of the stream."""
    base = (torch.randn(b, n + 2, 2 * d, generator=g) * 3 + 0.5).to(dtype)
    return base[:, 2:, d:] if strided else base[:, 2:, :d].contiguous()


def _tables(b, d, g):
    """Four `[B, 2, D]` views of one `[B, 6, 2, D]` table, as `Block.step` hands them (strided when B > 1)."""
    return (torch.randn(b, 6, 2, d, generator=g) * 0.5).unbind(1)[:4]


def _run_modulate(x, y, gate, n_hist, shift, scale):
    """(x after, out) of the kernel, of the float32 reference and of the reference in x's dtype."""
    args = (y, gate, n_hist, shift, scale, EPS)
    x32, xn = x.float().clone(), x.clone()  # float() of a float32 x is x itself: the references write in place
    ref32 = reference.residual_modulate_layernorm(x32, *upcast(args))
    naive = reference.residual_modulate_layernorm(xn, *args)
    xd, *dev = to_device((x.clone(), *args[:2]), D)
    out = residual_norm.residual_modulate_layernorm(xd, dev[0], dev[1], n_hist, *to_device((shift, scale), D), EPS)
    return (xd, x32, xn), (out, ref32, naive)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gated", [True, False])
def test_residual_modulate_layernorm(shape, dtype, gated):
    """Gated over every row (the FFN's residual into the next block), or a plain add into the rows after
    n_hist (the cross-attention's residual into the FFN's norm)."""
    b, n, d, n_hist = shape
    g = torch.Generator().manual_seed(n * d + gated)
    x = _stream(b, n, d, dtype, g)
    rows = n if gated else n - n_hist
    y = _stream(b, rows, d, dtype, g, strided=True)
    gate, shift, scale, _ = _tables(b, d, g)
    xs, outs = _run_modulate(x, y, gate if gated else None, n_hist, shift, scale)
    check_op("residual_modulate_layernorm: x", *xs, dtype)
    check_op("residual_modulate_layernorm: out", *outs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_residual_layernorm(shape, dtype):
    """The self-attention's gated residual, then the float32-affine LayerNorm of the rows from n_hist."""
    b, n, d, n_hist = shape
    g = torch.Generator().manual_seed(n + d)
    x, y = _stream(b, n, d, dtype, g), _stream(b, n, d, dtype, g, strided=True)
    gate = _tables(b, d, g)[0]
    w, bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    args = (y, gate, n_hist, n_hist, w, bias, EPS)
    x32, xn = x.float().clone(), x.clone()  # float() of a float32 x is x itself: the references write in place
    ref32 = reference.residual_layernorm(x32, *upcast(args))
    naive = reference.residual_layernorm(xn, *args)
    xd, *dev = to_device((x.clone(), *args), D)
    out = residual_norm.residual_layernorm(xd, *dev)
    check_op("residual_layernorm: x", xd, x32, xn, dtype)
    assert out.shape == (b, n - n_hist, d)
    if out.numel():  # all-history rows: nothing to norm
        check_op("residual_layernorm: out", out, ref32, naive, dtype)


def test_out_views_and_the_stream_outside_are_untouched():
    """A caller-owned strided out, and x as rows of a wider buffer: nothing outside either view is written."""
    g = torch.Generator().manual_seed(3)
    b, n, d, n_hist = 2, 19, 203, 5
    wide = (torch.randn(b, n, 2 * d, generator=g) * 3).to(torch.bfloat16)
    x = wide[:, :, :d]
    y = _stream(b, n - n_hist, d, torch.bfloat16, g)
    _, shift, scale, _ = _tables(b, d, g)
    expected_x, outside = x.clone(), wide[:, :, d:].clone()  # before the kernel: on the interpreter wide_d is wide
    expected = reference.residual_modulate_layernorm(x.clone(), y, None, n_hist, shift, scale, EPS)
    wide_d = to_device(wide, D)
    out_full = torch.zeros(b, n, 300, dtype=torch.bfloat16, device=D)
    res = residual_norm.residual_modulate_layernorm(
        wide_d[:, :, :d], *to_device((y, None), D), n_hist, *to_device((shift, scale), D), EPS, out=out_full[:, :, :d]
    )
    assert res.data_ptr() == out_full.data_ptr()
    assert (out_full[:, :, d:] == 0).all(), "kernel wrote outside the out view"
    assert torch.equal(wide_d[:, :, d:].cpu(), outside), "kernel wrote outside x"
    assert torch.equal(wide_d[:, :n_hist, :d].cpu(), expected_x[:, :n_hist]), "rows before the residual changed"
    reference.residual_modulate_layernorm(expected_x, y, None, n_hist, shift, scale, EPS)
    check_op("x", wide_d[:, :, :d], expected_x.float(), expected_x, torch.bfloat16)
    check_op("out", out_full[:, :, :d], expected.float(), expected, torch.bfloat16)


def test_the_reference_is_the_two_ops_apart():
    """The fused references run the very ops the block ran before the fusion, so the PyTorch path is unchanged."""
    g = torch.Generator().manual_seed(4)
    b, n, d, n_hist = 2, 11, 64, 4
    x, y = _stream(b, n, d, torch.bfloat16, g), _stream(b, n, d, torch.bfloat16, g)
    gate, shift, scale, _ = _tables(b, d, g)
    w, bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    apart = reference.gate_residual(x, y, gate, n_hist)
    fused_x = x.clone()
    h = reference.residual_modulate_layernorm(fused_x, y, gate, n_hist, shift, scale, EPS)
    assert torch.equal(fused_x, apart)
    assert torch.equal(h, reference.modulate_layernorm(apart, shift, scale, n_hist, EPS))
    fused_x = x.clone()
    h = reference.residual_layernorm(fused_x, y, gate, n_hist, n_hist, w, bias, EPS)
    assert torch.equal(fused_x, apart)
    assert torch.equal(h, reference.layernorm(apart[:, n_hist:], w, bias, EPS))
    added = x.clone()
    added[:, n_hist:].add_(y[:, n_hist:])
    fused_x = x.clone()
    reference.residual_modulate_layernorm(fused_x, y[:, n_hist:], None, n_hist, shift, scale, EPS)
    assert torch.equal(fused_x, added)


def test_validates():
    x = torch.randn(1, 4, 32, device=D)
    t = torch.zeros(1, 2, 32, device=D)
    with pytest.raises(ValueError, match="y must be"):
        residual_norm.residual_modulate_layernorm(x, torch.randn(1, 5, 32, device=D), None, 1, t, t, EPS)
    with pytest.raises(ValueError, match="gate"):
        residual_norm.residual_modulate_layernorm(x, x.clone(), t.to(torch.bfloat16), 1, t, t, EPS)
    with pytest.raises(ValueError, match="y must cover"):
        residual_norm.residual_layernorm(x, x[:, 1:].clone(), t, 1, 1, t[0, 0], t[0, 0], EPS)
    with pytest.raises(ValueError, match="start"):
        residual_norm.residual_layernorm(x, x.clone(), t, 1, 5, t[0, 0], t[0, 0], EPS)
    with pytest.raises(ValueError, match="out"):
        residual_norm.residual_layernorm(x, x.clone(), t, 1, 1, t[0, 0], t[0, 0], EPS, out=torch.empty(1, 4, 32))


def test_opset_picks_triton():
    ops = OpSet(D, kernels="triton")
    assert ops.backend_of("residual_modulate_layernorm") == "triton"
    assert ops.residual_layernorm is residual_norm.residual_layernorm
