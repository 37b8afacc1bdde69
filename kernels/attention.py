"""Attention kernels over `[B, L, H, Dh]`: the Q/K prologue (RMSNorm across heads, interleaved-pair RoPE,
history-key scale), a FlashAttention-style forward (online softmax, fp32 accumulation), and the same
forward with the prologue applied as Q/K tiles are loaded (compressed-context attention).

The prologue rounds the RMSNorm output to the input dtype before RoPE, as the reference does, so that
low-precision results follow the reference's rounding rather than only its math.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from helios_rt.ops.registry import register_impl

from ._common import FLOAT_DTYPES, Tensor, check, check_out, check_tensor, fused_op, interpreting, next_pow2

LOG2E = 1.4426950408889634


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, ks_ptr, qo_ptr, ko_ptr,
    L, HD, n_hist, eps, sqb, sql, skb, skl,
    HALF: tl.constexpr, BLOCK_P: tl.constexpr, KEY_SCALE: tl.constexpr,
):  # fmt: skip
    # One program per token: RMSNorm spans all heads, so the program sees the whole row as pairs.
    row = tl.program_id(0)
    b = row // L
    l_idx = row - b * L
    p = tl.arange(0, BLOCK_P)
    pm = p < HD // 2
    head = p // HALF
    c = tl.load(cos_ptr + l_idx * HALF + p % HALF, mask=pm, other=0.0)
    s = tl.load(sin_ptr + l_idx * HALF + p % HALF, mask=pm, other=0.0)
    for which in tl.static_range(2):
        src = q_ptr + b * sqb + l_idx * sql if which == 0 else k_ptr + b * skb + l_idx * skl
        w_ptr = qw_ptr if which == 0 else kw_ptr
        dst = qo_ptr if which == 0 else ko_ptr
        xe_raw = tl.load(src + 2 * p, mask=pm, other=0.0)
        xo_raw = tl.load(src + 2 * p + 1, mask=pm, other=0.0)
        xe = xe_raw.to(tl.float32)
        xo = xo_raw.to(tl.float32)
        rstd = 1.0 / tl.sqrt((tl.sum(xe * xe, axis=0) + tl.sum(xo * xo, axis=0)) / HD + eps)
        we = tl.load(w_ptr + 2 * p, mask=pm, other=0.0).to(tl.float32)
        wo = tl.load(w_ptr + 2 * p + 1, mask=pm, other=0.0).to(tl.float32)
        ye = (xe * rstd * we).to(xe_raw.dtype).to(tl.float32)
        yo = (xo * rstd * wo).to(xe_raw.dtype).to(tl.float32)
        re = ye * c - yo * s
        ro = ye * s + yo * c
        if which == 1 and KEY_SCALE:
            ks = tl.load(ks_ptr + head, mask=pm, other=1.0)
            ks = tl.where(l_idx < n_hist, ks, 1.0)
            re = re * ks
            ro = ro * ks
        o = dst + row.to(tl.int64) * HD
        tl.store(o + 2 * p, re.to(dst.dtype.element_ty), mask=pm)
        tl.store(o + 2 * p + 1, ro.to(dst.dtype.element_ty), mask=pm)


def _check_prologue(q, k, q_weight, k_weight, cos, sin, heads, key_scale, n_hist):
    check_tensor("q", q, dtype=FLOAT_DTYPES, inner_contiguous=True)
    check(q.dim() == 3, f"q must be [B, L, H*Dh], got shape {tuple(q.shape)}")
    b, n, hd = q.shape
    check(heads > 0 and hd % heads == 0, f"q: last dim {hd} is not divisible by heads={heads}")
    dh = hd // heads
    check(dh % 2 == 0 and next_pow2(dh) == dh, f"head dim {dh} must be a power of two (pairs are rotated)")
    check_tensor("k", k, (b, n, hd), q.dtype, inner_contiguous=True, device=q.device)
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        check_tensor(name, w, (hd,), FLOAT_DTYPES, contiguous=True, device=q.device)
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, (n, dh // 2), torch.float32, contiguous=True, device=q.device)
    if key_scale is not None:
        check_tensor("key_scale", key_scale, (heads,), torch.float32, contiguous=True, device=q.device)
    check(0 <= n_hist <= n, f"n_hist must be in [0, L={n}], got {n_hist}")
    return b, n, hd, dh


def qk_norm_rope_config(hd: int) -> dict:
    block = next_pow2(hd // 2)
    return {"BLOCK_P": block, "num_warps": max(4, min(16, block // 256))}


def rstd_config(hd: int) -> dict:
    return {"BLOCK": min(4096, next_pow2(hd)), "num_warps": 4}


@register_impl("qk_norm_rope", "triton")
def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, heads, eps, key_scale, n_hist):
    """Triton `qk_norm_rope`. q, k: `[B, L, H*Dh]` with unit stride last (row strides free, e.g. slices
    of a fused QKV output); weights `[H*Dh]`; cos, sin `[L, Dh/2]` float32; key_scale `[H]` float32 or
    None. Returns contiguous q, k `[B, L, H, Dh]` in q.dtype."""
    b, n, hd, dh = _check_prologue(q, k, q_weight, k_weight, cos, sin, heads, key_scale, n_hist)
    qo = torch.empty((b, n, heads, dh), dtype=q.dtype, device=q.device)
    ko = torch.empty_like(qo)
    if q.numel():
        _qk_norm_rope_launch(q, k, q_weight, k_weight, cos, sin, float(eps), key_scale, n_hist, qo, ko)
    return qo, ko


@fused_op("qk_norm_rope", mutates=("qo", "ko"))
def _qk_norm_rope_launch(
    q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor, eps: float,
    key_scale: Tensor | None, n_hist: int, qo: Tensor, ko: Tensor,
) -> None:  # fmt: skip
    b, n, heads, dh = qo.shape
    hd = heads * dh
    use_ks = key_scale is not None and n_hist > 0
    _qk_norm_rope_kernel[(b * n,)](
        q, k, q_weight, k_weight, cos, sin, key_scale if use_ks else cos, qo, ko,
        n, hd, n_hist, eps, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        HALF=dh // 2, KEY_SCALE=use_ks, **qk_norm_rope_config(hd),
    )  # fmt: skip


@triton.jit
def _rstd_kernel(q_ptr, k_ptr, r_ptr, BL, L, HD, eps, sqb, sql, skb, skl, BLOCK: tl.constexpr):
    # Per-token RMSNorm statistics of q (r[0]) and k (r[1]) for the fused attention: [2, B*L] float32.
    row = tl.program_id(0)
    which = tl.program_id(1)
    b = row // L
    l_idx = row - b * L
    base = q_ptr + b * sqb + l_idx * sql if which == 0 else k_ptr + b * skb + l_idx * skl
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, HD, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < HD, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(r_ptr + which * BL + row, 1.0 / tl.sqrt(tl.sum(acc, axis=0) / HD + eps))


@triton.jit
def _load_tile(ptr, rows, n_rows, row_stride, d):
    return tl.load(ptr + rows[:, None].to(tl.int64) * row_stride + d[None, :], mask=rows[:, None] < n_rows, other=0.0)


@triton.jit
def _prologue_tile(x, rstd, w_ptr, cos_ptr, sin_ptr, rows, n_rows, scale, HALF: tl.constexpr):
    """Apply RMSNorm (given rstd), RoPE and a per-row scale to a [BLOCK, 2*HALF] tile; returns x.dtype."""
    xe, xo = tl.split(tl.reshape(x, (x.shape[0], HALF, 2)))
    j = tl.arange(0, HALF)
    we = tl.load(w_ptr + 2 * j).to(tl.float32)[None, :]
    wo = tl.load(w_ptr + 2 * j + 1).to(tl.float32)[None, :]
    m = rows[:, None] < n_rows
    c = tl.load(cos_ptr + rows[:, None] * HALF + j[None, :], mask=m, other=0.0)
    s = tl.load(sin_ptr + rows[:, None] * HALF + j[None, :], mask=m, other=0.0)
    ye = (xe.to(tl.float32) * rstd[:, None] * we).to(x.dtype).to(tl.float32)
    yo = (xo.to(tl.float32) * rstd[:, None] * wo).to(x.dtype).to(tl.float32)
    re = (ye * c - yo * s) * scale[:, None]
    ro = (ye * s + yo * c) * scale[:, None]
    return tl.reshape(tl.join(re, ro), (x.shape[0], 2 * HALF)).to(x.dtype)


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, rq_ptr, rk_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, ks_ptr,
    Lq, Lk, H, n_hist, qk_scale,
    sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PROLOGUE: tl.constexpr, KEY_SCALE: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh - b * H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    q_base = q_ptr + b.to(tl.int64) * sqb + h * sqh
    k_base = k_ptr + b.to(tl.int64) * skb + h * skh
    v_base = v_ptr + b.to(tl.int64) * svb + h * svh
    q = _load_tile(q_base, rows, Lq, sql, d)
    if PROLOGUE:
        rq = tl.load(rq_ptr + b * Lq + rows, mask=rows < Lq, other=0.0)
        one = tl.full([BLOCK_M], 1.0, tl.float32)
        q = _prologue_tile(q, rq, qw_ptr + h * HEAD_DIM, cos_ptr, sin_ptr, rows, Lq, one, HEAD_DIM // 2)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if KEY_SCALE:
        ks = tl.load(ks_ptr + h)
    for start_n in range(0, Lk, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, cols, Lk, skl, d)
        if PROLOGUE:
            rk = tl.load(rk_ptr + b * Lk + cols, mask=cols < Lk, other=0.0)
            kscale = tl.full([BLOCK_N], 1.0, tl.float32)
            if KEY_SCALE:
                kscale = tl.where(cols < n_hist, ks, kscale)
            k = _prologue_tile(k, rk, kw_ptr + h * HEAD_DIM, cos_ptr, sin_ptr, cols, Lk, kscale, HEAD_DIM // 2)
        if DOT_F32:  # CPU interpreter: numpy has no bf16 matmul; bf16 products are exact in fp32
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * qk_scale
        else:
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where((cols < Lk)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_tile(v_base, cols, Lk, svl, d)
        if DOT_F32:
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    acc = acc / l_i[:, None]
    o = o_ptr + b.to(tl.int64) * sob + h * soh + rows[:, None].to(tl.int64) * sol + d[None, :]
    tl.store(o, acc.to(o_ptr.dtype.element_ty), mask=rows[:, None] < Lq)


def attention_config(head_dim: int, dtype: torch.dtype, prologue: bool, interpret: bool | None = None) -> dict:
    """Tile sizes for the attention forward (sm_90 configs; small tiles in the CPU interpreter)."""
    if interpreting() if interpret is None else interpret:
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    # Picked so that ptxas -v reports no spills on sm_90 (see kernels/aot.py): at Dh=128 the fused
    # prologue's RoPE temporaries and fp32 operands push a 128-row tile past 255 registers.
    if dtype == torch.float32:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
    if head_dim <= 64:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    if prologue:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (no silent TF32), matching the reference.
    return "ieee" if dtype == torch.float32 else "tf32"


@fused_op("attention", mutates=("out",))
def _attention_launch(q: Tensor, k: Tensor, v: Tensor, out: Tensor) -> None:
    _launch_attention(q, k, v, out, None, None, None, None, 0, out.shape[-1])


@fused_op("compressed_context_attention", mutates=("out",))
def _compressed_context_attention_launch(
    q: Tensor, k: Tensor, v: Tensor, rstd: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor,
    key_scale: Tensor | None, n_hist: int, out: Tensor,
) -> None:  # fmt: skip
    _launch_attention(q, k, v, out, rstd, (q_weight, k_weight), (cos, sin), key_scale, n_hist, out.shape[-1])


@fused_op("qk_rstd", mutates=("out",))
def _qk_rstd_launch(q: Tensor, k: Tensor, eps: float, out: Tensor) -> None:
    b, n, hd = q.shape
    _rstd_kernel[(b * n, 2)](
        q, k, out, b * n, n, hd, eps, q.stride(0), q.stride(1), k.stride(0), k.stride(1), **rstd_config(hd),
    )  # fmt: skip


def _launch_attention(q, k, v, out, rstd, weights, rope, key_scale, n_hist, dh) -> None:
    b, lq, heads, _ = out.shape
    lk = k.shape[1]
    prologue = rstd is not None
    cfg = attention_config(dh, q.dtype, prologue)
    if prologue:  # q, k: [B, L, H*Dh] -> per-head strides
        sq = (q.stride(0), q.stride(1), dh)
        sk = (k.stride(0), k.stride(1), dh)
    else:
        sq, sk = (q.stride(0), q.stride(1), q.stride(2)), (k.stride(0), k.stride(1), k.stride(2))
    use_ks = prologue and key_scale is not None and n_hist > 0
    dummy = v
    grid = (triton.cdiv(lq, cfg["BLOCK_M"]), b * heads)
    _attn_fwd_kernel[grid](
        q, k, v, out,
        rstd[0] if prologue else dummy, rstd[1] if prologue else dummy,
        *(weights if prologue else (dummy, dummy)), *(rope if prologue else (dummy, dummy)),
        key_scale if use_ks else dummy,
        lq, lk, heads, n_hist, LOG2E / math.sqrt(dh),
        *sq, *sk, v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        HEAD_DIM=dh, PROLOGUE=prologue, KEY_SCALE=use_ks, PRECISION=_precision(q.dtype),
        DOT_F32=interpreting() and q.dtype == torch.bfloat16, **cfg,
    )  # fmt: skip


@register_impl("attention", "triton")
def attention(q: Tensor, k: Tensor, v: Tensor, out: Tensor | None = None) -> Tensor:
    """Triton `attention`: softmax(q k^T / sqrt(Dh)) v, no mask. q: `[B, Lq, H, Dh]`; k, v:
    `[B, Lk, H, Dh]`; any strides with unit stride in Dh; Dh a power of two >= 16; out `[B, Lq, H, Dh]`."""
    check_tensor("q", q, dtype=FLOAT_DTYPES, inner_contiguous=True)
    check(q.dim() == 4, f"q must be [B, Lq, H, Dh], got shape {tuple(q.shape)}")
    b, lq, heads, dh = q.shape
    check(dh >= 16 and next_pow2(dh) == dh, f"q: head dim {dh} must be a power of two >= 16")
    check(k.dim() == 4, f"k must be [B, Lk, H, Dh], got shape {tuple(k.shape)}")
    lk = k.shape[1]
    check_tensor("k", k, (b, lk, heads, dh), q.dtype, inner_contiguous=True, device=q.device)
    check_tensor("v", v, (b, lk, heads, dh), q.dtype, inner_contiguous=True, device=q.device)
    check(lk > 0, "k: need at least one key (softmax over an empty set)")
    out = check_out(out, (b, lq, heads, dh), q.dtype, q.device, inner_contiguous=True)
    if out.numel():
        _attention_launch(q, k, v, out)
    return out


def qk_rstd(q: Tensor, k: Tensor, eps: float, out: Tensor | None = None) -> Tensor:
    """Per-token RMSNorm rstd of q and k `[B, L, H*Dh]` across all heads: `[2, B, L]` float32."""
    b, n, hd = q.shape
    out = check_out(out, (2, b, n), torch.float32, q.device, contiguous=True)
    if out.numel():
        _qk_rstd_launch(q, k, float(eps), out)
    return out


@register_impl("compressed_context_attention", "triton")
def compressed_context_attention(q, k, v, q_weight, k_weight, cos, sin, heads, eps, key_scale, n_hist, out=None):
    """Triton `compressed_context_attention`: a per-token rstd pre-pass, then attention with RMSNorm,
    RoPE and the history-key scale applied as Q/K tiles are loaded. q, k: `[B, L, H*Dh]` (unit stride
    last); v: `[B, L, H, Dh]` (unit stride last); returns `[B, L, H, Dh]` in q.dtype."""
    b, n, hd, dh = _check_prologue(q, k, q_weight, k_weight, cos, sin, heads, key_scale, n_hist)
    check(dh >= 16, f"head dim {dh} must be >= 16")
    check_tensor("v", v, (b, n, heads, dh), q.dtype, inner_contiguous=True, device=q.device)
    out = check_out(out, (b, n, heads, dh), q.dtype, q.device, inner_contiguous=True)
    if out.numel() and q.dtype == torch.float32:
        # fp32 tiles with the in-register RoPE shuffle spill heavily on sm_90 (kernels/aot.py), and
        # fp32 is a test/debug precision: run the prologue kernel, then the plain attention kernel.
        qr, kr = qk_norm_rope(q, k, q_weight, k_weight, cos, sin, heads, eps, key_scale, n_hist)
        return attention(qr, kr, v, out=out)
    if out.numel():
        rstd = qk_rstd(q, k, eps)
        _compressed_context_attention_launch(q, k, v, rstd, q_weight, k_weight, cos, sin, key_scale, n_hist, out)
    return out
