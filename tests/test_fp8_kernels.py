"""The fused quantising kernels against their references, on the interpreter (or a GPU).

Each kernel's dequantised output is compared with the float64 value its reference quantises. Round
to nearest may move a value by half an e4m3 spacing (`rounding_bound`); the bound is twice that (the
kernel's float32 value may sit on the other side of a rounding boundary than the reference's, and
the GPU's division is not IEEE-exact) plus 16 float32 ulps of the row's largest value for the
float32 arithmetic before the rounding. The scales must agree to 2^-20 relative.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helios_rt.kernels.testing import kernel_device, to_device

from helios_rt.fp8.format import FP8_DTYPE
from helios_rt.ops import OpSet
from helios_rt.ops import reference as ref

OPS = OpSet(kernel_device(), "triton")


def _check(q: torch.Tensor, s: torch.Tensor, y: torch.Tensor, what: str) -> None:
    """q, s: the kernel's e4m3 values and scales; y: the float64 value the reference quantises."""
    q, s = q.cpu(), s.cpu()
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32 and s.shape == (*y.shape[:-1], 1)
    amax = y.abs().amax(-1, keepdim=True)
    ref_scale = amax.clamp_min(1e-12) / 448
    assert torch.allclose(s.double(), ref_scale, rtol=2.0**-20, atol=0), f"{what}: scales differ"
    err = (q.double() * s.double() - y).abs()
    # round to nearest: half an e4m3 spacing at the value's own binade (2^(e-4) for |y/s| in [2^e, 2^(e+1)),
    # subnormals below 2^-6 spaced 2^-9), plus 16 float32 ulps of the row's largest value for the float32
    # arithmetic that produced the kernel's input (a value near a rounding boundary may land on either side)
    binade = torch.floor(torch.log2((y / s.double()).abs().clamp_min(2.0**-6)))
    bound = torch.exp2(binade - 4) * s.double() + 16 * 2.0**-23 * amax
    bad = err > bound
    if bad.any():
        i = int(torch.argmax((err - bound).flatten()))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} values exceed the bound; worst at flat index {i}: "
            f"dequantised {(q.double() * s.double()).flatten()[i].item()}, value {y.flatten()[i].item()}"
        )


def _rand(*shape: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_rows_strided_with_a_zero_row(dtype) -> None:
    wide = _rand(2, 41, 240, seed=1, dtype=dtype) * torch.logspace(-3, 3, 240).to(dtype)
    x = wide[..., 7:210]  # rows not contiguous with each other
    x[1, 5] = 0
    q, s = OPS.fp8_quantize_rows(to_device(x, OPS.device))
    _check(q, s, x.double(), f"fp8_quantize_rows {dtype}")
    assert torch.equal(q[1, 5].cpu().float(), torch.zeros(203))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_quant_over_several_blocks(dtype) -> None:
    x = _rand(1, 7, 4100, seed=2, dtype=dtype) * 4  # two 4096-chunks, the second with a 4-wide tail
    q, s = OPS.gelu_tanh_fp8(to_device(x, OPS.device))
    _check(q, s, F.gelu(x.double(), approximate="tanh"), f"gelu_tanh_fp8 {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_hist", [0, 7, 19])
def test_modulate_layernorm_quant_with_a_segment_boundary(dtype, n_hist: int) -> None:
    x = _rand(2, 19, 203, seed=3, dtype=dtype) * 3 + 1
    table = _rand(2, 6, 2, 203, seed=4) * 0.5  # shift/scale as the transformer hands them: strided views
    shift, scale = table[:, 0], table[:, 1]
    q, s = OPS.modulate_layernorm_fp8(*to_device((x, shift, scale), OPS.device), n_hist, 1e-6)
    y = ref.modulate_layernorm(x.double(), shift.double(), scale.double(), n_hist, 1e-6)
    _check(q, s, y, f"modulate_layernorm_fp8 {dtype} n_hist={n_hist}")


def test_out_pair_is_written_and_a_wrong_one_is_named() -> None:
    x = to_device(_rand(1, 5, 64, seed=5), OPS.device)
    q = torch.empty(1, 5, 64, dtype=FP8_DTYPE, device=OPS.device)
    s = torch.empty(1, 5, 1, device=OPS.device)
    assert OPS.fp8_quantize_rows(x, out=(q, s)) == (q, s)
    _check(q, s, x.cpu().double(), "out=")
    with pytest.raises(ValueError, match=r"out\[0\] \(e4m3 values\) must have dtype"):
        OPS.gelu_tanh_fp8(x, out=(torch.empty(1, 5, 64, device=OPS.device), s))
    with pytest.raises(ValueError, match="D=9000 exceeds the single-block limit"):
        OPS.modulate_layernorm_fp8(torch.empty(1, 1, 9000, device=OPS.device), None, None, 0, 1e-6)
