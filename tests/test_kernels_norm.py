"""Triton modulate_layernorm and gate_residual against their references.

The kernels run on `kernel_device()` (the GPU when they are compiled for one, else the CPU interpreter);
inputs are drawn on the CPU and the references computed there (helios_rt.kernels.testing says why)."""

import pytest
import torch
from helios_rt.kernels import norm, residual
from helios_rt.kernels.testing import check_op, kernel_device, to_device, upcast

from helios_rt.ops import OpSet, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
D = kernel_device()  # the GPU when the kernels are compiled for one, else the CPU interpreter
# (B, L, D, n_hist): awkward D (113, 203), boundary inside a row block, all-history, all-noisy.
SHAPES = [(1, 7, 113, 3), (2, 37, 203, 13), (1, 5, 256, 0), (2, 9, 64, 9)]


def _mod_inputs(b, n, d, dtype, g):  # on the CPU
    x = (torch.randn(b, n, d, generator=g) * 3 + 0.5).to(dtype)
    shift = torch.randn(b, 2, d, generator=g)
    scale = torch.randn(b, 2, d, generator=g) * 0.5
    return x, shift, scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_modulate_layernorm(shape, dtype):
    b, n, d, n_hist = shape
    g = torch.Generator().manual_seed(n * d)
    x, shift, scale = _mod_inputs(b, n, d, dtype, g)
    out = norm.modulate_layernorm(*to_device((x, shift, scale), D), n_hist, 1e-6)
    ref32 = reference.modulate_layernorm(*upcast((x, shift, scale)), n_hist, 1e-6)
    naive = reference.modulate_layernorm(x, shift, scale, n_hist, 1e-6)
    check_op("modulate_layernorm", out, ref32, naive, dtype)


def test_modulate_layernorm_out_and_strided_input():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2, 40, 2 * 203, generator=g, dtype=torch.bfloat16)
    x = base[:, 3:, 203:]  # row stride 406: a slice of a wider activation, on the GPU too
    _, shift, scale = _mod_inputs(2, 37, 203, torch.bfloat16, g)
    out_full = torch.zeros(2, 37, 300, dtype=torch.bfloat16, device=D)
    out = out_full[:, :, :203]
    res = norm.modulate_layernorm(*to_device((x, shift, scale), D), 17, 1e-6, out=out)
    assert res.data_ptr() == out.data_ptr()
    assert (out_full[:, :, 203:] == 0).all(), "kernel wrote outside the out view"
    ref32 = reference.modulate_layernorm(*upcast((x, shift, scale)), 17, 1e-6)
    check_op("modulate_layernorm", out, ref32, reference.modulate_layernorm(x, shift, scale, 17, 1e-6), x.dtype)


def _block_tables(b, d, g):  # on the CPU, laid out as Block.forward hands them to the kernels
    """The six `[B, 2, D]` views of one contiguous `[B, 6, 2, D]` table: dense only when B == 1."""
    table = torch.randn(b, 6, 2, d, generator=g) * 0.5
    return table.unbind(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b", [1, 2, 3])
def test_modulate_layernorm_strided_tables(b, dtype):
    """Batch > 1 (CFG): shift/scale are views with batch stride 12*D; the kernel must follow the strides."""
    g = torch.Generator().manual_seed(b)
    d, n, n_hist = 203, 19, 5
    x = (torch.randn(b, n, d, generator=g) * 3).to(dtype)
    shift, scale, *_ = _block_tables(b, d, g)
    assert b == 1 or not shift.is_contiguous()
    out = norm.modulate_layernorm(*to_device((x, shift, scale), D), n_hist, 1e-6)
    ref32 = reference.modulate_layernorm(*upcast((x, shift, scale)), n_hist, 1e-6)
    check_op("modulate_layernorm", out, ref32, reference.modulate_layernorm(x, shift, scale, n_hist, 1e-6), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b", [1, 2, 3])
def test_gate_residual_strided_gate(b, dtype):
    g = torch.Generator().manual_seed(10 + b)
    d, n, n_hist = 203, 19, 5
    x, y = (torch.randn(b, n, d, generator=g).to(dtype) for _ in range(2))
    gate = _block_tables(b, d, g)[2]
    out = residual.gate_residual(*to_device((x, y, gate), D), n_hist)
    ref32 = reference.gate_residual(*upcast((x, y, gate)), n_hist)
    check_op("gate_residual", out, ref32, reference.gate_residual(x, y, gate, n_hist), dtype)


def test_modulate_layernorm_validates():
    x = torch.randn(1, 4, 32, device=D)
    shift = torch.zeros(1, 2, 32, device=D)
    with pytest.raises(ValueError, match="scale"):
        norm.modulate_layernorm(x, shift, torch.zeros(1, 2, 32, dtype=torch.bfloat16, device=D), 1, 1e-6)
    with pytest.raises(ValueError, match="n_hist"):
        norm.modulate_layernorm(x, shift, shift, 5, 1e-6)
    with pytest.raises(ValueError, match="shift must have unit stride"):
        norm.modulate_layernorm(x, torch.zeros(1, 32, 2, device=D).transpose(1, 2), shift, 1, 1e-6)
    with pytest.raises(ValueError, match="x must have unit stride"):
        norm.modulate_layernorm(x.transpose(1, 2).contiguous().transpose(1, 2), shift, shift, 1, 1e-6)
    with pytest.raises(ValueError, match="out"):
        norm.modulate_layernorm(x, shift, shift, 1, 1e-6, out=torch.empty(1, 4, 32, dtype=torch.float16, device=D))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gate_residual(shape, dtype):
    b, n, d, n_hist = shape
    g = torch.Generator().manual_seed(n + d)
    x = torch.randn(b, n, d, generator=g).to(dtype)
    y = torch.randn(b, n, d, generator=g).to(dtype)
    gate = torch.randn(b, 2, d, generator=g)
    out = residual.gate_residual(*to_device((x, y, gate), D), n_hist)
    ref32 = reference.gate_residual(*upcast((x, y, gate)), n_hist)
    check_op("gate_residual", out, ref32, reference.gate_residual(x, y, gate, n_hist), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_residual_in_place_and_mixed_dtypes(dtype):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 37, 203, generator=g).to(dtype)
    y = torch.randn(2, 37, 203, generator=g).to(torch.bfloat16)  # GEMM output in bf16, fp32 residual
    gate = torch.randn(2, 2, 203, generator=g)
    expected32 = reference.gate_residual(x.float(), y.float(), gate, 13)
    naive = reference.gate_residual(x, y, gate, 13)  # both before the kernel: on the interpreter x_dev is x
    x_dev, y_dev, gate_dev = to_device((x, y, gate), D)
    res = residual.gate_residual(x_dev, y_dev, gate_dev, 13, out=x_dev)
    assert res.data_ptr() == x_dev.data_ptr()
    check_op("gate_residual(out=x)", x_dev, expected32, naive, dtype)


def test_opset_picks_triton():
    ops = OpSet(D, kernels="triton")
    assert ops.backend_of("modulate_layernorm") == "triton"
    assert ops.gate_residual is residual.gate_residual


def _strided_rows(b, n, d, dtype, g):  # on the CPU
    """`[B, n, d]` rows of a wider activation (row stride 2d, batch stride (n+3)*2d), as the cross-attention
    norm reads the noisy rows of the residual stream: not contiguous in any dim but the last."""
    base = (torch.randn(b, n + 3, 2 * d, generator=g) * 3 + 0.5).to(dtype)
    return base[:, 3:, d:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("b", [1, 2])
def test_layernorm(b, affine, dtype):
    """Batch 2 and strided rows, float32 affine (the checkpoint keeps norm2 in float32), the model dtype out."""
    g = torch.Generator().manual_seed(20 + b)
    x = _strided_rows(b, 37, 203, dtype, g)
    w, bias = (torch.randn(203, generator=g), torch.randn(203, generator=g)) if affine else (None, None)
    out = norm.layernorm(*to_device((x, w, bias), D), 1e-6)
    ref32 = reference.layernorm(*upcast((x, w, bias)), 1e-6)
    check_op("layernorm", out, ref32, reference.layernorm(x, w, bias, 1e-6), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b", [1, 2])
def test_rmsnorm(b, weight_dtype, dtype):
    """The weight comes in the model dtype (norm_q/norm_k are not kept in float32) and is upcast in the kernel."""
    g = torch.Generator().manual_seed(30 + b)
    x = _strided_rows(b, 19, 113, dtype, g)
    w = (torch.randn(113, generator=g) * 0.5 + 1).to(weight_dtype)
    out = norm.rmsnorm(*to_device((x, w), D), 1e-6)
    ref32 = reference.rmsnorm(*upcast((x, w)), 1e-6)
    check_op("rmsnorm", out, ref32, reference.rmsnorm(x, w, 1e-6), dtype)


@pytest.mark.parametrize("op", ["layernorm", "rmsnorm"])
def test_row_norms_write_only_their_out_view(op):
    g = torch.Generator().manual_seed(3)
    x = _strided_rows(2, 11, 64, torch.bfloat16, g)
    w = torch.randn(64, generator=g)
    args = (x, w, w) if op == "layernorm" else (x, w)
    out_full = torch.zeros(2, 11, 100, dtype=torch.bfloat16, device=D)
    out = out_full[:, :, 10:74]
    res = getattr(norm, op)(*to_device(args, D), 1e-6, out=out)
    assert res.data_ptr() == out.data_ptr()
    assert (out_full[:, :, :10] == 0).all() and (out_full[:, :, 74:] == 0).all(), "kernel wrote outside the out view"
    ref = getattr(reference, op)
    check_op(op, out, ref(*upcast(args), 1e-6), ref(*args, 1e-6), torch.bfloat16)


def test_row_norms_validate():
    x = torch.randn(1, 4, 32, device=D)
    with pytest.raises(ValueError, match="weight must have shape"):
        norm.rmsnorm(x, torch.ones(16, device=D), 1e-6)
    with pytest.raises(ValueError, match="x must have unit stride"):
        norm.layernorm(x.transpose(1, 2).contiguous().transpose(1, 2), None, None, 1e-6)
    with pytest.raises(ValueError, match="x must be"):
        norm.layernorm(x[0], None, None, 1e-6)
    with pytest.raises(ValueError, match="out"):
        norm.rmsnorm(x, torch.ones(32, device=D), 1e-6, out=torch.empty(1, 4, 32, dtype=torch.bfloat16, device=D))
