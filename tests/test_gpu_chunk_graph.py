"""One CUDA graph per chunk and the overlapped decode, on a GPU (issue 7, items 1 and 5).

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

from helios_rt import Engine, EngineConfig
from helios_rt.compile.chunk_program import ChunkKind
from helios_rt.engine import Stream

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = EngineConfig(height=64, width=64, device="cuda", dtype="float32", kernels="reference")
PROMPT = "a tropical fish among corals"
STEADY = ChunkKind(False, False)


def stream_chunks(engine: Engine, chunks: int, seed: int = 3) -> list:
    with engine.generate_stream(PROMPT, num_frames=33 * chunks, seed=seed) as stream:
        return list(stream)


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_kinds_are_captured_before_the_first_chunk_then_only_replayed(kernels: str, monkeypatch) -> None:
    engine = Engine.from_pretrained("demo", CUDA.replace(kernels=kernels))
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


def test_warmup_captures_before_the_first_stream() -> None:
    engine = Engine.from_pretrained("demo", CUDA)
    engine.warmup()
    assert set(engine.chunk_program.captured) == {ChunkKind(True, True), STEADY}
    chunks = stream_chunks(engine, 3)
    assert [c.index for c in chunks] == [0, 1, 2]


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("overlap", [False, True])
def test_chunk_graph_replay_equals_the_eager_engine(overlap: bool, kernels: str) -> None:
    config = CUDA.replace(kernels=kernels, overlap_decode=overlap)
    graphed = stream_chunks(Engine.from_pretrained("demo", config.replace(graphs="chunk")), 5)
    eager = stream_chunks(Engine.from_pretrained("demo", config.replace(graphs="off")), 5)
    for a, b in zip(graphed, eager, strict=True):
        assert torch.equal(a.latents, b.latents), f"chunk {a.index}: replay differs from the eager engine"
        assert np.array_equal(a.frames, b.frames), f"chunk {a.index}"


def test_a_replayed_chunk_allocates_nothing() -> None:
    """The graph's intermediates live in the planned arena: replays leave the allocator untouched."""
    engine = Engine.from_pretrained("demo", CUDA.replace(kernels="triton"))
    stream = engine.generate_stream(PROMPT, num_frames=None, seed=1)
    next(stream), next(stream)
    program = engine.chunk_program
    generator = torch.Generator().manual_seed(0)
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    program.run(STEADY, generator)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
    stream.close()


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


def test_decode_of_chunk_k_overlaps_compute_of_chunk_k_plus_1(monkeypatch) -> None:
    engine = Engine.from_pretrained("demo", CUDA.replace(height=192, width=320))
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


def test_steady_state_chunks_issue_no_device_synchronize(monkeypatch) -> None:
    engine = Engine.from_pretrained("demo", CUDA)
    engine.warmup()
    stream = engine.generate_stream(PROMPT, num_frames=None, seed=1)
    next(stream), next(stream)
    calls = []
    sync = torch.cuda.synchronize

    def counted(*args, **kwargs):
        calls.append(args)
        return sync(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "synchronize", counted)
    for _ in range(4):
        next(stream)
    stream.close()
    assert calls == []


def test_memory_is_constant_over_50_chunks() -> None:
    engine = Engine.from_pretrained("demo", CUDA)
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


def test_allocated_bytes_are_equal_at_every_hand_over_the_last_included() -> None:
    """First light's "memory flat" series: the last chunk has no successor in flight, so nothing made
    per chunk may live beside a launched one (a per-chunk 0-d finite flag did: 512 B less at the last)."""
    engine = Engine.from_pretrained("demo", CUDA)
    engine.warmup()
    allocated = []
    with engine.generate_stream(PROMPT, num_frames=33 * 6, seed=2) as stream:
        for _ in stream:
            torch.cuda.synchronize()
            allocated.append(torch.cuda.memory_allocated())
    assert len(allocated) == 6 and len(set(allocated[1:])) == 1, f"allocated bytes at each hand-over: {allocated}"


@pytest.mark.parametrize(("overlap", "effective"), [(True, 2), (False, 1)])
def test_set_prompt_index_on_the_gpu(overlap: bool, effective: int) -> None:
    engine = Engine.from_pretrained("demo", CUDA.replace(overlap_decode=overlap))
    stream = engine.generate_stream(PROMPT, num_frames=None, seed=1)
    next(stream)
    assert stream.set_prompt("a busy city street") == effective
    stream.close()
