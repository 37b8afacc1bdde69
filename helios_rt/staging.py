"""Moving checkpoint tensors to an accelerator through two pinned host buffers, one tensor at a time.

Why: reading a whole shard into host memory before copying it costs a shard of host RAM beyond the
weights, and pageable copies are synchronous. Here host memory is bounded by the two staging
buffers (each the size of the largest tensor), whatever the shard size: tensor i+1 is read from the
file into one buffer while tensor i's non_blocking copy out of the other runs. A buffer is reused
only after the event recorded behind its copy has completed, so a read never overwrites bytes that
the device has not taken yet.

The loop takes its event factory and its copy as arguments, so it runs (and is tested) on CPU with
unpinned buffers and a fake event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from .errors import CheckpointError


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, stored dtype and shape, and its bytes' absolute offsets in the file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int = 0
    end: int = 0

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}


def torch_dtype(info: TensorInfo) -> torch.dtype:
    """The torch dtype of a stored tensor; one this runtime cannot read is named with its file."""
    try:
        return TORCH_DTYPES[info.dtype]
    except KeyError:
        raise CheckpointError(
            f"{info.file} stores a tensor as {info.dtype}, which helios_rt cannot read; it reads {sorted(TORCH_DTYPES)}"
        ) from None


class Event(Protocol):
    """What the loop needs of a CUDA event: record behind the queued copy, and wait for it on the host."""

    def record(self) -> None: ...

    def synchronize(self) -> None: ...


class DoubleBuffer:
    """Two host byte buffers used in turn; a buffer is handed out again only once its copy's event completed."""

    def __init__(self, nbytes: int, pin: bool, make_event: Callable[[], Event]) -> None:
        size = max(nbytes, 1)
        self.buffers = [torch.empty(size, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self.events: list[Event | None] = [None, None]
        self._make_event = make_event
        self._turn = 0

    @property
    def nbytes(self) -> int:
        """Host bytes held for staging (both buffers)."""
        return sum(b.numel() for b in self.buffers)

    def take(self, nbytes: int) -> tuple[int, torch.Tensor]:
        """The next buffer's first `nbytes`, after waiting for the copy that last read from it."""
        k = self._turn
        self._turn ^= 1
        event = self.events[k]
        if event is not None:
            event.synchronize()
            self.events[k] = None
        return k, self.buffers[k][:nbytes]

    def copied(self, k: int) -> None:
        """Record an event behind the copy just queued out of buffer `k`."""
        event = self._make_event()
        event.record()
        self.events[k] = event


class FileReader:
    """Reads a tensor's bytes straight into a host buffer (no temporary), keeping each file open once."""

    def __init__(self) -> None:
        self._files: dict[Path, object] = {}

    def read_into(self, info: TensorInfo, out: torch.Tensor) -> None:
        """Fill the uint8 tensor `out` with `info`'s bytes; a short or failed read names the file."""
        try:
            fh = self._files.get(info.file)
            if fh is None:
                fh = self._files[info.file] = open(info.file, "rb", buffering=0)  # noqa: SIM115 (closed in close())
            fh.seek(info.begin)
            view = memoryview(out.numpy()).cast("B")
            done = 0
            while done < info.nbytes:
                n = fh.readinto(view[done:])
                if not n:
                    break
                done += n
        except OSError as err:
            raise CheckpointError(f"reading {info.file} failed ({err}); the file is corrupt, re-download it") from err
        if done != info.nbytes:
            raise CheckpointError(f"{info.file} ended inside a tensor (truncated after it was checked); re-download it")

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()


class NoEvent:
    """The event of a synchronous copy (CPU): it has finished when the copy returns."""

    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src, non_blocking=True)


def staged_to_device(
    items: Iterable[tuple[str, TensorInfo]],
    device: torch.device | str,
    buffers: DoubleBuffer,
    read_into: Callable[[TensorInfo, torch.Tensor], None],
    copy: Callable[[torch.Tensor, torch.Tensor], None] = _copy,
    dtype_of: Callable[[str], torch.dtype | None] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor on `device`: read into a staging buffer, copied out (and cast, when `dtype_of` names
    a dtype) without blocking.

    The read of the next tensor runs on the host while this tensor's copy runs on the device; the
    yielded tensor may be used at once on the current stream (the copy is queued before any use).
    """
    for name, info in items:
        k, host = buffers.take(info.nbytes)
        read_into(info, host)
        src = host.view(torch_dtype(info)).view(info.shape)
        dtype = (dtype_of(name) if dtype_of else None) or src.dtype
        dst = torch.empty(info.shape, dtype=dtype, device=device)
        copy(dst, src)
        buffers.copied(k)
        yield name, dst


def stage_tensors(
    tensors: dict[str, TensorInfo],
    device: torch.device | str,
    dtype_of: Callable[[str], torch.dtype | None] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors onto `device` through two buffers sized for the largest tensor (pinned on CUDA).

    On CPU the copy out of the buffer is the cast: each loaded tensor is allocated once at its final
    dtype and nothing is freed between tensors, so the allocator has no holes to leave behind. On CUDA
    the copy moves the stored bytes and the cast runs on the device.
    """
    for info in tensors.values():
        torch_dtype(info)  # an unreadable dtype is refused before the first read
    device = torch.device(device)
    cuda = device.type == "cuda"
    largest = max((info.nbytes for info in tensors.values()), default=0)
    buffers = DoubleBuffer(largest, pin=cuda, make_event=torch.cuda.Event if cuda else NoEvent)
    reader = FileReader()
    try:
        items = in_file_order(tensors)
        if not cuda:
            yield from staged_to_device(items, device, buffers, reader.read_into, dtype_of=dtype_of)
            return
        with torch.cuda.device(device):
            for name, t in staged_to_device(items, device, buffers, reader.read_into):
                dtype = dtype_of(name) if dtype_of else None
                yield name, t.to(dtype) if dtype else t
            torch.cuda.current_stream().synchronize()  # the copies out of the pinned buffers, before they go
    finally:
        reader.close()


def in_file_order(tensors: dict[str, TensorInfo]) -> list[tuple[str, TensorInfo]]:
    """File by file, each in byte order, so the disk is read sequentially."""
    return sorted(tensors.items(), key=lambda kv: (str(kv[1].file), kv[1].begin))
