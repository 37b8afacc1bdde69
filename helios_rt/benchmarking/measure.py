"""Process measurements for the benchmarks: resident memory, CPU time, dispatched ops and allocations."""

from __future__ import annotations

import resource
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

Tensor = torch.Tensor


def _proc_status(key: str) -> int | None:
    """A `kB` field of /proc/self/status in bytes (None where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """The resident set size of this process now."""
    value = _proc_status("VmRSS")
    if value is None:  # no /proc: the high-water mark is the best we have
        return peak_rss_bytes()
    return value


def peak_rss_bytes() -> int:
    """The resident set's high-water mark (since the process started, or the last `reset_peak_rss`)."""
    value = _proc_status("VmHWM")
    if value is None:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, kB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return value


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current resident set (Linux: `5` into /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> bool:
    """Hand freed heap memory back to the OS (glibc `malloc_trim`), so that a resident-set reading
    that follows starts from what is live, not from what an earlier run left cached in the heap."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): robust to other load on the machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class OpCounter(TorchDispatchMode):
    """Counts aten ops dispatched and the tensor storages they allocate.

    An allocation is an output tensor whose storage is none of the op's inputs' (views, in-place and
    `out=` ops allocate nothing). Buffers that kernels allocate internally (e.g. oneDNN scratch) are
    below the dispatcher and not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.allocations = 0
        self.allocated_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        inputs = {_storage_ptr(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                ptr = _storage_ptr(t)
                if ptr not in inputs and ptr != 0:
                    inputs.add(ptr)  # an op returning one new storage twice allocates once
                    self.allocations += 1
                    self.allocated_bytes += t.untyped_storage().nbytes()
        return out


def _storage_ptr(t: Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        return 0


def ratio(ours: float, theirs: float) -> float:
    """ours / theirs (nan when theirs is zero)."""
    return ours / theirs if theirs else float("nan")
