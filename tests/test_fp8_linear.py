"""FP8 linear: `torch._scaled_mm` against float64 math, with bounds derived from the formats.

Two separate claims, two bounds:
- the product: `FP8Linear` computes `(q_x s_x)(q_w s_w)^T + b` from the quantised operands; against
  that math in float64 it may only add float32 accumulation error (K * 2^-24 of the magnitudes) and
  the output's rounding (half an ulp of the output dtype, doubled: 2^-8 relative in bfloat16);
- the quantisation: against the exact float64 product of the unquantised operands, each operand may
  move by half an e4m3 spacing (2^-4 relative, 2^-10 * scale below the normal range), so each term
  x_k w_k by at most e_x|w| + |x|e_w + e_x e_w, summed over k.
"""

from __future__ import annotations

import pytest
import torch
from support.capabilities import needs_cpu_fp8
from support.untrained import untrained_engine

from helios_rt.config import ModelConfig
from helios_rt.fp8 import FP8Activation, FP8Linear, quantize_rows
from helios_rt.fp8.format import E4M3_MAX, FP8_DTYPE, dequantize, quantize_blocks, rounding_bound

OUT_REL = {torch.bfloat16: 2.0**-8, torch.float32: 2.0**-23}


def _linear(k: int, n: int, dtype: torch.dtype, seed: int = 0) -> torch.nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) / k**0.5)
        lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return lin.to(dtype)


def _assert_within(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    err = (out.double() - ref).abs()
    bad = err > bound
    if bad.any():
        i = int(torch.argmax((err - bound).flatten()))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} elements exceed the bound; worst at flat index {i}: "
            f"got {out.flatten()[i].item()}, reference {ref.flatten()[i].item()}, bound {bound.flatten()[i].item()}"
        )


@needs_cpu_fp8
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("m", "k", "n"), [(113, 208, 48), (3, 32, 1040)])
def test_scaled_mm_is_the_quantised_math(dtype: torch.dtype, m: int, k: int, n: int) -> None:
    lin = _linear(k, n, dtype)
    fp8 = FP8Linear.from_linear(lin)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, k, m, generator=g) * torch.logspace(-3, 2, m)).transpose(1, 2).to(dtype)  # strided
    y = fp8(x)
    assert y.dtype == dtype and y.shape == (2, m, n)
    qx, sx = quantize_rows(x)
    a, w = dequantize(qx, sx), dequantize(fp8.weight, fp8.weight_scale[:, None])
    ref = a @ w.T + fp8.bias.double()
    bound = OUT_REL[dtype] * ref.abs() + k * 2.0**-24 * (a.abs() @ w.abs().T) + 1e-30
    _assert_within(y, ref, bound, f"_scaled_mm {dtype} vs float64")


def test_quantisation_error_is_within_e4m3_rounding() -> None:
    k, n = 256, 64
    lin = _linear(k, n, torch.float32, seed=2)
    fp8 = FP8Linear.from_linear(lin)
    x = torch.randn(1, 97, k, generator=torch.Generator().manual_seed(3)) * torch.logspace(-4, 3, k)  # wide range
    qx, sx = quantize_rows(x)
    wd, xd = lin.weight.double(), x.double()
    ex, ew = rounding_bound(x, sx).double(), rounding_bound(lin.weight, fp8.weight_scale[:, None]).double()
    bound = ex @ wd.abs().T + xd.abs() @ ew.T + ex @ ew.T
    exact = xd @ wd.T + lin.bias.double()
    quantised = dequantize(qx, sx) @ dequantize(fp8.weight, fp8.weight_scale[:, None]).T + lin.bias.double()
    _assert_within(quantised, exact, bound, "e4m3 quantisation")
    assert (quantised - exact).abs().max() > 1e-3 * bound.max()  # the error is real, the bound is not vacuous


def test_quantise_maps_the_row_maximum_to_448_and_zero_rows_to_zero() -> None:
    x = torch.randn(4, 50, generator=torch.Generator().manual_seed(4))
    x[2] = 0.0
    q, s = quantize_rows(x)
    assert q.dtype == FP8_DTYPE and s.shape == (4, 1)
    assert torch.equal(q.float().abs().amax(-1)[[0, 1, 3]], torch.full((3,), E4M3_MAX))
    assert torch.equal(q[2].float(), torch.zeros(50)) and torch.isfinite(s).all()


@needs_cpu_fp8
def test_a_quantised_input_is_the_same_as_quantising_inside() -> None:
    fp8 = FP8Linear.from_linear(_linear(64, 32, torch.bfloat16))
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(5)).bfloat16()
    assert torch.equal(fp8(x), fp8(FP8Activation.of(quantize_rows(x))))
    with pytest.raises(ValueError, match="expects 64 input features, got 63"):
        fp8(x[..., :63])


def test_per_block_scales_are_no_coarser_than_per_token() -> None:
    """A 128-block scale is at most its token's scale, so it never rounds a value more coarsely."""
    x = torch.randn(5, 384, generator=torch.Generator().manual_seed(6)) * torch.logspace(-2, 2, 384)
    q, s = quantize_blocks(x)
    assert s.shape == (5, 3) and torch.all(s <= quantize_rows(x)[1])
    assert torch.all((dequantize(q, s) - x.double()).abs() <= rounding_bound(x, s.repeat_interleave(128, -1)))


def test_fp8_is_refused_before_loading_where_scaled_mm_cannot_run(tiny_config, monkeypatch):
    """An sm_80 GPU, float32 with a bias on CUDA, CPU torch < 2.13: `_scaled_mm` raises; the engine says
    what to change before a weight is read, instead of failing inside the first chunk."""

    def unsupported(*args, **kwargs):
        raise RuntimeError("torch._scaled_mm is only supported on CUDA devices with compute capability >= 9.0")

    monkeypatch.setattr(torch, "_scaled_mm", unsupported)
    config = tiny_config(precision="fp8")
    with pytest.raises(ValueError, match=r"precision='fp8' cannot run on cpu .*use precision='native'"):
        untrained_engine(config)


@pytest.mark.parametrize(("tokens", "n_hist"), [(13, 5), (9, 0)])
def test_an_fp8_block_normalises_each_token_segment_with_its_own_table(tokens: int, n_hist: int) -> None:
    """The FP8 block's quantised linear input (`modulate_layernorm_fp8`) is the float block's, token by token,
    within e4m3 rounding: history tokens with the history row of the two-segment table, noisy tokens with the
    noisy row. The rows differ widely here, so an FP8 path that hands one segment the other's table fails."""
    from helios_rt.model.transformer import Block
    from helios_rt.ops import OpSet

    config = ModelConfig(num_attention_heads=2, attention_head_dim=16, ffn_dim=48, num_layers=1, rope_dim=(4, 6, 6))
    block, ops = Block(config), OpSet("cpu", "reference")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, tokens, config.dim, generator=g) * 3 + 1
    shift, scale = torch.randn(2, 2, config.dim, generator=g), torch.randn(2, 2, config.dim, generator=g)
    shift[:, 0] += 4.0  # the history row far from the noisy row
    ref = block._modulated(x, shift, scale, n_hist, ops)
    block.fp8 = True
    q = block._modulated(x, shift, scale, n_hist, ops)
    assert isinstance(q, FP8Activation) and q.data.dtype == FP8_DTYPE
    _assert_within(dequantize(q.data, q.scale), ref.double(), rounding_bound(ref, q.scale).double(), "FP8 block norm")
