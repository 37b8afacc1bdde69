"""An engine works on its own device, whatever the caller's current CUDA device is.

On a CPU the scope itself is a no-op, so `device_scope` is replaced by a recorder and the work that
uses "the current device" on CUDA (plan execution and replay, the noise upload, the lanes' events,
the prompt's K/V, the finite flag, the decode) records which scope it ran in: every piece must run
inside a scope of the engine's device, entered by the public entry point that led to it. On two
GPUs the engine runs on cuda:1 while cuda:0 is current, and nothing lands on cuda:0.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from support.untrained import untrained_engine

from helios_rt import Engine
from helios_rt import engine as engine_module
from helios_rt.compile import chunk_program as chunk_program_module
from helios_rt.compile.chunk_program import ChunkProgram
from helios_rt.overlap import HostLanes
from helios_rt.sampling.noise import StaticNoise

PROMPT = "a tropical fish among corals"


class Scopes:
    """A stand-in for `device_scope`: a stack of entered devices, and the work seen in each."""

    def __init__(self) -> None:
        self.stack: list[torch.device] = []
        self.entered: list[torch.device] = []
        self.work: list[tuple[str, torch.device | None]] = []

    @contextmanager
    def __call__(self, device: torch.device):
        self.stack.append(torch.device(device))
        self.entered.append(torch.device(device))
        try:
            yield
        finally:
            self.stack.pop()

    def saw(self, what: str) -> None:
        self.work.append((what, self.stack[-1] if self.stack else None))

    def take(self) -> tuple[list[torch.device], list[tuple[str, torch.device | None]]]:
        """What was entered and done since the last call."""
        taken = self.entered, self.work
        self.entered, self.work = [], []
        return taken


class ScopedLanes(HostLanes):
    """Host lanes that report each lane operation (CUDA events and streams on a GPU) to `scopes`."""

    def __init__(self, scopes: Scopes) -> None:
        self.scopes = scopes

    def mark(self, lane):
        self.scopes.saw(f"{lane} event")
        return super().mark(lane)

    def wait(self, lane, mark) -> None:
        self.scopes.saw(f"{lane} wait")

    def host_wait(self, mark) -> None:
        self.scopes.saw("host wait")


def _watch(monkeypatch, target, name: str, scopes: Scopes, what: str) -> None:
    original = getattr(target, name)

    def watched(*args, **kwargs):
        scopes.saw(what)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, watched)


@pytest.fixture
def scoped(make_tiny_engine, monkeypatch) -> tuple[Engine, Scopes]:
    """A compiled-chunk demo engine whose scopes and device work are recorded."""
    scopes = Scopes()
    monkeypatch.setattr(engine_module, "device_scope", scopes)
    monkeypatch.setattr(chunk_program_module, "device_scope", scopes)
    monkeypatch.setattr(engine_module, "lanes_for", lambda device, overlap: ScopedLanes(scopes))
    engine = make_tiny_engine(graphs="chunk")
    _watch(monkeypatch, ChunkProgram, "_execute", scopes, "chunk program")
    _watch(monkeypatch, StaticNoise, "fill", scopes, "noise upload")
    _watch(monkeypatch, engine_module._FiniteFlags, "check", scopes, "finite flag")
    _watch(monkeypatch, engine.vae, "decode_frames", scopes, "decode")
    _watch(monkeypatch, engine.transformer, "encode_text", scopes, "text K/V")
    return engine, scopes


def _all_on(device: torch.device, work: list[tuple[str, torch.device | None]]) -> None:
    outside = [(what, where) for what, where in work if where != device]
    assert not outside, f"{len(outside)} pieces of work ran outside the engine's device scope: {outside[:5]}"


@pytest.mark.slow  # warm-up and a three-chunk stream: ~9 s
def test_every_entry_point_runs_its_device_work_on_the_engines_device(scoped) -> None:
    engine, scopes = scoped
    device = engine.device
    assert scopes.take()[0] == [device]  # loading (the demo engine's construction)

    engine.warmup()
    entered, work = scopes.take()
    assert entered and set(entered) == {device} and {w for w, _ in work} == {"text K/V", "chunk program"}
    _all_on(device, work)

    stream = engine.generate_stream(PROMPT, num_frames=33 * 3, seed=3)
    entered, work = scopes.take()
    assert entered == [device]
    _all_on(device, work)

    for k in range(3):  # the first chunk (capture on CUDA), then steady ones (replay)
        next(stream)
        entered, work = scopes.take()
        kinds = {w for w, _ in work}
        assert entered and set(entered) == {device}, f"chunk {k}"
        assert {"chunk program", "noise upload", "finite flag", "decode", "compute event", "host wait"} <= kinds
        _all_on(device, work)

    stream.set_prompt("a busy city street")
    assert scopes.take()[0] == [device]
    stream.close()
    assert scopes.take()[0] == [device]
    engine.close()  # closes its streams again, each in its scope, then frees its own memory in one
    assert set(scopes.take()[0]) == {device}


def test_the_program_scopes_its_own_entry_points(scoped) -> None:
    """Used without the engine (a test, a benchmark), the program still runs on its own device."""
    engine, scopes = scoped
    program = engine.chunk_program
    engine.warmup()
    scopes.take()
    program.capture([program.kind(first_chunk=False)])  # already planned: warm-up and capture only
    program.run(program.kind(first_chunk=False), torch.Generator().manual_seed(0))
    entered, work = scopes.take()
    assert set(entered) == {engine.device} and {w for w, _ in work} == {"chunk program", "noise upload"}
    _all_on(engine.device, work)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_an_engine_on_cuda1_runs_there_while_cuda0_is_current(tiny_config) -> None:
    """Capture, replay, noise upload, events and decode on cuda:1; cuda:0 stays current and untouched."""
    torch.cuda.set_device(0)
    torch.cuda.synchronize(0)
    before = torch.cuda.memory_allocated(0)
    config = tiny_config(graphs="chunk", device="cuda:1", overlap_decode=True)
    engine = untrained_engine(config)
    engine.warmup()
    with engine.generate_stream(PROMPT, num_frames=33 * 3, seed=3) as stream:
        graphed = list(stream)
    assert engine.chunk_program.captured, "the chunk graphs were not captured"
    eager_engine = untrained_engine(config.replace(graphs="off"))
    with eager_engine.generate_stream(PROMPT, num_frames=33 * 3, seed=3) as stream:
        eager = list(stream)
    assert torch.cuda.current_device() == 0
    torch.cuda.synchronize(0)
    assert torch.cuda.memory_allocated(0) == before, "the cuda:1 engine allocated on cuda:0"
    for a, b in zip(graphed, eager, strict=True):
        assert torch.equal(a.latents, b.latents), f"chunk {a.index}: the replay on cuda:1 differs from eager"
        assert np.array_equal(a.frames, b.frames), f"chunk {a.index}"
