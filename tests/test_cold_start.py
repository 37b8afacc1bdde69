"""The cold start: reported by phase, and the first chunk's work paid once.

With graphs, a stream's first chunk used to run its kind twice: a warm-up on scratch state, thrown
away, then the replay of the graph captured after it. Now the first chunk's own run is that warm-up
and the graph is captured after it (capturing records, it does not run). A CPU cannot capture, so the
graph here is a stand-in whose replay runs the planned body: what is counted is how often each kind
runs, which is the order the CUDA path follows (tests/test_gpu_chunk_graph.py replays real graphs).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helios_rt import Engine
from helios_rt.compile.chunk_program import ChunkKind, ChunkProgram

FIRST, STEADY = ChunkKind(True, True), ChunkKind(False, False)


class _ReplayByRunning:
    """A captured kind: replaying it runs the kind's plan on the arena, as the graph's kernels would."""

    def __init__(self, program: ChunkProgram, kind: ChunkKind) -> None:
        self.program, self.kind = program, kind

    def replay(self) -> None:
        self.program._execute(self.kind)


@pytest.fixture
def graphed(make_tiny_engine, monkeypatch) -> tuple[Engine, list[tuple[str, ChunkKind]]]:
    """A tiny engine whose program captures stand-in graphs; records every run of a kind's body."""
    engine = make_tiny_engine(graphs="chunk")
    program = engine.chunk_program
    runs: list[tuple[str, ChunkKind]] = []
    execute = program._execute
    monkeypatch.setattr(program, "cuda_graph", True)
    monkeypatch.setattr(program, "_execute", lambda kind: (runs.append(("run", kind)), execute(kind))[1])
    monkeypatch.setattr(program, "_capture", lambda kind: (runs.append(("capture", kind)),
                                                           _ReplayByRunning(program, kind))[1])  # fmt: skip
    return engine, runs


def stream(engine: Engine, chunks: int, seed: int = 3):
    with engine.generate_stream("a reef", num_frames=33 * chunks, seed=seed) as s:
        return list(s), s


@pytest.mark.slow  # three streams: ~15 s
def test_the_first_chunk_runs_its_kind_once(graphed, make_tiny_engine) -> None:
    engine, runs = graphed
    chunks, s = stream(engine, 3)
    assert runs == [
        ("run", STEADY),  # the steady kind's warm-up, on scratch state (thrown away), and its capture
        ("capture", STEADY),
        ("run", FIRST),  # the first chunk: its result is the stream's, then its kind is captured
        ("capture", FIRST),
        ("run", STEADY),  # chunks 1 and 2: replays
        ("run", STEADY),
    ], runs
    assert s.timings["warmup_runs"] == 1
    runs.clear()
    stream(engine, 2)  # a second stream replays both kinds: no warm-up, no capture
    assert runs == [("run", FIRST), ("run", STEADY)]
    eager, _ = stream(make_tiny_engine(graphs="off"), 3)
    for a, b in zip(chunks, eager, strict=True):
        assert torch.equal(a.latents, b.latents), f"chunk {a.index}: the captured-after-use path changed the result"
        assert np.array_equal(a.frames, b.frames)


@pytest.mark.slow  # warm-up and a stream: ~11 s
def test_engine_warmup_still_captures_every_kind_before_the_stream(graphed) -> None:
    engine, runs = graphed
    engine.warmup()
    assert runs == [("run", FIRST), ("capture", FIRST), ("run", STEADY), ("capture", STEADY)]
    runs.clear()
    _, s = stream(engine, 2)
    assert runs == [("run", FIRST), ("run", STEADY)]
    assert s.timings["warmup_runs"] == 0 and s.timings["plans_made"] == 0


@pytest.mark.slow  # three streams, two engines: ~12 s
def test_the_timings_break_the_cold_start_down(make_tiny_engine, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HELIOS_RT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HELIOS_RT_PLAN_CACHE", "1")
    engine = make_tiny_engine(graphs="chunk")
    _, first = stream(engine, 2)
    t = first.timings
    assert t["load_s"] > 0 and t["weights_gb"] > 0 and t["load_gb_s"] == pytest.approx(t["weights_gb"] / t["load_s"])
    assert (t["plans_made"], t["plans_loaded"]) == (2, 0) and t["plan_s"] > 0
    assert t["ttff_s"] == first.time_to_first_frame_s
    parts = t["condition_s"] + t["plan_s"] + t["warmup_s"] + t["capture_s"] + t["first_chunk_s"]
    assert parts == pytest.approx(t["ttff_s"])
    _, second = stream(engine, 1)
    assert (second.timings["plans_made"], second.timings["plans_loaded"]) == (0, 0)  # planned already
    fresh = make_tiny_engine(graphs="chunk")
    _, third = stream(fresh, 1)
    assert (third.timings["plans_made"], third.timings["plans_loaded"]) == (0, 1)  # one chunk: one kind, cached


def test_timings_before_the_first_chunk_hold_what_is_known(make_tiny_engine) -> None:
    engine = make_tiny_engine(graphs="off")
    with engine.generate_stream("a reef", num_frames=33) as s:
        assert "ttff_s" not in s.timings and "plan_s" not in s.timings and s.timings["load_s"] > 0
        next(s)
        assert s.timings["ttff_s"] == s.timings["first_chunk_s"] + s.timings["condition_s"]
