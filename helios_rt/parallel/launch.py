"""`torchrun --nproc-per-node N -m helios_rt generate ...`: every rank runs the command, rank 0 writes.

torchrun starts N copies of the command with RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address
in their environment. Each loads the model on its own GPU (`cuda:LOCAL_RANK`) and runs the same
stream; rank 0 alone checks and writes the output file and prints progress, and a failure on any
rank ends every rank with an error (`ParallelError`, exit code 5) instead of a hang.
"""

from __future__ import annotations

import os

from .config import ParallelConfig
from .group import launched_by_torchrun


def torchrun_parallel() -> ParallelConfig | None:
    """The CLI's parallel layout: automatic sizes under torchrun (N > 1 ranks), None otherwise."""
    return ParallelConfig() if launched_by_torchrun() else None


def writes_output() -> bool:
    """True in the one process that writes files and prints: rank 0, or a process run alone."""
    return int(os.environ.get("RANK", "0")) == 0


def follow(stream) -> int:
    """Run a stream's chunks on a rank that writes nothing (its share of each chunk's compute)."""
    with stream:
        for _ in stream:
            pass
    return 0


def finish() -> None:
    """Leave the process group after a command that succeeded (torch warns when a group is left open)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
