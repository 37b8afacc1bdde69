"""References of fused attention ops: compositions of the ops in `reference.py`, which stay the spec."""

from __future__ import annotations

import torch

from .reference import _write, attention, qk_norm_rope
from .registry import register_reference

Tensor = torch.Tensor


@register_reference("compressed_context_attention")
def compressed_context_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    cos: Tensor,
    sin: Tensor,
    heads: int,
    eps: float,
    key_scale: Tensor | None,
    n_hist: int,
    out: Tensor | None = None,
) -> Tensor:
    """Self-attention over `[history | noisy]` with the prologue (Q/K RMSNorm, RoPE, key scale) fused in.

    q, k: `[B, L, H*Dh]` projection outputs; v: `[B, L, H, Dh]`; the rest as `qk_norm_rope`.
    Returns `[B, L, H, Dh]` in q.dtype: exactly `attention(*qk_norm_rope(...), v)`.
    """
    qr, kr = qk_norm_rope(q, k, q_weight, k_weight, cos, sin, heads, eps, key_scale, n_hist)
    return _write(attention(qr, kr, v), out)
