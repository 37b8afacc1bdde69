"""The transformer's view of a parallel run: split the CFG batch, shard the tokens, gather the output.

`HeliosTransformer.forward` calls these hooks when `model.parallel` is set; every rank then hands
the sampler the whole prediction (all noisy tokens, both CFG halves), so the sampler, the history,
the random draws and the CFG combine run unchanged, and identically, on every rank: results depend
on the world size only through float rounding.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..model.transformer import TextContext
from .group import Mesh, collective
from .sequence import TokenShards, local_tokens, token_shards, ulysses_attention

Tensor = torch.Tensor


# torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single; the floor is older
_ALL_GATHER = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)


class TorchCollectives:
    """torch.distributed's collectives (NCCL, gloo), writing into outputs the caller made."""

    def all_to_all(self, out: Tensor, inp: Tensor, out_splits: list[int], in_splits: list[int], group) -> None:
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)

    def all_gather(self, out: Tensor, inp: Tensor) -> None:
        _ALL_GATHER(out, inp)


class ParallelForward:
    """Hooks of one model on one rank. One forward at a time: `shard_tokens` records the shards that
    the blocks' attention and `gather` of the same forward use.

    collectives: torch.distributed's by default; the cost model passes one that counts bytes instead.
    """

    def __init__(self, mesh: Mesh, collectives=None) -> None:
        self.mesh = mesh
        self.collectives = collectives if collectives is not None else TorchCollectives()
        self._shards: TokenShards | None = None

    def split_batch(
        self, x: Tensor, temb: Tensor, mod: Tensor, text: TextContext
    ) -> tuple[Tensor, Tensor, Tensor, TextContext]:
        """This rank's half of a `[cond; uncond]` batch (with cfg=2): tokens, embeddings, text K/V.

        The split comes after the patch and timestep embeddings, which every rank computes for the
        whole batch (a small part of a forward): a batch of one rounds them differently from the
        batch of two the one-process engine runs, and guidance would amplify that difference.
        """
        if self.mesh.cfg == 1:
            return x, temb, mod, text
        b = x.shape[0]
        if b % 2:
            raise ValueError(f"CFG parallelism splits a [cond; uncond] batch, got an odd batch of {b}")
        rows = slice(self.mesh.cfg_index * b // 2, (self.mesh.cfg_index + 1) * b // 2)
        lengths = None if text.lengths is None else text.lengths[rows]
        half = TextContext([k[rows] for k in text.keys], [v[rows] for v in text.values], lengths)
        return x[rows], temb[rows], mod[rows], half

    def shard_tokens(self, x: Tensor, rope: tuple[Tensor, Tensor], n_hist: int) -> tuple[Tensor, tuple, int]:
        """This rank's tokens `[B, L_r, D]`, their RoPE rows, and how many of them are history."""
        self._shards = token_shards(n_hist, x.shape[1] - n_hist, self.mesh.sequence)
        if self.mesh.sequence == 1:
            return x, rope, n_hist
        r = self.mesh.sequence_index
        h0, h1 = self._shards.hist[r]
        cos, sin = (local_tokens(t, self._shards, r) for t in rope)
        return local_tokens(x, self._shards, r), (cos, sin), h1 - h0

    def attention(self, q: Tensor, k: Tensor, v: Tensor, attend) -> Tensor:
        """The self-attention core over the global sequence (`attend` is the op table's attention)."""
        if self.mesh.sequence == 1:
            return attend(q, k, v)
        return ulysses_attention(q, k, v, self._shards, self._all_to_all, attend)

    def _all_to_all(self, out: Tensor, inp: Tensor, out_splits: list[int], in_splits: list[int]) -> None:
        with collective(self.mesh, "self-attention all-to-all"):  # only the exchange: an op error stays itself
            self.collectives.all_to_all(out, inp, out_splits, in_splits, self.mesh.sequence_group)

    def gather(self, out: Tensor) -> Tensor:
        """Every rank's noisy-token output `[b, n_r, C]` -> the whole `[b * cfg, N, C]` on every rank."""
        shards, mesh = self._shards, self.mesh
        b, n_r, c = out.shape
        most = max(n1 - n0 for n0, n1 in shards.noisy)
        send = torch.empty((b, most, c), dtype=out.dtype, device=out.device)
        send[:, :n_r].copy_(out)  # rows past n_r are padding, never read
        recv = torch.empty((mesh.world * b, most, c), dtype=out.dtype, device=out.device)
        with collective(self.mesh, "output all-gather"):
            self.collectives.all_gather(recv, send)
        recv = recv.view(mesh.world, b, most, c)
        full = torch.empty((b * mesh.cfg, shards.n_noisy, c), dtype=out.dtype, device=out.device)
        for rank in range(mesh.world):
            half, (n0, n1) = rank // mesh.sequence, shards.noisy[rank % mesh.sequence]
            full[half * b : (half + 1) * b, n0:n1].copy_(recv[rank, :, : n1 - n0])
        return full
