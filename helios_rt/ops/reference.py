"""PyTorch references of every fused op: each function here is the spec its kernels are tested against.

Conventions shared by all ops:
- activations are `[B, L, D]` with the token order `[history | noisy]`; `n_hist` is the number of
  history tokens (0 when the op sees noisy tokens only);
- per-token modulation comes as two segments, `[B, 2, D]` float32: row 0 applies to history tokens
  (the timestep-0 embedding), row 1 to noisy tokens (the current timestep);
- statistics and modulation are computed in float32 and the result is cast to the activation dtype,
  which is what the Helios reference does in every precision;
- `out=` (optional) receives the result, so that a caller-owned (planned) buffer can be used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .registry import register_reference

Tensor = torch.Tensor


def _write(result: Tensor, out: Tensor | None) -> Tensor:
    if out is None:
        return result
    out.copy_(result)
    return out


def _segmented(table: Tensor, n_tokens: int, n_hist: int) -> Tensor:
    """Expand a `[B, 2, D]` two-segment table to `[B, L, D]` (history rows, then noisy rows)."""
    b, _, d = table.shape
    hist = table[:, 0:1, :].expand(b, n_hist, d)
    noisy = table[:, 1:2, :].expand(b, n_tokens - n_hist, d)
    return torch.cat([hist, noisy], dim=1)


@register_reference("modulate_layernorm")
def modulate_layernorm(
    x: Tensor, shift: Tensor, scale: Tensor, n_hist: int, eps: float, out: Tensor | None = None
) -> Tensor:
    """`LayerNorm(x) * (1 + scale) + shift` with a two-segment shift/scale.

    x: `[B, L, D]`; shift, scale: `[B, 2, D]` float32; returns `[B, L, D]` in x.dtype.
    """
    y = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    n = x.shape[1]
    y = y * (1 + _segmented(scale, n, n_hist)) + _segmented(shift, n, n_hist)
    return _write(y.to(x.dtype), out)


@register_reference("layernorm")
def layernorm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, out: Tensor | None = None) -> Tensor:
    """LayerNorm computed in float32 (optional float32 affine), cast back to x.dtype."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    y = F.layer_norm(x.float(), (x.shape[-1],), w, b, eps)
    return _write(y.to(x.dtype), out)


@register_reference("gate_residual")
def gate_residual(x: Tensor, y: Tensor, gate: Tensor, n_hist: int, out: Tensor | None = None) -> Tensor:
    """`x + y * gate` in float32 with a two-segment gate; `out` may alias `x` (in-place residual).

    x, y: `[B, L, D]`; gate: `[B, 2, D]` float32; returns `[B, L, D]` in x.dtype.
    """
    r = x.float() + y.float() * _segmented(gate, x.shape[1], n_hist)
    return _write(r.to(x.dtype), out)


def _add_residual_(x: Tensor, y: Tensor, gate: Tensor | None, n_hist: int) -> None:
    """`x[:, L-Ly:] += y * gate` in place (`gate` None: `+= y`, as `Tensor.add_` rounds it)."""
    start = x.shape[1] - y.shape[1]
    tail = x[:, start:]
    if gate is None:
        tail.add_(y)
    else:
        gate_residual(tail, y, gate, max(0, n_hist - start), out=tail)


@register_reference("residual_modulate_layernorm")
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
    """A sublayer's residual, then the next sublayer's adaLN input: one pass over the residual stream.

    x: `[B, L, D]`, updated in place on its last `Ly` rows by `y`: `[B, Ly, D]` times the two-segment
    `gate` (`[B, 2, D]` float32; None: a plain add); returns `modulate_layernorm` of the updated x (`[B, L,
    D]`, x.dtype). The norm reads x as stored (rounded to x.dtype), so the result equals the two ops apart.
    """
    _add_residual_(x, y, gate, n_hist)
    return modulate_layernorm(x, shift, scale, n_hist, eps, out)


@register_reference("residual_layernorm")
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
    """The self-attention's gated residual, then the cross-attention's LayerNorm of rows `start:`.

    x: `[B, L, D]`, updated in place: `x += y * gate` (y `[B, L, D]`, gate `[B, 2, D]` float32); returns
    `layernorm(x[:, start:], weight, bias)` (`[B, L - start, D]`, x.dtype) of the updated, stored x.
    """
    _add_residual_(x, y, gate, n_hist)
    return layernorm(x[:, start:], weight, bias, eps, out)


@register_reference("rmsnorm")
def rmsnorm(x: Tensor, weight: Tensor, eps: float, out: Tensor | None = None) -> Tensor:
    """RMSNorm over the last dim (all heads together), float32 statistics, cast back to x.dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return _write(y.to(x.dtype), out)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs `(x[2i], x[2i+1])` of `[B, L, H, Dh]` by `[L, Dh/2]` cos/sin tables."""
    xe, xo = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    return torch.stack([xe * c - xo * s, xe * s + xo * c], dim=-1).flatten(-2)


@register_reference("qk_norm_rope")
def qk_norm_rope(
    q: Tensor,
    k: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    cos: Tensor,
    sin: Tensor,
    heads: int,
    eps: float,
    key_scale: Tensor | None,
    n_hist: int,
) -> tuple[Tensor, Tensor]:
    """The compressed-context attention prologue: Q/K RMSNorm across heads, 3-axis RoPE, history-key scale.

    q, k: `[B, L, H*Dh]` (projection outputs); cos, sin: `[L, Dh/2]` float32 (one value per rotated pair,
    pooled for history tokens); key_scale: `[H]` float32 multiplier for the keys of the first `n_hist`
    tokens, or None. Returns q, k as `[B, L, H, Dh]` in q.dtype.
    """
    qn = rmsnorm(q, q_weight, eps).unflatten(-1, (heads, -1))
    kn = rmsnorm(k, k_weight, eps).unflatten(-1, (heads, -1))
    qr = _rope(qn, cos, sin)
    kr = _rope(kn, cos, sin)
    if key_scale is not None and n_hist > 0:
        scale = torch.ones(kr.shape[1], heads, device=kr.device, dtype=torch.float32)
        scale[:n_hist] = key_scale.float()
        kr = kr * scale[None, :, :, None]
    return qr.to(q.dtype), kr.to(q.dtype)


ATTENTION_SCRATCH_BYTES = 64 << 20  # the float32 score tile of one query chunk


@register_reference("attention")
def attention(q: Tensor, k: Tensor, v: Tensor, out: Tensor | None = None) -> Tensor:
    """Full bidirectional softmax attention, scale 1/sqrt(Dh), with float32 scores.

    q: `[B, Lq, H, Dh]`; k, v: `[B, Lk, H, Dh]`; returns `[B, Lq, H, Dh]` in q.dtype (into `out`).
    Written as `bmm` / `softmax` per batch row and in query chunks (a score tile of at most
    ATTENTION_SCRATCH_BYTES), not as `F.scaled_dot_product_attention`: every op then has an out=
    form, so the memory planner plans the reference path like the kernels, and the planned chunk
    and the eager one run the same arithmetic (bit-equal results).
    """
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    b, lq, h, d = q.shape
    lk = k.shape[1]
    rows = max(1, min(lq, ATTENTION_SCRATCH_BYTES // (4 * h * max(lk, 1))))
    scale = 1.0 / math.sqrt(d)
    for i in range(b):
        kt = k[i].float().permute(1, 2, 0)  # [H, Dh, Lk]
        vh = v[i].float().transpose(0, 1)  # [H, Lk, Dh]
        for r in range(0, lq, rows):
            qc = q[i, r : r + rows].float().transpose(0, 1)  # [H, n, Dh]
            scores = torch.bmm(qc, kt)
            scores.mul_(scale)
            probs = torch._softmax(scores, -1, False)
            out[i, r : r + rows].copy_(torch.bmm(probs, vh).transpose(0, 1))
    return out


@register_reference("gelu_tanh")
def gelu_tanh(x: Tensor, out: Tensor | None = None) -> Tensor:
    return _write(F.gelu(x, approximate="tanh"), out)


@register_reference("linear_gelu_tanh")
def linear_gelu_tanh(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor | None = None) -> Tensor:
    """The FFN's up projection and its tanh-GELU: `gelu_tanh(x @ weight.T + bias)`, the projection rounded
    to x.dtype before the GELU (as nn.Linear then F.gelu run it in the Helios reference).

    x: `[B, L, D]`; weight: `[H, D]`; bias: `[H]`; returns `[B, L, H]` in x.dtype. One op so that a fast
    table can apply the GELU in the GEMM's epilogue and never write the projection to memory.
    """
    return gelu_tanh(F.linear(x, weight, bias), out)


def attention_flops(b: int, lq: int, lk: int, heads: int, head_dim: int) -> int:
    """FLOPs of the attention core (QK^T and PV), for cost models and benchmarks."""
    return 4 * b * lq * lk * heads * head_dim


def softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
