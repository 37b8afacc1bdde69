"""What the gpu-marked tests check, as plain functions over plain data, so that the checks themselves are
tested on a CPU (tests/test_gpu_checks.py) before a GPU ever runs them.

- `active_blocks` / `allocator_changes`: the caching allocator's own record (`torch.cuda.memory_snapshot()`,
  a list of segments with their blocks), compared before and after a replay: a graph replay never calls
  the allocator, so a count of allocations cannot fail; the set of live blocks can, if anything outside the
  graph (a staging copy, an event, a flag) allocates per chunk.
- `outside`: byte ranges of a chunk's intermediates (`Executor(record_ranges=True)`) that lie in neither the
  planned arena nor the static state the chunk writes.
- `sync_debug_errors`: every synchronising CUDA call (`.item()`, `.cpu()`, `torch.cuda.synchronize`, an
  event or stream sync, a non-pinned copy to the host) raises while it is active.
- `timing_events`: events are CUDA events with timing, not host clocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

Block = tuple[int, int]  # (address, size)


def active_blocks(snapshot: Iterable[dict[str, Any]]) -> set[Block]:
    """Live blocks of a `torch.cuda.memory_snapshot()`: state "active_allocated" or "active_pending_free"."""
    return {
        (block["address"], block["size"])
        for segment in snapshot
        for block in segment["blocks"]
        if block["state"].startswith("active")
    }


def allocator_changes(before: Iterable[dict[str, Any]], after: Iterable[dict[str, Any]]) -> tuple[set, set]:
    """(blocks live after but not before, blocks live before but not after)."""
    a, b = active_blocks(before), active_blocks(after)
    return b - a, a - b


def pool_blocks(snapshot: Iterable[dict[str, Any]], pool_id: object) -> list[Block]:
    """Live blocks in the segments of one private memory pool (a CUDA graph's: `CUDAGraph.pool()`)."""
    return sorted(
        (block["address"], block["size"])
        for segment in snapshot
        if tuple(segment.get("segment_pool_id", ())) == tuple(pool_id or ())
        for block in segment["blocks"]
        if block["state"].startswith("active")
    )


def outside(ranges: Iterable[tuple[int, int]], allowed: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The `[start, end)` ranges that lie inside none of the `allowed` ranges."""
    allowed = list(allowed)
    return [(s, e) for s, e in ranges if not any(lo <= s and e <= hi for lo, hi in allowed)]


def tensor_range(t: torch.Tensor) -> tuple[int, int]:
    """`[start, end)` of a tensor's whole storage."""
    s = t.untyped_storage()
    return s.data_ptr(), s.data_ptr() + s.nbytes()


@contextmanager
def sync_debug_errors() -> Iterator[None]:
    """CUDA's sync debug mode set to "error" inside, the previous mode restored after."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def timing_events(events: Iterable[object]) -> list[str]:
    """What is wrong with each event that should be a timed CUDA event (empty when all are)."""
    wrong = []
    for i, event in enumerate(events):
        if not isinstance(event, torch.cuda.Event):
            wrong.append(f"event {i} is a {type(event).__name__}, not a torch.cuda.Event")
        elif not _times(event):
            wrong.append(f"event {i} was made without enable_timing (or never recorded)")
    return wrong


def _times(event: torch.cuda.Event) -> bool:
    """Whether `event` can be timed: elapsed_time fails for an event made without timing or not recorded."""
    try:
        event.elapsed_time(event)
    except RuntimeError:
        return False
    return True
