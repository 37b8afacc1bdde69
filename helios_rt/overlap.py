"""Two lanes of work per chunk, compute and decode, ordered by marks instead of device-wide syncs.

A stream computes chunk k (transformer, the compute lane) and then decodes it (VAE, the decode lane).
On CUDA the lanes are two CUDA streams and the marks are events: the decode of chunk k waits for the
event that ends chunk k's compute, the compute that reuses chunk k's latent slot waits for the event
that ends chunk k's decode, and the host waits only for the decode event of the chunk it hands over.
So while the host waits for chunk k's frames, the GPU already runs chunk k+1.

On a CPU there is one thread: `HostLanes` runs both lanes in call order and its marks are clock
readings. The scheduling code in `engine.Stream` is the same for both, which is what lets the CPU
tests check the order of launches, decodes and hand-overs.

`device_scope(device)` makes `device` the current CUDA device for the work it encloses: streams,
events, graph captures and kernels that use "the current device" land on the engine's device, even
when the caller's current device is another one (an engine on cuda:1 in a process at cuda:0).
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal, Protocol

import torch

Lane = Literal["compute", "decode"]


def device_scope(device: torch.device) -> AbstractContextManager[Any]:
    """`torch.cuda.device(device)` on a CUDA device, nothing elsewhere (the CPU has no current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


class Lanes(Protocol):
    overlapped: bool  # whether chunk k+1 is launched before chunk k is handed over

    def on(self, lane: Lane) -> AbstractContextManager[Any]:
        """Run the enclosed work on `lane`."""

    def mark(self, lane: Lane) -> Any:
        """A point on `lane` after everything issued to it so far."""

    def wait(self, lane: Lane, mark: Any) -> None:
        """Make later work on `lane` wait for `mark` (no host wait)."""

    def host_wait(self, mark: Any) -> None:
        """Block the host until `mark` is reached."""

    def reached(self, mark: Any) -> bool:
        """Whether `mark` is reached, without blocking (for waits that must give up after a timeout)."""

    def used_on(self, lane: Lane, tensor: Any) -> None:
        """`tensor`, allocated on another lane, is read on `lane`: its memory must outlive that use."""

    def seconds(self, start: Any, end: Any) -> float:
        """Time between two reached marks."""


class HostLanes:
    """Both lanes on the calling thread: nothing overlaps and every mark is already reached."""

    overlapped = False

    def on(self, lane: Lane) -> AbstractContextManager[Any]:
        return nullcontext()

    def mark(self, lane: Lane) -> float:
        return time.perf_counter()

    def wait(self, lane: Lane, mark: float) -> None:
        pass

    def host_wait(self, mark: float) -> None:
        pass

    def reached(self, mark: float) -> bool:
        return True

    def used_on(self, lane: Lane, tensor: Any) -> None:
        pass

    def seconds(self, start: float, end: float) -> float:
        return end - start


class CudaLanes:
    """Compute on the device's current stream, decode on a stream of its own; marks are timed events.

    overlapped: launch chunk k+1 before handing chunk k over (False still decodes on the side stream
    but lets the host wait for each chunk before the next starts).
    """

    def __init__(self, device: torch.device | str, overlapped: bool = True) -> None:
        self.device = torch.device(device)
        self.overlapped = overlapped
        with device_scope(self.device):
            self.compute = torch.cuda.current_stream(self.device)
            self.decode = torch.cuda.Stream(self.device)

    def _stream(self, lane: Lane) -> torch.cuda.Stream:
        return self.compute if lane == "compute" else self.decode

    def on(self, lane: Lane) -> AbstractContextManager[Any]:
        return torch.cuda.stream(self._stream(lane))

    def mark(self, lane: Lane) -> torch.cuda.Event:
        with device_scope(self.device):  # an event belongs to the device current at its first record
            event = torch.cuda.Event(enable_timing=True)
            event.record(self._stream(lane))
        return event

    def wait(self, lane: Lane, mark: torch.cuda.Event) -> None:
        self._stream(lane).wait_event(mark)

    def host_wait(self, mark: torch.cuda.Event) -> None:
        mark.synchronize()

    def reached(self, mark: torch.cuda.Event) -> bool:
        return mark.query()

    def used_on(self, lane: Lane, tensor: torch.Tensor) -> None:
        # the caching allocator would otherwise hand the block out again as soon as it is freed on its
        # own stream, while this lane may still be reading it (e.g. a stream closed mid-decode)
        tensor.record_stream(self._stream(lane))

    def seconds(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return start.elapsed_time(end) / 1000.0


def lanes_for(device: torch.device, overlapped: bool) -> Lanes:
    """`CudaLanes` on a CUDA device, else `HostLanes` (which cannot overlap: refuse to pretend)."""
    if device.type == "cuda":
        return CudaLanes(device, overlapped)
    if overlapped:
        raise ValueError(f"overlapping decode with compute needs a CUDA device, not {device}")
    return HostLanes()


__all__ = ["CudaLanes", "HostLanes", "Lane", "Lanes", "device_scope", "lanes_for"]
