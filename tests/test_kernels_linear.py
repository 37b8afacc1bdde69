"""The FFN up projection with its tanh-GELU fused (`linear_gelu_tanh`) against its reference.

Bounded like a kernel (twice the naive error plus the rounding floor, helios_rt.kernels.testing): on a GPU
cuBLASLt applies the GELU to the float32 accumulator; on the CPU the op runs the reference's own sequence
into `out` (bit-equal for contiguous rows; a strided input may take another GEMM blocking)."""

import pytest
import torch
from helios_rt.kernels import linear
from helios_rt.kernels.testing import check_op, kernel_device, to_device, upcast

from helios_rt.ops import OpSet, reference

D = kernel_device()


def _inputs(b, n, d, h, dtype, g, row_stride=None):  # on the CPU
    """x `[b, n, d]` with rows `row_stride` apart (a slice of a wider activation when > d), weight, bias."""
    width = row_stride or d
    x = (torch.randn(b, n, width, generator=g)).to(dtype)[:, :, :d]
    w = (torch.randn(h, d, generator=g) / d**0.5).to(dtype)
    bias = torch.randn(h, generator=g).to(dtype)
    return x, w, bias


def _check(out, x, w, bias, dtype):
    check_op("linear_gelu_tanh", out, reference.linear_gelu_tanh(*upcast((x, w, bias))),
             reference.linear_gelu_tanh(x, w, bias), dtype)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("row_stride", [None, 80])
def test_linear_gelu_tanh(b, row_stride, dtype):
    """Batch 2 (CFG) and rows of a wider activation (row stride 80 for D=48), into a planned `out`."""
    g = torch.Generator().manual_seed(b)
    x, w, bias = _inputs(b, 13, 48, 113, dtype, g, row_stride)
    out = torch.full((b, 13, 113), float("nan"), dtype=dtype, device=D)
    res = linear.linear_gelu_tanh(*to_device((x, w, bias), D), out=out)
    assert res.data_ptr() == out.data_ptr()
    _check(out, x, w, bias, dtype)


@pytest.mark.skipif(D.type != "cpu", reason="on a GPU cuBLASLt's epilogue runs (bounded above)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_the_cpu_the_op_is_the_references_own_sequence(dtype):
    """The model's case (contiguous rows): addmm into `out` then tanh-GELU in place, bit-equal to the spec."""
    x, w, bias = _inputs(2, 13, 48, 113, dtype, torch.Generator().manual_seed(5))
    out = linear.linear_gelu_tanh(x, w, bias)
    assert torch.equal(out, reference.linear_gelu_tanh(x, w, bias))


def test_linear_gelu_tanh_validates():
    x = torch.randn(2, 4, 32, device=D)
    w = torch.randn(8, 32, device=D)
    with pytest.raises(ValueError, match="weight must be"):
        linear.linear_gelu_tanh(x, w.t(), None)
    with pytest.raises(ValueError, match="one matrix of rows"):
        linear.linear_gelu_tanh(torch.randn(4, 2, 32, device=D).transpose(0, 1), w, None)
    with pytest.raises(ValueError, match="bias"):
        linear.linear_gelu_tanh(x, w, torch.zeros(8, dtype=torch.bfloat16, device=D))
    with pytest.raises(ValueError, match="out"):
        linear.linear_gelu_tanh(x, w, None, out=torch.empty(2, 4, 8, device=D).transpose(1, 2).contiguous().mT)


def test_the_triton_table_fuses_the_ffn_up_projection():
    assert OpSet(D, kernels="triton").linear_gelu_tanh is linear.linear_gelu_tanh
    assert OpSet("cpu", kernels="reference").linear_gelu_tanh is reference.linear_gelu_tanh
