"""Per-token e4m3 quantisation fused into the kernels that produce the FP8 linears' inputs.

Three producers, one epilogue: modulate_layernorm (the input of Q/K/V and of the FFN), tanh-GELU (the
input of the FFN's down projection) and a plain row quantiser (the attention output, before
`to_out`). Each writes e4m3 values `[B, L, D]` and one float32 scale per token `[B, L, 1]` with
`scale = max(amax, 1e-12) / 448`, the spec in `helios_rt/fp8/format.py`, so the linear's input never
exists in the model dtype.

Rounding: the value is rounded onto the e4m3 grid in float32 (nearest, ties to even, with the
magic-number trick on the value divided by its power-of-two spacing) and then converted, which is
exact. That is what the hardware conversion does on a GPU; under TRITON_INTERPRET the float8
conversion of triton 3.9 mis-rounds values whose mantissa carries into the exponent (127.5 -> 64),
so the kernels never hand it a value that needs rounding.

Rows longer than one block (the FFN's 13824) are read twice: pass one finds the row's amax, pass two
recomputes the value (GELU is cheaper than a round trip through memory) and stores it quantised.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from helios_rt.ops.registry import register_impl

from ._common import FLOAT_DTYPES, Tensor, check, check_tensor, fused_op, next_pow2, row_warps

FP8 = torch.float8_e4m3fn
MAX_NORM_D = 8192  # modulate_layernorm keeps the whole row in registers
MAX_BLOCK = 4096  # the chunk of the two-pass row kernels


@triton.jit
def _e4m3_round(v):
    """Round float32 `v` (|v| <= 448) to the nearest e4m3 value, ties to even, in float32."""
    bits = v.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # below 2^-6 the spacing is the subnormal 2^-9
    spacing = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    t = v / spacing  # exact: a power of two
    t = (t + 12582912.0) - 12582912.0  # 1.5 * 2^23: float32 addition rounds t to an integer, ties to even
    return t * spacing


@triton.jit
def _store_quantized(y, amax, mask, q_ptrs, s_ptr):
    scale = tl.maximum(amax, 1e-12) / 448.0
    v = tl.minimum(tl.maximum(y / scale, -448.0), 448.0)
    tl.store(q_ptrs, _e4m3_round(v).to(tl.float8e4nv), mask=mask)
    tl.store(s_ptr, scale)


@triton.jit
def _gelu_tanh(x):
    z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return 0.5 * x * (2.0 - 2.0 / (tl.exp(tl.minimum(2.0 * z, 80.0)) + 1.0))  # 1 + tanh(z), saturating at 0, 2


@triton.jit
def _rows_quant_kernel(
    x_ptr, q_ptr, s_ptr, L, D, sxb, sxl,
    GELU: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # row * width passes 2^31 at CFG batch 2 and large frames
    b = row // L
    x_row = x_ptr + b * sxb + (row - b * L) * sxl
    amax = 0.0
    for start in range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        y = tl.load(x_row + cols, mask=cols < D, other=0.0).to(tl.float32)
        if GELU:
            y = _gelu_tanh(y)
        amax = tl.maximum(amax, tl.max(tl.abs(y), axis=0))
    scale = tl.maximum(amax, 1e-12) / 448.0
    for start in range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < D
        y = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if GELU:
            y = _gelu_tanh(y)
        v = tl.minimum(tl.maximum(y / scale, -448.0), 448.0)
        tl.store(q_ptr + row * D + cols, _e4m3_round(v).to(tl.float8e4nv), mask=mask)
    tl.store(s_ptr + row, scale)


@triton.jit
def _modulate_layernorm_quant_kernel(
    x_ptr, shift_ptr, scale_ptr, q_ptr, s_ptr,
    L, D, n_hist, eps,
    sxb, sxl, shb, shs, scb, scs,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # row * width passes 2^31 at CFG batch 2 and large frames
    b = row // L
    l_idx = row - b * L
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + b * sxb + l_idx * sxl + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
    seg = (l_idx >= n_hist).to(tl.int32)
    sc = tl.load(scale_ptr + b * scb + seg * scs + cols, mask=mask, other=0.0)
    sh = tl.load(shift_ptr + b * shb + seg * shs + cols, mask=mask, other=0.0)
    y = tl.where(mask, xc * rstd * (1.0 + sc) + sh, 0.0)
    _store_quantized(y, tl.max(tl.abs(y), axis=0), mask, q_ptr + row * D + cols, s_ptr + row)


def rows_launch_config(d: int) -> dict:
    block = min(next_pow2(d), MAX_BLOCK)
    return {"BLOCK": block, "num_warps": row_warps(block)}


def _outputs(x: Tensor, out: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """Caller-owned (validated) or new e4m3 values `[B, L, D]` and float32 scales `[B, L, 1]`, contiguous."""
    b, n, d = x.shape
    if out is None:
        return torch.empty((b, n, d), dtype=FP8, device=x.device), torch.empty((b, n, 1), device=x.device)
    q, s = out
    check_tensor("out[0] (e4m3 values)", q, (b, n, d), FP8, contiguous=True, device=x.device)
    check_tensor("out[1] (scales)", s, (b, n, 1), torch.float32, contiguous=True, device=x.device)
    return q, s


def _check_rows(x: Tensor) -> None:
    check_tensor("x", x, dtype=FLOAT_DTYPES, inner_contiguous=True)
    check(x.dim() == 3, f"x must be [B, L, D], got shape {tuple(x.shape)}")


@register_impl("fp8_quantize_rows", "triton")
def fp8_quantize_rows(x: Tensor, out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Triton per-token quantisation. x: `[B, L, D]` (unit stride in D); returns (e4m3 `[B, L, D]`,
    float32 scales `[B, L, 1]`), both contiguous, into `out` when given."""
    _check_rows(x)
    q, s = _outputs(x, out)
    if x.numel():
        _rows_quant_launch(x, q, s, False)
    return q, s


@register_impl("gelu_tanh_fp8", "triton")
def gelu_tanh_fp8(x: Tensor, out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Triton tanh-GELU quantised per token. x: `[B, L, F]` (unit stride in F); returns as
    `fp8_quantize_rows`."""
    _check_rows(x)
    q, s = _outputs(x, out)
    if x.numel():
        _rows_quant_launch(x, q, s, True)
    return q, s


@register_impl("modulate_layernorm_fp8", "triton")
def modulate_layernorm_fp8(
    x: Tensor, shift: Tensor, scale: Tensor, n_hist: int, eps: float, out: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """Triton `modulate_layernorm` quantised per token. x: `[B, L, D]` (unit stride in D, D <= 8192);
    shift, scale: `[B, 2, D]` float32 with unit stride in D; returns as `fp8_quantize_rows`."""
    _check_rows(x)
    b, n, d = x.shape
    check(d <= MAX_NORM_D, f"x: D={d} exceeds the single-block limit {MAX_NORM_D}")
    check(0 <= n_hist <= n, f"n_hist must be in [0, L={n}], got {n_hist}")
    for name, t in (("shift", shift), ("scale", scale)):
        check_tensor(name, t, (b, 2, d), torch.float32, inner_contiguous=True, device=x.device)
    q, s = _outputs(x, out)
    if x.numel():
        _modulate_layernorm_quant_launch(x, shift, scale, n_hist, float(eps), q, s)
    return q, s


@fused_op("fp8_quantize_rows", mutates=("q", "s"))
def _rows_quant_launch(x: Tensor, q: Tensor, s: Tensor, gelu: bool) -> None:
    b, n, d = x.shape
    _rows_quant_kernel[(b * n,)](x, q, s, n, d, x.stride(0), x.stride(1), GELU=gelu, **rows_launch_config(d))


@fused_op("modulate_layernorm_fp8", mutates=("q", "s"))
def _modulate_layernorm_quant_launch(
    x: Tensor, shift: Tensor, scale: Tensor, n_hist: int, eps: float, q: Tensor, s: Tensor
) -> None:
    b, n, d = x.shape
    block = next_pow2(d)
    _modulate_layernorm_quant_kernel[(b * n,)](
        x, shift, scale, q, s, n, d, n_hist, eps,
        x.stride(0), x.stride(1), shift.stride(0), shift.stride(1), scale.stride(0), scale.stride(1),
        BLOCK_D=block, num_warps=row_warps(block),
    )  # fmt: skip
