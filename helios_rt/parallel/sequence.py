"""Ulysses sequence parallelism: each rank holds a slice of the tokens; heads are traded for tokens
around the self-attention.

The sequence is `[history | noisy]`. A rank holds a contiguous slice of the history AND a contiguous
slice of the noisy tokens, as `[hist_r | noisy_r]`: every per-token op then sees the two-segment
layout it knows (`n_hist` = the rank's history count), and every rank gets the same share of the
noisy-only work (cross-attention, output norm) and of the output. Around the self-attention one
all-to-all turns `[tokens_r, all heads]` into `[all tokens, heads_r]` (Q, K and V in one exchange),
the tokens are put back in the global order, and a second all-to-all returns the output. RoPE,
the history-key scale and the Q/K norms (across all heads, per token) are applied before the
exchange, on the rank's own tokens.

Every buffer is made with `torch.empty` and filled with `copy_` or by a collective writing into it,
so the compiled chunk's planner places them in its arena (the collectives are dispatcher ops that
write into their output argument: `c10d.alltoall_base_`, `c10d._allgather_base_`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

Tensor = torch.Tensor


def _split(n: int, parts: int) -> tuple[tuple[int, int], ...]:
    """`parts` contiguous ranges covering `range(n)`, sizes differing by at most one (larger first)."""
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (i < extra)
        bounds.append((start, stop))
        start = stop
    return tuple(bounds)


@dataclass(frozen=True)
class TokenShards:
    """How `n_hist` history and `n_noisy` noisy tokens are split over `ranks` ranks.

    hist[r], noisy[r]: rank r's range in each segment (noisy ranges count from the first noisy token).
    """

    n_hist: int
    n_noisy: int
    ranks: int
    hist: tuple[tuple[int, int], ...]
    noisy: tuple[tuple[int, int], ...]

    @property
    def lengths(self) -> list[int]:
        """Tokens per rank, `[hist_r | noisy_r]`."""
        return [(h1 - h0) + (n1 - n0) for (h0, h1), (n0, n1) in zip(self.hist, self.noisy, strict=True)]

    def pieces(self) -> list[tuple[slice, slice]]:
        """(rank-major position, global position) of every rank's history and noisy piece."""
        out, at = [], 0
        for (h0, h1), (n0, n1) in zip(self.hist, self.noisy, strict=True):
            out.append((slice(at, at + h1 - h0), slice(h0, h1)))
            at += h1 - h0
            out.append((slice(at, at + n1 - n0), slice(self.n_hist + n0, self.n_hist + n1)))
            at += n1 - n0
        return [(src, dst) for src, dst in out if src.stop > src.start]


@cache
def token_shards(n_hist: int, n_noisy: int, ranks: int) -> TokenShards:
    """The shards of one stage's sequence; a rank must hold at least one noisy token."""
    if n_noisy < ranks:
        raise ValueError(
            f"sequence parallelism over {ranks} ranks needs at least {ranks} noisy tokens per forward, this "
            f"stage has {n_noisy}: use fewer sequence ranks or a larger resolution"
        )
    return TokenShards(n_hist, n_noisy, ranks, _split(n_hist, ranks), _split(n_noisy, ranks))


def local_tokens(x: Tensor, shards: TokenShards, rank: int) -> Tensor:
    """Rank `rank`'s `[hist_r | noisy_r]` rows of `x` `[..., L, ...]` along dim -2 (tokens) or 0 (tables)."""
    (h0, h1), (n0, n1) = shards.hist[rank], shards.noisy[rank]
    dim = 1 if x.dim() == 3 else 0
    n = shards.n_hist
    return torch.cat([x.narrow(dim, h0, h1 - h0), x.narrow(dim, n + n0, n1 - n0)], dim=dim)


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, shards: TokenShards, all_to_all, attend) -> Tensor:
    """Self-attention of the whole sequence from this rank's tokens: `[B, L_r, H, Dh]` in and out.

    all_to_all(out, inp, out_splits, in_splits): the exchange over this rank's sequence group (dim 0);
    attend(q, k, v) -> `[B, L, H/ranks, Dh]` is the op table's attention over the global sequence.
    """
    ranks = shards.ranks
    b, lr, heads, dh = q.shape
    hw = heads // ranks
    total = sum(shards.lengths)
    like = dict(dtype=q.dtype, device=q.device)
    send = torch.empty((ranks, lr, 3, b, hw, dh), **like)
    for i, t in enumerate((q, k, v)):  # destination rank j gets its heads of every local token
        send[:, :, i].copy_(t.unflatten(2, (ranks, hw)).permute(2, 1, 0, 3, 4))
    recv = torch.empty((total, 3, b, hw, dh), **like)  # rank-major: [hist_0 | noisy_0 | hist_1 | ...]
    all_to_all(recv, send.view(ranks * lr, 3, b, hw, dh), shards.lengths, [lr] * ranks)
    qkv = torch.empty((3, b, total, hw, dh), **like)  # the global token order
    for src, dst in shards.pieces():
        qkv[:, :, dst].copy_(recv[src].permute(1, 2, 0, 3, 4))
    o = attend(qkv[0], qkv[1], qkv[2])
    back = torch.empty((total, b, hw, dh), **like)
    for src, dst in shards.pieces():
        back[src].copy_(o[:, dst].permute(1, 0, 2, 3))
    mine = torch.empty((ranks * lr, b, hw, dh), **like)
    all_to_all(mine, back, [lr] * ranks, shards.lengths)
    out = torch.empty((b, lr, heads, dh), **like)
    out.unflatten(2, (ranks, hw)).copy_(mine.view(ranks, lr, b, hw, dh).permute(2, 1, 0, 3, 4))
    return out
