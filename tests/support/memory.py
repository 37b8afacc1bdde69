"""Live-memory measurements shared by the engine tests."""

from __future__ import annotations

import gc

import torch


def live_tensor_bytes() -> int:
    """Bytes of every distinct storage that a live tensor holds."""
    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
