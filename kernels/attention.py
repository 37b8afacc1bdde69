"""Attention kernels over `[B, L, H, Dh]`: the Q/K prologue (RMSNorm across heads, interleaved-pair RoPE,
history-key scale) and a FlashAttention-style forward (online softmax, fp32 accumulation, autotuned tiles).

The prologue stays a kernel of its own. Applying it as K tiles load (the removed compressed-context
kernel) redid the K prologue once per query tile, ~87-173x at the 14B stage-2 shape (11040 tokens,
64- or 128-row query tiles), for ~3 ms of saved HBM traffic per forward, and it tied the attention to
this kernel instead of FlashAttention-3; see kernels/report.py for the numbers.

The prologue rounds the RMSNorm output to the input dtype before RoPE, as the reference does, so that
low-precision results follow the reference's rounding rather than only its math.
"""

from __future__ import annotations

import functools
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
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: B x L x row stride can pass 2^31
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
def _attn_tile(
    q, k_base, v_base, start_n, Lk, skl, svl, d, m_i, l_i, acc, qk_scale,
    BLOCK_N: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    """One key tile of the online softmax. Only the last tile (MASK) checks bounds: full tiles load
    without masks and skip the -inf select. The rescale of the running output is folded into the P@V
    dot's accumulator (`acc * alpha` is the dot's `acc` operand), as FlashAttention does."""
    cols = start_n + tl.arange(0, BLOCK_N)
    k_off = cols[:, None].to(tl.int64) * skl + d[None, :]
    v_off = cols[:, None].to(tl.int64) * svl + d[None, :]
    k = tl.load(k_base + k_off, mask=cols[:, None] < Lk, other=0.0) if MASK else tl.load(k_base + k_off)
    if DOT_F32:  # CPU interpreter: numpy has no bf16 matmul; bf16 products are exact in fp32
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    s = s * qk_scale
    if MASK:
        s = tl.where((cols < Lk)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_base + v_off, mask=cols[:, None] < Lk, other=0.0) if MASK else tl.load(v_base + v_off)
    if DOT_F32:
        acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, Lq, Lk, H, qk_scale,
    sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    # Offsets are int64 throughout: B x L x H x Dh passes 2^31 elements at long sequences and batch 2.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    q_off = b * sqb + h * sqh + rows[:, None].to(tl.int64) * sql + d[None, :]
    q = tl.load(q_ptr + q_off, mask=rows[:, None] < Lq, other=0.0)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_full = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        m_i, l_i, acc = _attn_tile(q, k_base, v_base, start_n, Lk, skl, svl, d, m_i, l_i, acc, qk_scale,
                                   BLOCK_N, False, PRECISION, DOT_F32)  # fmt: skip
    if n_full < Lk:
        m_i, l_i, acc = _attn_tile(q, k_base, v_base, n_full, Lk, skl, svl, d, m_i, l_i, acc, qk_scale,
                                   BLOCK_N, True, PRECISION, DOT_F32)  # fmt: skip
    acc = acc / l_i[:, None]
    o_off = b * sob + h * soh + rows[:, None].to(tl.int64) * sol + d[None, :]
    tl.store(o_ptr + o_off, acc.to(o_ptr.dtype.element_ty), mask=rows[:, None] < Lq)


# sm_90 tile configs the autotuner picks from, per head dim, for 16-bit inputs: (BLOCK_M, BLOCK_N, warps, stages).
# Every one compiles without spills (`python -m helios_rt.kernels.report`); the interpreter tests run each.
HALF_CONFIGS: dict[int, tuple[tuple[int, int, int, int], ...]] = {
    16: ((128, 64, 4, 3), (64, 64, 4, 3)),
    32: ((128, 64, 4, 3), (64, 64, 4, 3)),
    64: ((128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)),
    128: ((128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)),
    256: ((64, 64, 4, 2), (64, 32, 4, 2)),
}
# float32 is a test/debug precision: one config, no tuning. Its exact (ieee) products run on FMA units,
# which hold whole operand rows in registers: every tile size spills on sm_90 at the JIT's specialisation
# (this one least: ~0.4 KB at Dh=64, ~1.4 KB at Dh=128), so the backend table runs float32 through SDPA.
FP32_CONFIGS: dict[int, tuple[tuple[int, int, int, int], ...]] = {dh: ((32, 16, 4, 2),) for dh in HALF_CONFIGS}
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}


def attention_configs(head_dim: int, dtype: torch.dtype) -> list[dict]:
    """The launch configs the autotuner may pick for this head dim and dtype on a GPU."""
    table = FP32_CONFIGS if dtype == torch.float32 else HALF_CONFIGS
    check(head_dim in table, f"head dim {head_dim} has no attention configs; supported: {sorted(table)}")
    return [{"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s} for m, n, w, s in table[head_dim]]


@functools.cache
def _tuned(head_dim: int, dtype: torch.dtype):
    """The kernel autotuned over `attention_configs`, keyed on the sequence lengths: each stage's shape is
    tuned once (at warm-up, before any capture) and the pick cached for the process."""
    configs = [triton.Config({"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]}, num_warps=c["num_warps"],
                             num_stages=c["num_stages"]) for c in attention_configs(head_dim, dtype)]  # fmt: skip
    return triton.autotune(configs=configs, key=["Lq", "Lk"])(_attn_fwd_kernel)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (no silent TF32), matching the reference.
    return "ieee" if dtype == torch.float32 else "tf32"


@fused_op("attention", mutates=("out",))
def _attention_launch(q: Tensor, k: Tensor, v: Tensor, out: Tensor) -> None:
    launch_attention(q, k, v, out)


def launch_attention(q: Tensor, k: Tensor, v: Tensor, out: Tensor, config: dict | None = None) -> None:
    """Launch into validated tensors: the autotuned kernel on a GPU, `config` when given (the tests run
    every tuned config in the interpreter; the sm_90 report compiles each), else the interpreter's tiles."""
    b, lq, heads, dh = out.shape
    args = (
        q, k, v, out, lq, k.shape[1], heads, LOG2E / math.sqrt(dh),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
    )  # fmt: skip
    flags = {"HEAD_DIM": dh, "PRECISION": _precision(q.dtype), "DOT_F32": interpreting() and q.dtype == torch.bfloat16}
    if config is None and not interpreting():
        key = (dh, q.dtype, lq, k.shape[1])
        config = _PICKS.get(key)
        if config is None:
            _tune(key, args, flags, b * heads)
            return
    cfg = config or INTERPRET_CONFIG
    _attn_fwd_kernel[(triton.cdiv(lq, cfg["BLOCK_M"]), b * heads)](*args, **flags, **cfg)


_PICKS: dict[tuple, dict] = {}  # (head dim, dtype, Lq, Lk) -> the autotuner's config


def _tune(key: tuple, args: tuple, flags: dict, bh: int) -> None:
    """Autotune one shape (this call runs the kernel) and remember the pick: later calls launch it directly.
    Tuning benchmarks and synchronises, so it cannot happen inside a CUDA graph capture."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"attention at Lq={key[2]}, Lk={key[3]} (head dim {key[0]}) was not autotuned before this CUDA graph "
            "capture: run the chunk once uncaptured first (Engine.warmup and ChunkProgram.capture do)"
        )
    tuner = _tuned(key[0], key[1])
    tuner[lambda meta: (triton.cdiv(key[2], meta["BLOCK_M"]), bh)](*args, **flags)
    best = tuner.best_config
    _PICKS[key] = {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}


@register_impl("attention", "triton")
def attention(q: Tensor, k: Tensor, v: Tensor, out: Tensor | None = None) -> Tensor:
    """Triton `attention`: softmax(q k^T / sqrt(Dh)) v, no mask. q: `[B, Lq, H, Dh]`; k, v:
    `[B, Lk, H, Dh]`; any strides with unit stride in Dh; Dh a power of two in [16, 256]; out `[B, Lq, H, Dh]`."""
    check_tensor("q", q, dtype=FLOAT_DTYPES, inner_contiguous=True)
    check(q.dim() == 4, f"q must be [B, Lq, H, Dh], got shape {tuple(q.shape)}")
    b, lq, heads, dh = q.shape
    check(16 <= dh <= 256 and next_pow2(dh) == dh, f"q: head dim {dh} must be a power of two in [16, 256]")
    check(k.dim() == 4, f"k must be [B, Lk, H, Dh], got shape {tuple(k.shape)}")
    lk = k.shape[1]
    check_tensor("k", k, (b, lk, heads, dh), q.dtype, inner_contiguous=True, device=q.device)
    check_tensor("v", v, (b, lk, heads, dh), q.dtype, inner_contiguous=True, device=q.device)
    check(lk > 0, "k: need at least one key (softmax over an empty set)")
    out = check_out(out, (b, lq, heads, dh), q.dtype, q.device, inner_contiguous=True)
    if out.numel():
        _attention_launch(q, k, v, out)
    return out
