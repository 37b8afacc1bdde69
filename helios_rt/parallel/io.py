"""What only rank 0 does for a parallel generation: take the prompts, decode, write.

Every rank runs the same stream (same seed, inputs and chunk loop), so each draws the same noise
and keeps the same history. Prompts are the exception an application meets: `set_prompt` is called
where the user is, on rank 0, so each chunk rank 0's current embedding (and the negative one) is
broadcast to the others; what the other ranks were given is ignored.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .group import Mesh, collective

Tensor = torch.Tensor


def prompt_from_rank0(
    mesh: Mesh, fresh: bool, embeds: Tensor, uncond: Tensor | None
) -> tuple[bool, Tensor, Tensor | None]:
    """(fresh, embeds, uncond) as rank 0 has them; the embeddings are sent only when they changed."""
    device = embeds.device
    header = torch.tensor(
        [int(fresh), embeds.shape[1], -1 if uncond is None else uncond.shape[1]], dtype=torch.int64, device=device
    )
    with collective(mesh, "prompt broadcast from rank 0"):
        dist.broadcast(header, src=0)
        fresh, n_cond, n_uncond = (int(v) for v in header.tolist())
        if not fresh:
            return False, embeds, uncond
        dim = embeds.shape[-1]
        embeds = _broadcast(mesh, embeds, n_cond, dim)
        uncond = None if n_uncond < 0 else _broadcast(mesh, uncond, n_uncond, dim)
    return True, embeds, uncond


def _broadcast(mesh: Mesh, value: Tensor | None, length: int, dim: int) -> Tensor:
    """Rank 0's `[1, length, dim]` float32 embedding on every rank (`value`: this rank's, or None)."""
    if mesh.rank == 0:
        buf = value.float().contiguous()
    else:
        buf = torch.empty((1, length, dim), dtype=torch.float32, device=mesh_device(value))
    dist.broadcast(buf, src=0)
    return buf


def mesh_device(value: Tensor | None) -> torch.device:
    """Where the broadcast buffers live: the embeddings' device (NCCL needs them on the GPU)."""
    if value is not None:
        return value.device
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def no_frames(height: int, width: int, device: torch.device) -> Tensor:
    """The frames a rank other than 0 hands over: none (`[0, H, W, 3]` uint8); rank 0 decodes."""
    return torch.empty((0, height, width, 3), dtype=torch.uint8, device=device)
