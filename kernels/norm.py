"""LayerNorm + two-segment adaLN modulation: one program per token row, the whole row in registers.

D up to 8192 fits a single power-of-two block (16 fp32 values per thread at 16 warps), so the row
is read once; the segment (history or noisy) is picked per row, so the boundary may fall anywhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from helios_rt.ops.registry import register_impl

from ._common import FLOAT_DTYPES, Tensor, check, check_out, check_tensor, fused_op, next_pow2, row_warps

MAX_D = 8192


@triton.jit
def _normed_row(x, mask, D, eps, RMS: tl.constexpr):
    """The shared row prologue: `x` (one float32 row, 0 where masked) centred (LayerNorm; RMSNorm keeps it)
    and scaled by 1/sqrt(mean square + eps). Every row-norm kernel of this package calls it, so the
    statistics are computed one way."""
    if RMS:  # noqa: SIM108  (a constexpr branch: the RMS variant never computes the mean)
        xc = x
    else:
        xc = tl.where(mask, x - tl.sum(x, axis=0) / D, 0.0)
    return xc * (1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps))


@triton.jit
def _modulate_layernorm_kernel(
    x_ptr, shift_ptr, scale_ptr, out_ptr,
    L, D, n_hist, eps,
    sxb, sxl, sob, sol, shb, shs, scb, scs,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: B x L x row stride can pass 2^31
    b = row // L
    l_idx = row - b * L
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + b * sxb + l_idx * sxl + cols, mask=mask, other=0.0).to(tl.float32)
    seg = (l_idx >= n_hist).to(tl.int32)
    sc = tl.load(scale_ptr + b * scb + seg * scs + cols, mask=mask, other=0.0)
    sh = tl.load(shift_ptr + b * shb + seg * shs + cols, mask=mask, other=0.0)
    y = _normed_row(x, mask, D, eps, False) * (1.0 + sc) + sh
    tl.store(out_ptr + b * sob + l_idx * sol + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def launch_config(d: int) -> dict:
    block = next_pow2(d)
    return {"BLOCK_D": block, "num_warps": row_warps(block)}


@register_impl("modulate_layernorm", "triton")
def modulate_layernorm(
    x: Tensor, shift: Tensor, scale: Tensor, n_hist: int, eps: float, out: Tensor | None = None
) -> Tensor:
    """Triton `modulate_layernorm`. x: `[B, L, D]` (unit stride in D); shift, scale: `[B, 2, D]`
    float32 with unit stride in D, any batch and segment strides (the transformer hands over views of
    one `[B, 6, 2, D]` table); out: `[B, L, D]` in x.dtype (unit stride in D), allocated if None."""
    check_tensor("x", x, dtype=FLOAT_DTYPES, inner_contiguous=True)
    check(x.dim() == 3, f"x must be [B, L, D], got shape {tuple(x.shape)}")
    b, n, d = x.shape
    check(d <= MAX_D, f"x: D={d} exceeds the single-block limit {MAX_D}")
    check(0 <= n_hist <= n, f"n_hist must be in [0, L={n}], got {n_hist}")
    for name, t in (("shift", shift), ("scale", scale)):
        check_tensor(name, t, (b, 2, d), torch.float32, inner_contiguous=True, device=x.device)
    out = check_out(out, (b, n, d), x.dtype, x.device, inner_contiguous=True)
    if x.numel():
        _modulate_layernorm_launch(x, shift, scale, n_hist, float(eps), out)
    return out


@fused_op("modulate_layernorm", mutates=("out",))
def _modulate_layernorm_launch(x: Tensor, shift: Tensor, scale: Tensor, n_hist: int, eps: float, out: Tensor) -> None:
    b, n, d = x.shape
    _modulate_layernorm_kernel[(b * n,)](
        x, shift, scale, out, n, d, n_hist, eps,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        shift.stride(0), shift.stride(1), scale.stride(0), scale.stride(1), **launch_config(d),
    )  # fmt: skip


@triton.jit
def _row_norm_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    L, D, eps,
    sxb, sxl, sob, sol,
    RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """LayerNorm (RMS=False) or RMSNorm (RMS=True) of one row, float32 statistics, optional affine."""
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: B x L x row stride can pass 2^31
    b = row // L
    l_idx = row - b * L
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + b * sxb + l_idx * sxl + cols, mask=mask, other=0.0).to(tl.float32)
    y = _normed_row(x, mask, D, eps, RMS)
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * sob + l_idx * sol + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _check_rows(name: str, x: Tensor) -> tuple[int, int, int]:
    check_tensor(name, x, dtype=FLOAT_DTYPES, inner_contiguous=True)
    check(x.dim() == 3, f"{name} must be [B, L, D], got shape {tuple(x.shape)}")
    check(x.shape[-1] <= MAX_D, f"{name}: D={x.shape[-1]} exceeds the single-block limit {MAX_D}")
    return tuple(x.shape)


@register_impl("layernorm", "triton")
def layernorm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, out: Tensor | None = None) -> Tensor:
    """Triton `layernorm` (the cross-attention norm). x: `[B, L, D]` in any float dtype, unit stride in D,
    any batch and row strides (the noisy rows of the residual stream); weight, bias: `[D]` contiguous, any
    float dtype, or None; out: `[B, L, D]` in x.dtype (unit stride in D), allocated if None. Statistics and
    affine in float32, one read of x and one write: no float32 copy of the activation exists."""
    b, n, d = _check_rows("x", x)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(name, t, (d,), FLOAT_DTYPES, contiguous=True, device=x.device)
    out = check_out(out, (b, n, d), x.dtype, x.device, inner_contiguous=True)
    if x.numel():
        _layernorm_launch(x, weight, bias, float(eps), out)
    return out


@register_impl("rmsnorm", "triton")
def rmsnorm(x: Tensor, weight: Tensor, eps: float, out: Tensor | None = None) -> Tensor:
    """Triton `rmsnorm` over the last dim (all heads together: the cross-attention Q and text K norms).
    x: `[B, L, D]`, unit stride in D, any batch and row strides; weight: `[D]` contiguous in any float
    dtype (read and upcast in the kernel); out: `[B, L, D]` in x.dtype, allocated if None."""
    b, n, d = _check_rows("x", x)
    check_tensor("weight", weight, (d,), FLOAT_DTYPES, contiguous=True, device=x.device)
    out = check_out(out, (b, n, d), x.dtype, x.device, inner_contiguous=True)
    if x.numel():
        _rmsnorm_launch(x, weight, float(eps), out)
    return out


def _launch_row_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, out: Tensor, rms: bool):
    b, n, d = x.shape
    _row_norm_kernel[(b * n,)](
        x, x if weight is None else weight, x if bias is None else bias, out, n, d, eps,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None, **launch_config(d),
    )  # fmt: skip


@fused_op("layernorm", mutates=("out",))
def _layernorm_launch(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, out: Tensor) -> None:
    _launch_row_norm(x, weight, bias, eps, out, rms=False)


@fused_op("rmsnorm", mutates=("out",))
def _rmsnorm_launch(x: Tensor, weight: Tensor, eps: float, out: Tensor) -> None:
    _launch_row_norm(x, weight, None, eps, out, rms=True)
