"""The stream's two lanes: decode of chunk k overlapped with compute of chunk k+1.

The scheduling lives in `engine.Stream` and talks to a `Lanes` object; on CUDA that is two CUDA
streams and events, here a recording stand-in that says it overlaps. The tests check the order the
GPU relies on: chunk k+1's compute is issued before the host waits for chunk k's frames, the host
waits only for decode marks, a latent slot is rewritten only after the decode that read it, and the
results do not depend on the overlap. Timing properties (time to first frame, steady FPS) too.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from helios_rt import Engine, EngineConfig
from helios_rt import engine as engine_module
from helios_rt.overlap import HostLanes, lanes_for

PROMPT = "a tropical fish among corals"


class RecordingLanes(HostLanes):
    """Host lanes that claim to overlap and log every lane operation with numbered marks."""

    def __init__(self, overlapped: bool = True) -> None:
        self.overlapped = overlapped
        self.log: list[tuple] = []
        self._ids = itertools.count()
        self.lane: str | None = None

    @contextmanager
    def on(self, lane):
        outer, self.lane = self.lane, lane
        try:
            yield
        finally:
            self.lane = outer

    def mark(self, lane):
        mark = (lane, next(self._ids))
        self.log.append(("mark", *mark))
        return mark

    def wait(self, lane, mark) -> None:
        self.log.append(("wait", lane, mark))

    def host_wait(self, mark) -> None:
        self.log.append(("host_wait", mark))

    def used_on(self, lane, tensor) -> None:
        self.log.append(("used_on", lane, tensor))

    def seconds(self, start, end) -> float:
        return 0.0


def recorded_stream(engine: Engine, monkeypatch, overlapped: bool, chunks: int = 3):
    lanes = RecordingLanes(overlapped)
    monkeypatch.setattr(engine_module, "lanes_for", lambda device, overlap: lanes)
    order: list[tuple[str, int]] = []
    stream = engine.generate_stream(PROMPT, num_frames=33 * chunks, seed=3)
    for name in ("_launch", "_decode", "_hand_over"):
        original = getattr(stream, name)

        def logged(*args, _original=original, _name=name):
            result = _original(*args)
            index = result.index if _name != "_decode" else result.launched.index
            order.append((_name.strip("_"), index))
            lanes.log.append((_name.strip("_"), index, result))
            return result

        setattr(stream, name, logged)
    return stream, lanes, order


def test_next_chunk_is_launched_before_the_host_waits_for_this_one(tiny_engine, monkeypatch) -> None:
    stream, lanes, order = recorded_stream(tiny_engine, monkeypatch, overlapped=True)
    chunks = list(stream)
    assert [c.index for c in chunks] == [0, 1, 2]
    assert order == [("launch", 0), ("decode", 0), ("launch", 1), ("hand_over", 0),
                     ("decode", 1), ("launch", 2), ("hand_over", 1),
                     ("decode", 2), ("hand_over", 2)]  # fmt: skip


def test_host_waits_only_for_decode_marks_and_slots_wait_for_their_decode(tiny_engine, monkeypatch) -> None:
    """...and a chunk's compute waits for the slot only right before writing it: after its own sampling,
    for the mark after chunk k-2's decode lane copied the slot out (not for that whole decode)."""
    stream, lanes, _ = recorded_stream(tiny_engine, monkeypatch, overlapped=True, chunks=4)
    run_chunk = tiny_engine.sampler.run_chunk

    def logged_chunk(*args, **kwargs):
        lanes.log.append(("sample",))
        return run_chunk(*args, **kwargs)

    monkeypatch.setattr(tiny_engine.sampler, "run_chunk", logged_chunk)
    list(stream)
    decoded = {e[1]: e[2] for e in lanes.log if e[0] == "decode"}
    launched = {e[1]: e[2] for e in lanes.log if e[0] == "launch"}
    host_waits = [e[1] for e in lanes.log if e[0] == "host_wait"]
    assert host_waits == [decoded[k].end for k in range(4)]  # never a compute mark: no wait on chunk k+1
    waits = [e[1:] for e in lanes.log if e[0] == "wait"]
    samples = [i for i, e in enumerate(lanes.log) if e[0] == "sample"]
    for k in range(4):
        assert ("decode", launched[k].end) in waits  # decode k after compute k
        if k >= 2:
            reuse = ("wait", "compute", decoded[k - 2].slot_read)
            assert reuse in lanes.log, f"chunk {k} rewrote slot {k % 2} before chunk {k - 2}'s decode read it"
            assert lanes.log.index(reuse) > samples[k], f"chunk {k} waited for its slot before sampling"
    assert launched[2].latents is launched[0].latents and launched[1].latents is not launched[0].latents
    used = [(e[1], e[2]) for e in lanes.log if e[0] == "used_on"]
    assert all(lane == "decode" for lane, _ in used)  # what the decode lane reads outlives that read
    slots = [t for _, t in used if t.dim() == 5]  # the latent slots (the rest: each chunk's 0-d finite flag)
    assert len(slots) == 4 and all(t is launched[k].latents for k, t in enumerate(slots))
    assert all(any(t is launched[k].finite for _, t in used) for k in range(4))


@pytest.mark.slow  # two streams of three chunks: ~10 s
def test_results_do_not_depend_on_the_overlap(tiny_engine, monkeypatch) -> None:
    stream, _, _ = recorded_stream(tiny_engine, monkeypatch, overlapped=True)
    overlapped = list(stream)
    stream, _, _ = recorded_stream(tiny_engine, monkeypatch, overlapped=False)
    serial = list(stream)
    for a, b in zip(overlapped, serial, strict=True):
        assert torch.equal(a.latents, b.latents) and np.array_equal(a.frames, b.frames)


@pytest.mark.parametrize(("overlapped", "effective"), [(True, 2), (False, 1)])
def test_set_prompt_says_which_chunk_it_takes_effect_at(tiny_engine, monkeypatch, overlapped, effective) -> None:
    stream, _, _ = recorded_stream(tiny_engine, monkeypatch, overlapped=overlapped, chunks=4)
    next(stream)
    assert stream.set_prompt("a busy city street") == effective
    stream.close()


def test_stream_reports_time_to_first_frame_and_steady_fps(tiny_engine: Engine) -> None:
    stream = tiny_engine.generate_stream(PROMPT, num_frames=99, seed=1)
    assert stream.time_to_first_frame_s is None and stream.steady_fps is None
    next(stream)
    assert stream.time_to_first_frame_s > 0 and stream.steady_fps is None
    list(stream)
    span = stream.handover_times[-1] - stream.handover_times[0]
    assert stream.steady_fps == pytest.approx(2 * 33 / span)


def test_overlap_and_graphs_are_refused_without_cuda(make_tiny_engine) -> None:
    with pytest.raises(ValueError, match="needs a CUDA device"):
        lanes_for(torch.device("cpu"), True)
    assert isinstance(lanes_for(torch.device("cpu"), False), HostLanes)
    with pytest.raises(ValueError, match="overlap_decode=True needs a CUDA device"):
        make_tiny_engine(overlap_decode=True)
    with pytest.raises(ValueError, match="graphs="):
        EngineConfig(graphs="always")
    with pytest.raises(ValueError, match="overlap_decode="):
        EngineConfig(overlap_decode="yes")


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class NewStorage(TorchDispatchMode):
    """Records every op whose output owns new storage (neither an input's nor an out= argument's)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        given = {_storage(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self.ops += [str(func) for t in tree_leaves(out) if isinstance(t, torch.Tensor) and _storage(t) not in given]
        return out


@pytest.mark.slow  # five planned chunks under a dispatch mode: ~13 s
def test_a_steady_launch_allocates_nothing_its_finite_flag_is_the_slots(make_tiny_engine, monkeypatch) -> None:
    """The compiled chunk's launch (prompt, program run, slot copy, finite flag) makes no tensor of its
    own once steady: a per-chunk flag kept the chunk in flight one allocation ahead, so the allocated
    bytes at the last chunk's hand-over (no successor launched) differed from every other's."""
    engine = make_tiny_engine(graphs="chunk")
    stream, lanes, _ = recorded_stream(engine, monkeypatch, overlapped=True, chunks=5)
    launch, made = stream._launch, {}

    def counted():
        with NewStorage() as mode:
            launched = launch()
        made[launched.index] = mode.ops
        return launched

    stream._launch = counted
    list(stream)
    launched = {e[1]: e[2] for e in lanes.log if e[0] == "launch"}
    for k in (2, 3, 4):  # chunk 0 plans the first kind, chunk 1 the steady kind
        assert made[k] == [], f"chunk {k}'s launch allocated: {made[k]}"
        assert launched[k].finite is launched[k - 2].finite is not launched[k - 1].finite  # the slot's flag
    assert all(bool(launched[k].finite) for k in range(5))


def test_streams_taking_turns_order_their_decodes(tiny_engine, monkeypatch) -> None:
    """Streams of one engine share its decode (on CUDA one graph with static buffers): each decode waits for
    the engine's last decode, whichever stream made it, before it starts."""
    a, lanes_a, _ = recorded_stream(tiny_engine, monkeypatch, overlapped=False, chunks=2)
    next(a)
    b, lanes_b, _ = recorded_stream(tiny_engine, monkeypatch, overlapped=False, chunks=2)
    next(b)
    a_end = [e[2].end for e in lanes_a.log if e[0] == "decode"][-1]
    assert ("wait", "decode", a_end) in lanes_b.log, "stream b decoded while stream a's decode could still run"
    a.close(), b.close()
