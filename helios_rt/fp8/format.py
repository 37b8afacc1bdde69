"""The e4m3 format and the quantisation math every FP8 path shares (the spec of the kernels).

e4m3 (`torch.float8_e4m3fn`) keeps 3 mantissa bits: a value in the normal range [2^-6, 448] is
rounded to within half a spacing, a relative error of at most `UNIT_ROUNDOFF` = 2^-4; below 2^-6 the
spacing is the fixed 2^-9 (subnormals), an absolute error of at most `SUBNORMAL_HALF_SPACING` = 2^-10.
A tensor is mapped onto that range by a float32 scale: `q = round(x / s)`, `x ~ q * s`, with
`s = amax / 448` so that the largest magnitude of the group lands on the format's largest value.

Groups: weights per output channel (one scale per row of `[N, K]`), activations per token (one scale
per row of `[M, K]`), or per 128-wide block of a token (`quantize_blocks`, measured by the gate bench).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = 448.0
UNIT_ROUNDOFF = 2.0**-4  # half the relative spacing of 3 mantissa bits
SUBNORMAL_HALF_SPACING = 2.0**-10  # half the spacing 2^-9 below the smallest normal 2^-6
# amax below this (an all-zero row) gets this scale: the row quantises to zeros, never to NaN
AMAX_FLOOR = 1e-12
BLOCK = 128


def rounding_bound(x: Tensor, scale: Tensor) -> Tensor:
    """Largest |x - dequant(quant(x))| round-to-nearest allows: half a spacing at each value, float32."""
    return UNIT_ROUNDOFF * x.abs().float() + SUBNORMAL_HALF_SPACING * scale.float()


def row_scales(x: Tensor) -> Tensor:
    """float32 `[..., 1]` scales mapping each row's largest magnitude onto 448."""
    amax = x.float().abs().amax(-1, keepdim=True)
    return amax.clamp_min(AMAX_FLOOR) / E4M3_MAX


def quantize_with(x: Tensor, scale: Tensor) -> Tensor:
    """`round(x / scale)` to e4m3, saturating at +-448 (the scale already keeps values inside)."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row quantisation of `[..., K]`: (e4m3 `[..., K]`, float32 scales `[..., 1]`)."""
    scale = row_scales(x)
    return quantize_with(x, scale), scale


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """A linear's `[N, K]` weight per output channel: (e4m3 `[N, K]`, float32 scales `[N]`)."""
    if weight.ndim != 2:
        raise ValueError(f"a linear weight must be [out, in], got shape {list(weight.shape)}")
    q, scale = quantize_rows(weight)
    return q, scale.squeeze(-1)


def quantize_blocks(x: Tensor, block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """Per-`block` quantisation along the last dim: (e4m3 `[..., K]`, float32 scales `[..., K/block]`)."""
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"the last dim ({k}) must be a multiple of the block size {block}")
    xb = x.unflatten(-1, (k // block, block))
    q, scale = quantize_rows(xb)
    return q.flatten(-2), scale.squeeze(-1)


def dequantize(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """`q * scale` in `dtype`; scale `[..., 1]` (per row) or `[..., K/block]` (per block)."""
    k, groups = q.shape[-1], scale.shape[-1]
    if groups == 1:
        return q.to(dtype) * scale.to(dtype)
    return (q.to(dtype).unflatten(-1, (groups, k // groups)) * scale.to(dtype)[..., None]).flatten(-2)
