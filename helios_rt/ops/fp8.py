"""References of the FP8 quantising ops: each is the op that produces a block linear's input,
followed by per-token e4m3 quantisation (`helios_rt.fp8.format.quantize_rows`).

The quantised value is the float32 result of the producing op, not its model-dtype rounding: a fused
kernel quantises straight from its registers, and the reference defines that. Each returns
(e4m3 `[B, L, D]`, float32 scales `[B, L, 1]`); `out=` takes that pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..fp8.format import quantize_rows
from . import reference
from .registry import register_reference

Tensor = torch.Tensor
QuantPair = tuple[Tensor, Tensor]


def _write_pair(result: QuantPair, out: QuantPair | None) -> QuantPair:
    if out is None:
        return result
    out[0].copy_(result[0])
    out[1].copy_(result[1])
    return out


@register_reference("fp8_quantize_rows")
def fp8_quantize_rows(x: Tensor, out: QuantPair | None = None) -> QuantPair:
    """Per-token quantisation of `[B, L, D]` (the attention output before `to_out`)."""
    return _write_pair(quantize_rows(x), out)


@register_reference("modulate_layernorm_fp8")
def modulate_layernorm_fp8(
    x: Tensor, shift: Tensor, scale: Tensor, n_hist: int, eps: float, out: QuantPair | None = None
) -> QuantPair:
    """`modulate_layernorm` (same arguments) quantised per token from its float32 value."""
    y = reference.modulate_layernorm(x.float(), shift, scale, n_hist, eps)
    return _write_pair(quantize_rows(y), out)


@register_reference("gelu_tanh_fp8")
def gelu_tanh_fp8(x: Tensor, out: QuantPair | None = None) -> QuantPair:
    """tanh-GELU of the FFN's up projection `[B, L, F]`, quantised per token from its float32 value."""
    return _write_pair(quantize_rows(F.gelu(x.float(), approximate="tanh")), out)
