"""The checks the gpu-marked tests make (tests/support/gpu_checks.py), tested on plain data: each must be
able to fail, so a GPU run that passes them means something."""

from __future__ import annotations

import pytest
import torch
from support import gpu_checks as gc


def _snapshot(*blocks: tuple[int, int, str]) -> list[dict]:
    return [{"address": 0, "total_size": 1 << 20,
             "blocks": [{"address": a, "size": n, "state": s} for a, n, s in blocks]}]  # fmt: skip


def test_allocator_changes_see_a_block_allocated_per_chunk() -> None:
    before = _snapshot((0, 512, "active_allocated"), (512, 512, "inactive"))
    same = _snapshot((0, 512, "active_allocated"), (512, 512, "inactive"))
    assert gc.allocator_changes(before, same) == (set(), set())
    leaked = _snapshot((0, 512, "active_allocated"), (512, 512, "active_allocated"))  # a 0-d flag per chunk
    assert gc.allocator_changes(before, leaked) == ({(512, 512)}, set())
    freed = _snapshot((0, 512, "inactive"), (512, 512, "inactive"))
    assert gc.allocator_changes(before, freed) == (set(), {(0, 512)})
    pending = _snapshot((0, 512, "active_pending_free"), (512, 512, "inactive"))  # still held by a stream
    assert gc.allocator_changes(before, pending) == (set(), set())


def test_outside_finds_an_intermediate_off_the_arena() -> None:
    arena, state = (1000, 2000), (5000, 5100)
    assert gc.outside([(1000, 1500), (1500, 2000), (5000, 5100)], [arena, state]) == []
    assert gc.outside([(1000, 1500), (1900, 2100), (9000, 9004)], [arena, state]) == [(1900, 2100), (9000, 9004)]


def test_tensor_range_covers_the_storage_of_a_view() -> None:
    base = torch.zeros(64, dtype=torch.uint8)
    lo, hi = gc.tensor_range(base[8:16].view(torch.float32))
    assert (lo, hi) == (base.data_ptr(), base.data_ptr() + 64)


def test_sync_debug_errors_sets_error_and_restores(monkeypatch) -> None:
    modes = [0]
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: modes[-1])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda m: modes.append(m))
    with pytest.raises(KeyError), gc.sync_debug_errors():
        assert modes[-1] == "error"
        raise KeyError("a failing body still restores the mode")
    assert modes[-1] == 0


def test_timing_events_refuses_host_clocks() -> None:
    assert gc.timing_events([1.5]) == ["event 0 is a float, not a torch.cuda.Event"]


def test_pool_blocks_sees_only_the_graph_pool() -> None:
    snapshot = [
        {"segment_pool_id": (0, 0), "blocks": [{"address": 0, "size": 64, "state": "active_allocated"}]},
        {"segment_pool_id": (1, 7), "blocks": [{"address": 512, "size": 32, "state": "active_allocated"},
                                                {"address": 544, "size": 32, "state": "inactive"}]},
    ]  # fmt: skip
    assert gc.pool_blocks(snapshot, (1, 7)) == [(512, 32)]
    assert gc.pool_blocks(snapshot, (2, 0)) == []
