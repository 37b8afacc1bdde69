"""The process group of a parallel generation and its `cfg x sequence` mesh.

helios_rt runs on PyTorch's own distributed runtime (NCCL between GPUs, gloo between CPU processes).
Under `torchrun` the group is made here from its environment (RANK, WORLD_SIZE, MASTER_ADDR, ...);
an application that made its own group (`torch.distributed.init_process_group`) keeps it.
Every collective goes through `collective()`, so that a dead, stopped or timed-out peer surfaces as
one `ParallelError` naming this rank and the exchange that failed, never as a hang. Collectives
inside a replayed CUDA graph are not seen by NCCL's watchdog (captured work is never queued to it),
so the host waits on a chunk's GPU work through `wait_within`, which gives up after the same timeout.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import GenerationError
from .config import ParallelConfig


class ParallelError(GenerationError):
    """A collective failed: another rank died, was stopped, or did not answer within the timeout."""


@dataclass(frozen=True)
class Mesh:
    """This rank's place in the `cfg x sequence` mesh and the groups it exchanges over."""

    rank: int
    world: int
    cfg: int  # CFG halves (1 or 2)
    sequence: int  # sequence shards per CFG half
    sequence_group: object | None  # the ranks of this rank's CFG half (None when sequence == 1)
    timeout_s: float

    @property
    def cfg_index(self) -> int:
        return self.rank // self.sequence

    @property
    def sequence_index(self) -> int:
        return self.rank % self.sequence

    @property
    def is_output_rank(self) -> bool:
        """Rank 0 decodes, writes and takes the prompts; the others only compute."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True in a process that torchrun (or any launcher with its environment) started for N > 1 ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_device(device: str) -> str:
    """The device of this rank: `cuda` and `auto` become `cuda:LOCAL_RANK` (one GPU per process)."""
    if device in ("cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def setup_mesh(config: ParallelConfig, heads: int, uses_cfg: bool, device: torch.device) -> Mesh:
    """Join (or make, under torchrun) the process group and build this rank's mesh."""
    if not dist.is_available():
        raise ParallelError("this torch build has no torch.distributed; install a build with it for parallel runs")
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise ParallelError(
                "EngineConfig(parallel=...) needs a process group: launch with `torchrun --nproc-per-node N "
                "-m helios_rt ...`, or call torch.distributed.init_process_group() before loading the engine"
            )
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=config.timeout_s))
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg, sequence = config.resolve(world, heads, uses_cfg)
    group = None
    if sequence > 1:
        # every rank creates every subgroup, in the same order (a torch.distributed rule)
        for half in range(cfg):
            ranks = list(range(half * sequence, (half + 1) * sequence))
            made = dist.new_group(ranks, timeout=datetime.timedelta(seconds=config.timeout_s))
            if rank in ranks:
                group = made
    return Mesh(rank, world, cfg, sequence, group, config.timeout_s)


@contextlib.contextmanager
def collective(mesh: Mesh, what: str) -> Iterator[None]:
    """Name the exchange and this rank when a collective fails (the peers' errors say little)."""
    try:
        yield
    except RuntimeError as err:  # DistBackendError and gloo's transport errors are RuntimeErrors
        if isinstance(err, ParallelError):
            raise
        raise ParallelError(
            f"rank {mesh.rank} of {mesh.world}: the {what} failed ({_first_line(err)}); another rank died, "
            f"was stopped or did not answer within {mesh.timeout_s:g} s: see its log; every rank stops here"
        ) from err


def wait_within(
    mesh: Mesh,
    reached: Callable[[], bool],
    what: str,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Poll `reached()` until it is true; after `mesh.timeout_s` raise `ParallelError` naming `what`.

    A replayed chunk graph runs its all-to-alls and all-gather without a host call, so a peer that
    died leaves this rank's GPU waiting inside the graph with no watchdog to end it: the host must
    not block on it unboundedly (an event's `synchronize()` would). The poll sleeps 0.2 ms, a small
    fraction of a chunk. `sleep` and `clock` are for tests.
    """
    deadline = clock() + mesh.timeout_s
    while not reached():
        if clock() >= deadline:
            raise ParallelError(
                f"rank {mesh.rank} of {mesh.world}: {what} did not finish within {mesh.timeout_s:g} s (its collectives "
                "run inside a CUDA graph); another rank died, was stopped or did not answer: see its log; every rank "
                "stops here, and this process must exit (its GPU still waits inside the graph)"
            )
        sleep(2e-4)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__
