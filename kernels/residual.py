"""Gated residual `x + y * gate` with a two-segment gate; `out` may alias `x` (in-place residual).

Each element is read before it is written by the same program, so aliasing is safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from helios_rt.ops.registry import register_impl

from ._common import FLOAT_DTYPES, Tensor, check, check_out, check_tensor, fused_op, next_pow2


@triton.jit
def _gate_residual_kernel(
    x_ptr, y_ptr, gate_ptr, out_ptr,
    L, D, n_hist,
    sxb, sxl, syb, syl, sob, sol, sgb, sgs,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: B x L x row stride can pass 2^31
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    b = row // L
    l_idx = row - b * L
    mask = cols < D
    seg = (l_idx >= n_hist).to(tl.int32)
    g = tl.load(gate_ptr + b * sgb + seg * sgs + cols, mask=mask, other=0.0)
    x = tl.load(x_ptr + b * sxb + l_idx * sxl + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b * syb + l_idx * syl + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * sob + l_idx * sol + cols, (x + y * g).to(out_ptr.dtype.element_ty), mask=mask)


def launch_config(d: int) -> dict:
    return {"BLOCK_D": min(1024, next_pow2(d)), "num_warps": 4}


@register_impl("gate_residual", "triton")
def gate_residual(x: Tensor, y: Tensor, gate: Tensor, n_hist: int, out: Tensor | None = None) -> Tensor:
    """Triton `gate_residual`. x, y: `[B, L, D]` (unit stride in D, any dtype pair); gate: `[B, 2, D]`
    float32 with unit stride in D, any batch and segment strides; out: `[B, L, D]` in x.dtype, may be
    `x` itself; allocated if None."""
    check_tensor("x", x, dtype=FLOAT_DTYPES, inner_contiguous=True)
    check(x.dim() == 3, f"x must be [B, L, D], got shape {tuple(x.shape)}")
    b, n, d = x.shape
    check_tensor("y", y, (b, n, d), FLOAT_DTYPES, inner_contiguous=True, device=x.device)
    check_tensor("gate", gate, (b, 2, d), torch.float32, inner_contiguous=True, device=x.device)
    check(0 <= n_hist <= n, f"n_hist must be in [0, L={n}], got {n_hist}")
    out = check_out(out, (b, n, d), x.dtype, x.device, inner_contiguous=True)
    if x.numel():
        _gate_residual_launch(x, y, gate, n_hist, out)
    return out


@fused_op("gate_residual", mutates=("out",))
def _gate_residual_launch(x: Tensor, y: Tensor, gate: Tensor, n_hist: int, out: Tensor) -> None:
    b, n, d = x.shape
    cfg = launch_config(d)
    grid = (b * n, triton.cdiv(d, cfg["BLOCK_D"]))
    _gate_residual_kernel[grid](
        x, y, gate, out, n, d, n_hist,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), out.stride(0), out.stride(1),
        gate.stride(0), gate.stride(1), **cfg,
    )  # fmt: skip
