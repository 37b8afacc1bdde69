"""A sublayer's residual fused into the next sublayer's LayerNorm: one pass over the residual stream.

Apart, `x = x + y * gate` reads x and y and writes x, and the norm then reads x again and writes its
output. Fused, a program owns one row: it adds the residual, stores x (rounded to x.dtype, as stored
apart), and norms the rounded row from registers, so x is read once. Two ops share the kernel:
`residual_modulate_layernorm` (adaLN: the next block's attention input, and the FFN input after the
cross-attention's ungated residual) and `residual_layernorm` (the cross-attention's affine LayerNorm of
the noisy rows after the self-attention's gated residual).

x is updated in place; the op gets it as two row ranges, `head` (rows the residual does not touch, read
only) and `tail_` (rows it updates: read, then written; the trailing underscore marks an in-place argument,
`_common.fused_op`), so the operator's schema says exactly which bytes are read and written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from helios_rt.ops.registry import register_impl

from ._common import FLOAT_DTYPES, Tensor, check, check_out, check_tensor, fused_op
from .norm import MAX_D, _normed_row
from .norm import launch_config as norm_launch_config


@triton.jit
def _residual_norm_kernel(
    head_ptr, x_ptr, y_ptr, gate_ptr, p_ptr, q_ptr, out_ptr,
    L, D, n_hist, res_start, norm_start, eps,
    shb, shl, sxb, sxl, syb, syl, sgb, sgs, spb, sps, sqb, sqs, sob, sol,
    GATED: tl.constexpr, MODULATE: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Row l < res_start: read from head; else x[l - res_start] += y * gate[seg] (stored). Row l >= norm_start:
    out[l - norm_start] = LayerNorm(x) * (1 + q[seg]) + p[seg] (MODULATE) or * p + q (affine, zero strides)."""
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: B x L x row stride can pass 2^31
    b = row // L
    l_idx = row - b * L
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    seg = (l_idx >= n_hist).to(tl.int32)
    if l_idx < res_start:
        x = tl.load(head_ptr + b * shb + l_idx * shl + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        r = l_idx - res_start
        x = tl.load(x_ptr + b * sxb + r * sxl + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + b * syb + r * syl + cols, mask=mask, other=0.0).to(tl.float32)
        if GATED:
            y = y * tl.load(gate_ptr + b * sgb + seg * sgs + cols, mask=mask, other=0.0)
        stored = (x + y).to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + b * sxb + r * sxl + cols, stored, mask=mask)
        x = stored.to(tl.float32)
    if l_idx >= norm_start:
        p = tl.load(p_ptr + b * spb + seg * sps + cols, mask=mask, other=0.0).to(tl.float32)
        q = tl.load(q_ptr + b * sqb + seg * sqs + cols, mask=mask, other=0.0).to(tl.float32)
        h = _normed_row(x, mask, D, eps, False)
        h = h * (1.0 + q) + p if MODULATE else h * p + q
        tl.store(out_ptr + b * sob + (l_idx - norm_start) * sol + cols, h.to(out_ptr.dtype.element_ty), mask=mask)


def launch_config(d: int) -> dict:
    """modulate_layernorm's: one row per program, the whole row in registers."""
    return norm_launch_config(d)


def _check_residual(x: Tensor, y: Tensor, gate: Tensor | None, n_hist: int) -> tuple[int, int, int]:
    check_tensor("x", x, dtype=FLOAT_DTYPES, inner_contiguous=True)
    check(x.dim() == 3, f"x must be [B, L, D], got shape {tuple(x.shape)}")
    b, n, d = x.shape
    check(d <= MAX_D, f"x: D={d} exceeds the single-block limit {MAX_D}")
    check(0 <= n_hist <= n, f"n_hist must be in [0, L={n}], got {n_hist}")
    check(y.dim() == 3 and y.shape[1] <= n, f"y must be [B, Ly <= {n}, {d}], got shape {tuple(y.shape)}")
    check_tensor("y", y, (b, y.shape[1], d), FLOAT_DTYPES, inner_contiguous=True, device=x.device)
    if gate is not None:
        check_tensor("gate", gate, (b, 2, d), torch.float32, inner_contiguous=True, device=x.device)
    return b, n, d


@register_impl("residual_modulate_layernorm", "triton")
def residual_modulate_layernorm(
    x: Tensor,
    y: Tensor,
    gate: Tensor | None,
    n_hist: int,
    shift: Tensor,
    scale: Tensor,
    eps: float,
    out: Tensor | None = None,
) -> Tensor:
    """Triton `residual_modulate_layernorm`. x: `[B, L, D]` (unit stride in D), updated in place on its last Ly
    rows; y: `[B, Ly, D]` (unit stride in D, any float dtype); gate: `[B, 2, D]` float32 (unit stride in D, any
    batch and segment strides) or None (a plain add); shift, scale: as gate; out: `[B, L, D]` in x.dtype."""
    b, n, d = _check_residual(x, y, gate, n_hist)
    for name, t in (("shift", shift), ("scale", scale)):
        check_tensor(name, t, (b, 2, d), torch.float32, inner_contiguous=True, device=x.device)
    out = check_out(out, (b, n, d), x.dtype, x.device, inner_contiguous=True)
    if x.numel():
        start = n - y.shape[1]
        _residual_modulate_layernorm_launch(x[:, :start], x[:, start:], y, gate, n_hist, shift, scale, float(eps), out)
    return out


@register_impl("residual_layernorm", "triton")
def residual_layernorm(
    x: Tensor,
    y: Tensor,
    gate: Tensor,
    n_hist: int,
    start: int,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    out: Tensor | None = None,
) -> Tensor:
    """Triton `residual_layernorm`. x, y: `[B, L, D]` (unit stride in D), x updated in place by `y * gate`
    (gate `[B, 2, D]` float32, unit stride in D); weight, bias: `[D]` contiguous, any float dtype; returns
    the LayerNorm of rows `start:` of the updated x, `[B, L - start, D]` in x.dtype (into `out`)."""
    b, n, d = _check_residual(x, y, gate, n_hist)
    check(y.shape[1] == n, f"y must cover every row of x ({n}), got {y.shape[1]}")
    check(0 <= start <= n, f"start must be in [0, L={n}], got {start}")
    for name, t in (("weight", weight), ("bias", bias)):
        check_tensor(name, t, (d,), FLOAT_DTYPES, contiguous=True, device=x.device)
    out = check_out(out, (b, n - start, d), x.dtype, x.device, inner_contiguous=True)
    if x.numel():
        _residual_layernorm_launch(x, y, gate, n_hist, start, weight, bias, float(eps), out)
    return out


@fused_op("residual_modulate_layernorm", mutates=("tail_", "out"))
def _residual_modulate_layernorm_launch(
    head: Tensor, tail_: Tensor, y: Tensor, gate: Tensor | None, n_hist: int, shift: Tensor, scale: Tensor, eps: float,
    out: Tensor,
) -> None:  # fmt: skip
    _launch(head, tail_, y, gate, n_hist, 0, (shift, shift.stride(0), shift.stride(1)),
            (scale, scale.stride(0), scale.stride(1)), eps, out, modulate=True)  # fmt: skip


@fused_op("residual_layernorm", mutates=("x_", "out"))
def _residual_layernorm_launch(
    x_: Tensor, y: Tensor, gate: Tensor, n_hist: int, start: int, weight: Tensor, bias: Tensor, eps: float, out: Tensor
) -> None:
    _launch(x_[:, :0], x_, y, gate, n_hist, start, (weight, 0, 0), (bias, 0, 0), eps, out, modulate=False)


def _launch(head: Tensor, tail: Tensor, y: Tensor, gate: Tensor | None, n_hist: int, norm_start: int,
            p: tuple, q: tuple, eps: float, out: Tensor, modulate: bool) -> None:  # fmt: skip
    """One program per row of `[head | tail]`; p, q: (tensor, batch stride, segment stride)."""
    b, n_head, d = head.shape
    n = n_head + tail.shape[1]
    g = y if gate is None else gate
    _residual_norm_kernel[(b * n,)](
        head, tail, y, g, p[0], q[0], out, n, d, n_hist, n_head, norm_start, eps,
        head.stride(0), head.stride(1), tail.stride(0), tail.stride(1), y.stride(0), y.stride(1),
        g.stride(0), g.stride(1), p[1], p[2], q[1], q[2], out.stride(0), out.stride(1),
        GATED=gate is not None, MODULATE=modulate, **launch_config(d),
    )  # fmt: skip
