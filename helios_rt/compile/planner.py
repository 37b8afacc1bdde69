"""Static memory plan: one arena offset per intermediate buffer, from the buffers' lifetimes.

Planning mode (`workspace.plan_program`) records every intermediate buffer of a chunk kind's body as
a `BufferRequest` (its size and the first and last step that use it, both inclusive); `plan_memory`
places them in one arena with the C++ planner (`helios_rt._planner`, built from csrc/planner/) so
that buffers live at the same step never share bytes. Execution then hands out views of the arena
at `plan.offsets[buffer_id]`.
"""

from __future__ import annotations

import bisect
import importlib
from collections.abc import Iterable
from dataclasses import dataclass, field

DEFAULT_ALIGNMENT = 256
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class BufferRequest:
    """A buffer of `nbytes` bytes, live from step `first` to step `last` (both inclusive)."""

    id: int
    nbytes: int
    first: int
    last: int

    def __post_init__(self) -> None:
        for name in ("id", "nbytes", "first", "last"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"buffer id {self.id!r}: {name} must be an int, got {value!r}")
            if not _INT64_MIN <= value <= _INT64_MAX:
                raise ValueError(f"buffer id {self.id}: {name}={value} does not fit in int64")
        if self.nbytes < 0:
            raise ValueError(f"buffer id {self.id}: nbytes={self.nbytes} is negative")
        if self.first > self.last:
            raise ValueError(f"buffer id {self.id}: first use step {self.first} is after last use step {self.last}")


@dataclass(frozen=True)
class MemoryPlan:
    """Where each buffer lives in one arena of `arena_bytes` bytes.

    `offsets` maps a buffer id to its offset (a multiple of `alignment`); `lower_bound_bytes` is
    the most aligned bytes live at any one step, which no plan can beat; `strategy` names the
    placement order that won.
    """

    requests: tuple[BufferRequest, ...]
    offsets: dict[int, int] = field(hash=False)  # read-only by convention
    arena_bytes: int
    lower_bound_bytes: int
    alignment: int
    strategy: str = ""

    @property
    def ratio(self) -> float:
        """arena / lower bound: 1.0 is optimal (an empty plan counts as optimal)."""
        return self.arena_bytes / self.lower_bound_bytes if self.lower_bound_bytes else 1.0

    def check(self) -> None:
        """Verify the plan in Python, independently of the C++ planner.

        Raises AssertionError naming the buffers when an offset is missing or misaligned, a buffer
        runs past the arena, two buffers live at the same step share bytes, or the lower bound is
        wrong. A sweep over steps, O(n log n): debug mode can afford it on large plans.
        """
        ids = [r.id for r in self.requests]
        if len(set(ids)) != len(ids) or set(ids) != set(self.offsets):
            raise AssertionError("plan offsets do not cover exactly the requested buffer ids")
        for r in self.requests:
            offset, end = self._span(r)
            if offset < 0 or offset % self.alignment:
                raise AssertionError(f"buffer id {r.id}: offset {offset} is not {self.alignment}-aligned")
            if end > self.arena_bytes:
                raise AssertionError(f"buffer id {r.id}: [{offset}, {end}) exceeds the arena")
        peak = self._sweep_for_overlaps()
        if peak != self.lower_bound_bytes:
            raise AssertionError(f"lower bound {self.lower_bound_bytes} != recomputed peak {peak}")

    def _span(self, r: BufferRequest) -> tuple[int, int]:
        offset = self.offsets[r.id]
        return offset, offset + -(-r.nbytes // self.alignment) * self.alignment

    def _sweep_for_overlaps(self) -> int:
        """Walk the steps keeping the live buffers sorted by offset; return the peak live bytes."""
        events = [(r.first, 1, r.id, r) for r in self.requests]  # 1: starts at this step
        events += [(r.last + 1, 0, r.id, r) for r in self.requests]  # 0: ended before this step
        events.sort(key=lambda e: e[:3])
        starts: list[int] = []  # offsets of the live non-empty buffers: disjoint, so unique
        live: list[BufferRequest] = []
        live_bytes = peak = 0
        for _, starting, _, r in events:
            offset, end = self._span(r)
            live_bytes += (end - offset) if starting else -(end - offset)
            peak = max(peak, live_bytes)
            if end == offset:
                continue
            k = bisect.bisect_left(starts, offset)
            if not starting:
                del starts[k], live[k]
                continue
            for other in live[max(k - 1, 0) : k + 1]:  # the neighbours below and above
                o, e = self._span(other)
                if o < end and offset < e:
                    raise AssertionError(
                        f"buffers id {other.id} [{o}, {e}) and id {r.id} [{offset}, {end}) "
                        "are live at the same step and overlap in memory"
                    )
            starts.insert(k, offset)
            live.insert(k, r)
        return peak


def _extension():
    try:
        return importlib.import_module("helios_rt._planner")
    except ImportError as e:
        raise ImportError(
            "helios_rt._planner is not built: reinstall with `pip install -e .` (offline: `pip install --no-deps "
            "--no-build-isolation -e .`) on a machine with a C++17 compiler and Python.h "
            "(`apt-get install g++ python3-dev`)"
        ) from e


def plan_memory(requests: Iterable[BufferRequest], alignment: int = DEFAULT_ALIGNMENT) -> MemoryPlan:
    """Place `requests` in one arena; every size is rounded up to `alignment` (a power of two).

    Deterministic: the same requests give the same plan. Raises ValueError naming the buffer id on
    a duplicate id (and, from BufferRequest, on a negative size or first > last).
    """
    requests = tuple(requests)
    for r in requests:
        if not isinstance(r, BufferRequest):
            raise TypeError(f"plan_memory takes BufferRequest objects, got {type(r).__name__}")
    ids = [r.id for r in requests]
    result = _extension().plan(
        ids,
        [r.nbytes for r in requests],
        [r.first for r in requests],
        [r.last for r in requests],
        alignment,
    )
    return MemoryPlan(
        requests=requests,
        offsets=dict(zip(ids, result.offsets, strict=True)),
        arena_bytes=result.arena_bytes,
        lower_bound_bytes=result.lower_bound_bytes,
        alignment=result.alignment,
        strategy=result.strategy,
    )
