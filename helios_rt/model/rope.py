"""3-axis RoPE tables for the Helios token layout, computed once per shape.

Each token gets one rotation angle per rotated pair of channels: the head is split into
`rope_dim = (t, y, x)` channel groups, each rotated by its axis position. History tokens live on
coarser grids (mid: 2x, long: 4x in every axis), so their tables are the fine-grid tables
average-pooled over the patch (after replicate padding): an average of cosines, not the cosine of
an average, which is what the released weights were trained with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def axis_frequencies(dim: int, theta: float) -> Tensor:
    """Inverse frequencies of one axis: `dim / 2` values, float32."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32)[: dim // 2] / dim
    return 1.0 / (theta**exponents)


def grid_angles(frames: Tensor, height: int, width: int, rope_dim: tuple[int, int, int], theta: float) -> Tensor:
    """Angles `[Dh/2, T, H, W]` (channel-first, for pooling) of a (frame, row, column) grid.

    frames: `[T]` absolute frame indices; rows and columns count from 0 on the token grid.
    """
    t = frames.to(torch.float32)
    y = torch.arange(height, dtype=torch.float32)
    x = torch.arange(width, dtype=torch.float32)
    n_t, n_y, n_x = len(t), height, width
    ft, fy, fx = (axis_frequencies(d, theta) for d in rope_dim)
    at = (ft[:, None] * t[None, :])[:, :, None, None].expand(-1, n_t, n_y, n_x)
    ay = (fy[:, None] * y[None, :])[:, None, :, None].expand(-1, n_t, n_y, n_x)
    ax = (fx[:, None] * x[None, :])[:, None, None, :].expand(-1, n_t, n_y, n_x)
    return torch.cat([at, ay, ax], dim=0)


def _replicate_pad(x: Tensor, multiple: int) -> Tensor:
    """Pad `[C, T, H, W]` at the end of T, H, W to a multiple by repeating the last entry."""
    _, t, h, w = x.shape
    pads = [(multiple - s % multiple) % multiple for s in (w, h, t)]
    return F.pad(x[None], (0, pads[0], 0, pads[1], 0, pads[2]), mode="replicate")[0]


def segment_tables(
    frames: Tensor, height: int, width: int, pool: int, rope_dim: tuple[int, int, int], theta: float
) -> tuple[Tensor, Tensor]:
    """cos, sin `[L, Dh/2]` for one segment of tokens in (t, h, w) raster order.

    `height`/`width` are the fine token grid (the short-history grid for history segments);
    `pool` is 1 for noisy and short tokens, 2 for mid and 4 for long.
    """
    angles = grid_angles(frames, height, width, rope_dim, theta)
    cos, sin = angles.cos(), angles.sin()
    if pool > 1:
        cos = F.avg_pool3d(_replicate_pad(cos, pool)[None], pool, stride=pool)[0]
        sin = F.avg_pool3d(_replicate_pad(sin, pool)[None], pool, stride=pool)[0]
    return cos.flatten(1).t().contiguous(), sin.flatten(1).t().contiguous()
