"""One CUDA graph per chunk and the overlapped decode, on a GPU.

Skipped without CUDA. What runs on a CPU is covered elsewhere: the chunk body against the per-step
path (`test_chunk_program.py`), its freedom from host reads of device values (meta tensors,
`test_chunk_capturable.py`) and the lane order of the overlapped stream (`test_overlap.py`). Here
the same things are checked where they matter:

- capture: at warm-up only (`Engine.warmup()`, or a stream before its first chunk), every kind the
  stream runs, after one eager run of each on the arena; chunks then only replay;
- replay == eager: a chunk graph replays exactly the kernels of the eager body on the same inputs
  (the noise comes from the same CPU generator through the static buffers), so float32 results are
  expected bit-identical to `graphs="off"` on the same op table, for the reference ops and the
  Triton kernels;
- overlap: chunk k's decode (decode stream) and chunk k+1's compute (compute stream) overlap in
  time, and steady-state chunks issue no device-wide synchronize;
- memory: allocated bytes are the same at chunk 5 and chunk 49, and the peak does not grow; they
  are the same at every hand-over after the first, the last chunk's included.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support import gpu_checks as gc

from helios_rt import Engine
from helios_rt.compile.chunk_program import ChunkKind
from helios_rt.compile.workspace import Executor
from helios_rt.engine import Stream

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPT = "a tropical fish among corals"
STEADY = ChunkKind(False, False)


def stream_chunks(engine: Engine, chunks: int, seed: int = 3) -> list:
    with engine.generate_stream(PROMPT, num_frames=33 * chunks, seed=seed) as stream:
        return list(stream)


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_kinds_are_captured_before_the_first_chunk_then_only_replayed(
    make_tiny_engine, kernels: str, monkeypatch
) -> None:
    engine = make_tiny_engine(device="cuda", kernels=kernels)
    program = engine.chunk_program
    assert program is not None and program.cuda_graph
    executed: list[ChunkKind] = []
    execute = type(program)._execute

    def recorded(self, kind: ChunkKind) -> None:
        executed.append(kind)
        execute(self, kind)

    monkeypatch.setattr(type(program), "_execute", recorded)
    stream_chunks(engine, 4)
    # before chunk 0: each kind once eagerly (warm-up) and once inside its capture; then replays only
    first = ChunkKind(True, True)
    assert executed == [first, first, STEADY, STEADY]
    assert set(program.captured) == {first, STEADY}


def test_warmup_captures_before_the_first_stream(make_tiny_engine) -> None:
    engine = make_tiny_engine(device="cuda")
    engine.warmup()
    assert set(engine.chunk_program.captured) == {ChunkKind(True, True), STEADY}
    chunks = stream_chunks(engine, 3)
    assert [c.index for c in chunks] == [0, 1, 2]


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("overlap", [False, True])
def test_chunk_graph_replay_equals_the_eager_engine(make_tiny_engine, overlap: bool, kernels: str) -> None:
    graphed = stream_chunks(make_tiny_engine(device="cuda", kernels=kernels, overlap_decode=overlap, graphs="chunk"), 5)
    eager = stream_chunks(make_tiny_engine(device="cuda", kernels=kernels, overlap_decode=overlap, graphs="off"), 5)
    for a, b in zip(graphed, eager, strict=True):
        assert torch.equal(a.latents, b.latents), f"chunk {a.index}: replay differs from the eager engine"
        assert np.array_equal(a.frames, b.frames), f"chunk {a.index}"


def test_a_replayed_chunk_allocates_nothing_and_its_intermediates_live_in_the_arena(make_tiny_engine) -> None:
    """Two checks, each able to fail. (1) The caching allocator's own record: the set of live blocks is the
    same before and after three replays and their hand-overs (a counter of allocator calls cannot fail on
    a replay: a graph never calls the allocator). (2) Every intermediate the plan allocates is a view of
    the arena (the storage of each allocating op's output, recorded by the Executor on the same body),
    and the graph's private pool holds no live block after capture (nothing was allocated beside the plan
    and kept)."""
    engine = make_tiny_engine(device="cuda", kernels="triton")
    engine.warmup()
    program = engine.chunk_program
    stream = engine.generate_stream(PROMPT, num_frames=None, seed=1)
    next(stream), next(stream)
    torch.cuda.synchronize()
    before = torch.cuda.memory_snapshot()
    for _ in range(3):
        next(stream)
    torch.cuda.synchronize()
    added, removed = gc.allocator_changes(before, torch.cuda.memory_snapshot())
    assert not added and not removed, f"steady chunks changed the live blocks: +{sorted(added)} -{sorted(removed)}"
    assert gc.pool_blocks(torch.cuda.memory_snapshot(), program._pool) == [], "the graph pool holds live blocks"
    stream.close()

    plan = program.plan(STEADY)
    with Executor(plan, program.arena, record_ranges=True) as ex:
        program.sampler.run_chunk(program.state, STEADY, program.batch)
    allocated = [(lo, hi) for i, _, lo, hi in ex.ranges if plan.steps[i].allocs]
    assert allocated and gc.outside(allocated, [gc.tensor_range(program.arena)]) == []


def _recorded(monkeypatch) -> tuple[list, list]:
    """Keep every `_Launched` / `_Decoded` a stream makes (they carry the lanes' timed events)."""
    launched, decoded = [], []
    launch, decode = Stream._launch, Stream._decode

    def record_launch(self):
        launched.append(launch(self))
        return launched[-1]

    def record_decode(self, item):
        decoded.append(decode(self, item))
        return decoded[-1]

    monkeypatch.setattr(Stream, "_launch", record_launch)
    monkeypatch.setattr(Stream, "_decode", record_decode)
    return launched, decoded


def test_decode_of_chunk_k_overlaps_compute_of_chunk_k_plus_1(make_tiny_engine, monkeypatch) -> None:
    engine = make_tiny_engine(device="cuda", height=192, width=320)
    engine.warmup()
    launched, decoded = _recorded(monkeypatch)
    origin = torch.cuda.Event(enable_timing=True)
    origin.record()
    stream_chunks(engine, 5)
    at = lambda event: origin.elapsed_time(event)  # noqa: E731  ms since origin, comparable across streams
    overlaps = 0
    for k in range(1, 4):
        compute, decode = launched[k + 1], decoded[k]
        assert at(decode.begin) >= at(launched[k].end) - 1e-3, f"chunk {k} decoded before it was computed"
        overlaps += at(compute.begin) < at(decode.end) and at(decode.begin) < at(compute.end)
    assert overlaps == 3, "chunk k's decode did not run while chunk k+1 was computed"


def test_steady_state_chunks_issue_no_device_synchronize(make_tiny_engine) -> None:
    """CUDA's sync debug mode in "error" over four steady chunks: any synchronising call (`.item()`, `.cpu()`,
    a device or stream synchronize, a copy to pageable host memory) raises; the hand-over waits on the
    decode's event only, and reads the finite flag from pinned host memory the decode lane copied it to."""
    engine = make_tiny_engine(device="cuda")
    engine.warmup()
    stream = engine.generate_stream(PROMPT, num_frames=None, seed=1)
    next(stream), next(stream)
    with gc.sync_debug_errors():
        for _ in range(4):
            next(stream)
    stream.close()


def test_lane_and_stage_timings_are_cuda_events(make_tiny_engine, monkeypatch) -> None:
    """The lanes' begin/end marks and the stage timer's tokens are timed CUDA events, not host clocks."""
    from helios_rt.benchmarking.stream import StageTimer

    engine = make_tiny_engine(device="cuda")
    engine.warmup()
    launched, decoded = _recorded(monkeypatch)
    stream_chunks(engine, 3)
    torch.cuda.synchronize()
    marks = [e for item in launched + decoded for e in (item.begin, item.end)]
    assert marks and gc.timing_events(marks) == []
    eager = make_tiny_engine(device="cuda", graphs="off", overlap_decode=False)
    with StageTimer(eager) as timer:
        token = timer.timer.start()
        timer.timer.stop("probe", token)
        torch.cuda.synchronize()
        assert gc.timing_events([token, timer.timer.pending[-1][2]]) == []


def test_memory_is_constant_over_50_chunks(make_tiny_engine) -> None:
    engine = make_tiny_engine(device="cuda")
    stream = engine.generate_stream(PROMPT, num_frames=None, seed=2)
    allocated, peak = {}, None
    for chunk in stream:
        if chunk.index == 5:
            torch.cuda.synchronize()
            allocated[5] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        if chunk.index == 10:
            peak = torch.cuda.max_memory_allocated()
        if chunk.index == 49:
            torch.cuda.synchronize()
            allocated[49] = torch.cuda.memory_allocated()
            break
    stream.close()
    assert allocated[49] == allocated[5], f"allocated bytes went from {allocated[5]} to {allocated[49]}"
    assert torch.cuda.max_memory_allocated() == peak, "the peak grew after chunk 10"


def test_allocated_bytes_are_equal_at_every_hand_over_the_last_included(make_tiny_engine) -> None:
    """First light's "memory flat" series: the last chunk has no successor in flight, so nothing made
    per chunk may live beside a launched one (a per-chunk 0-d finite flag did: 512 B less at the last)."""
    engine = make_tiny_engine(device="cuda")
    engine.warmup()
    allocated = []
    with engine.generate_stream(PROMPT, num_frames=33 * 6, seed=2) as stream:
        for _ in stream:
            torch.cuda.synchronize()
            allocated.append(torch.cuda.memory_allocated())
    assert len(allocated) == 6 and len(set(allocated[1:])) == 1, f"allocated bytes at each hand-over: {allocated}"


@pytest.mark.parametrize(("overlap", "effective"), [(True, 2), (False, 1)])
def test_set_prompt_switches_the_latents_at_the_announced_chunk(
    make_tiny_engine, overlap: bool, effective: int
) -> None:
    """The switch is in the latents: chunks before the announced one equal the unswitched stream's, the
    announced one differs from it (the blend starts there)."""
    unswitched = stream_chunks(make_tiny_engine(device="cuda", overlap_decode=overlap), effective + 1, seed=1)
    plain = [c.latents for c in unswitched]
    engine = make_tiny_engine(device="cuda", overlap_decode=overlap)
    switched = []
    with engine.generate_stream(PROMPT, num_frames=33 * (effective + 1), seed=1) as stream:
        switched.append(next(stream).latents)
        assert stream.set_prompt("a busy city street") == effective
        switched += [c.latents for c in stream]
    for k in range(effective):
        assert torch.equal(switched[k], plain[k]), f"chunk {k} changed before the announced chunk {effective}"
    assert not torch.equal(switched[effective], plain[effective]), f"chunk {effective} did not switch"
