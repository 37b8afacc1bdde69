"""Sequence (Ulysses) and CFG parallelism on gloo: N spawned ranks make the one-process engine's latents.

Two groups run at once, world 2 and world 4, each one spawn of processes that runs several streams
(spawning processes that import torch is the expensive part): T2V and I2V (distilled pyramid,
sequence-parallel), Base with CFG (the two halves on two rank groups, combined with sequence
parallelism at world 4), and at world 2 the compiled chunk (`graphs="chunk"`: the all-to-alls and
the gather planned into the arena) of Base with its CFG batch sequence-parallel. Each stream runs
three chunks and switches its prompt after the first on rank 0 only: the other ranks must follow
rank 0. The world-4 group ends with a rank killed by SIGKILL: the others must stop with a
`ParallelError` within seconds, never hang.

With CUDA graphs the collectives replay inside the chunk's graph, unseen by NCCL's watchdog: the
capture's arguments (thread-local error mode, the program's own stream) and the host's bounded wait
on a chunk (`wait_within`, a hung replay simulated by lanes whose marks are never reached) are
checked here on a CPU."""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from pathlib import Path

import pytest
import torch
from support.parallel_worker import Scenario, build_engine, run_scenario, worker

from helios_rt import engine as engine_module
from helios_rt.compile.chunk_program import ChunkKind
from helios_rt.config import EngineConfig
from helios_rt.errors import StreamFailedError
from helios_rt.overlap import HostLanes
from helios_rt.parallel import Mesh, ParallelConfig, ParallelError
from helios_rt.parallel.group import wait_within
from helios_rt.parallel.sequence import token_shards

T2V = Scenario("t2v", "distilled", "t2v")
I2V = Scenario("i2v", "distilled", "i2v")
BASE_CFG = Scenario("base-cfg", "base", "t2v", cfg=2)
BASE_CHUNK = Scenario("base-chunk", "base", "t2v", graphs="chunk")  # sequence-parallel, batch 2, planned
GROUPS = {2: [T2V, I2V, BASE_CFG, BASE_CHUNK], 4: [T2V, I2V, BASE_CFG]}
MESHES = {(2, "base-cfg"): (2, 1), (4, "base-cfg"): (2, 2)}  # (cfg, sequence); the rest: (1, world)
VICTIM = 3  # of the world-4 group, after its scenarios
JOIN_S = 400  # a hung group fails the test rather than CI
DETECT_S = 20  # a killed rank must stop the others within this (a closed connection is seen at once)


def test_token_shards_cover_every_token_once() -> None:
    for n_hist, n_noisy, ranks in [(0, 4, 4), (37, 9, 4), (2400, 8640, 8), (5, 7, 2), (1, 3, 3)]:
        s = token_shards(n_hist, n_noisy, ranks)
        seen = sorted(i for _, dst in s.pieces() for i in range(dst.start, dst.stop))
        assert seen == list(range(n_hist + n_noisy))
        assert sum(s.lengths) == n_hist + n_noisy
        assert max(s.lengths) - min(s.lengths) <= 2  # each segment balanced to one token
        srcs = [i for src, _ in s.pieces() for i in range(src.start, src.stop)]
        assert srcs == list(range(n_hist + n_noisy))  # the rank-major order is dense


def test_shards_and_sizes_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="at least 4 noisy tokens"):
        token_shards(10, 3, 4)
    with pytest.raises(ValueError, match=r"divisible by 3.*\[1, 2, 4\]"):
        ParallelConfig(sequence=3).resolve(3, 4, uses_cfg=False)
    with pytest.raises(ValueError, match="needs 4 ranks, but the process group has 2"):
        ParallelConfig(sequence=4).resolve(2, 4, uses_cfg=False)
    with pytest.raises(ValueError, match="without guidance"):
        ParallelConfig(cfg=2).resolve(2, 4, uses_cfg=False)
    with pytest.raises(ValueError, match="EngineConfig.parallel"):
        EngineConfig(parallel=2)
    assert ParallelConfig().resolve(4, 40, uses_cfg=True) == (2, 2)
    assert ParallelConfig().resolve(8, 40, uses_cfg=False) == (1, 8)
    assert ParallelConfig().resolve(10, 40, uses_cfg=True) == (2, 5)


def _spawn(world: int, root: Path) -> list:
    ctx = multiprocessing.get_context("spawn")
    victim = VICTIM if world == 4 else None
    procs = [
        ctx.Process(target=worker, args=(r, world, str(root / "store"), str(root), GROUPS[world], victim))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    return procs


def _join(procs: list, deadline: float) -> None:
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [i for i, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"ranks {hung} did not finish within {JOIN_S} s"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both groups' outputs (folders) and the one-process engine's latents of each scenario."""
    roots = {w: tmp_path_factory.mktemp(f"world{w}") for w in GROUPS}
    procs = {w: _spawn(w, roots[w]) for w in GROUPS}
    try:
        # the one-process engine, eager (the compiled chunk runs the same arithmetic): one per model and task
        reference = {(sc.kind, sc.task): run_scenario(build_engine(sc), sc) for sc in (T2V, I2V, BASE_CFG)}
    finally:
        deadline = time.monotonic() + JOIN_S
        for w in GROUPS:
            _join(procs[w], deadline)
    return roots, {w: [p.exitcode for p in procs[w]] for w in GROUPS}, reference


def _crashes(root: Path) -> str:
    return "\n".join(f.read_text() for f in sorted(root.glob("crash-rank*.txt")))


@pytest.mark.slow  # ranks as processes over gloo, each loading the engine: ~15 s
@pytest.mark.parametrize("world", sorted(GROUPS))
def test_ranks_make_the_one_process_latents(runs, world: int) -> None:
    roots, codes, reference = runs
    root = roots[world]
    assert not _crashes(root), _crashes(root)
    for sc in GROUPS[world]:
        for rank in range(world):
            got = torch.load(root / f"{sc.name}-rank{rank}.pt")
            assert got["mesh"] == MESHES.get((world, sc.name), (1, world)), sc.name
            ref_latents, ref_frames = reference[sc.kind, sc.task]
            assert len(got["latents"]) == 3
            for k, (a, b) in enumerate(zip(got["latents"], ref_latents, strict=True)):
                err = (a - b).abs().max().item()
                assert err <= 1e-5, f"world {world}, {sc.name}, rank {rank}, chunk {k}: max |diff| {err:.3g}"
            for a, b in zip(got["frames"], ref_frames, strict=True):  # rank 0 alone decodes
                assert (a.int() - b.int()).abs().max() <= 1 if rank == 0 else a.shape[0] == 0
    if world == 2:
        assert codes[2] == [0, 0]


@pytest.mark.slow  # ranks as processes over gloo: ~30 s
def test_a_killed_rank_stops_the_others_with_an_error(runs) -> None:
    roots, all_codes, _ = runs
    root, codes = roots[4], all_codes[4]
    assert codes[VICTIM] == -9, codes
    killed = float((root / "killed.txt").read_text())
    for rank in range(4):
        if rank == VICTIM:
            continue
        assert codes[rank] == 3, f"rank {rank} exit code {codes[rank]}: {_crashes(root)}"
        when, message = (root / f"error-rank{rank}.txt").read_text().split("\n", 1)
        assert f"rank {rank} of 4" in message and "another rank died" in message, message
        assert float(when) - killed < DETECT_S, f"rank {rank} took {float(when) - killed:.1f} s to stop"


def test_torchrun_environment_decides_the_cli_layout(monkeypatch) -> None:
    from helios_rt.parallel.launch import torchrun_parallel, writes_output

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert torchrun_parallel() is None and writes_output()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert torchrun_parallel() == ParallelConfig() and not writes_output()
    monkeypatch.setenv("RANK", "0")
    assert writes_output()


MESH = Mesh(rank=0, world=2, cfg=1, sequence=2, sequence_group=None, timeout_s=0.05)


class FakeCapture:
    """Stand-ins for torch.cuda's CUDAGraph, graph and Stream that record how a capture is made."""

    def __init__(self) -> None:
        self.captures: list[dict] = []
        self.streams: list[object] = []

    def stream(self, device=None):
        made = ("stream", torch.device(device))
        self.streams.append(made)
        return made

    def graph_class(self):
        class Graph:
            def pool(self):
                return ("pool", id(self))

        return Graph

    def graph(self, cuda_graph, **kwargs):
        self.captures.append(kwargs)
        return contextlib.nullcontext()


def test_graphs_are_captured_thread_local_on_the_programs_own_stream(make_tiny_engine, monkeypatch) -> None:
    """The default "global" mode lets NCCL's watchdog thread (event queries) invalidate a capture that
    holds collectives; torch's default capture stream is made on whichever device was current first."""
    engine = make_tiny_engine(graphs="chunk")
    program = engine.chunk_program
    fake = FakeCapture()
    monkeypatch.setattr(torch.cuda, "CUDAGraph", fake.graph_class())
    monkeypatch.setattr(torch.cuda, "graph", fake.graph)
    monkeypatch.setattr(torch.cuda, "Stream", fake.stream)
    monkeypatch.setattr(program, "cuda_graph", True)
    engine.warmup()  # two kinds: the first chunk's and the steady one
    assert [c["capture_error_mode"] for c in fake.captures] == ["thread_local", "thread_local"]
    assert fake.streams == [("stream", program.device)], "one capture stream, made on the program's device"
    assert all(c["stream"] is fake.streams[0] for c in fake.captures)
    first, steady = program.captured
    assert fake.captures[0]["pool"] is None and fake.captures[1]["pool"] == program._graphs[first].pool()
    assert steady == ChunkKind(False, False)


def test_wait_within_polls_until_reached_and_names_what_timed_out() -> None:
    now = [0.0]
    sleep = lambda s: now.__setitem__(0, now[0] + s)  # noqa: E731  a clock that moves only when slept
    polls = iter([False, False, True])
    wait_within(MESH, lambda: next(polls), "chunk 3", sleep=sleep, clock=lambda: now[0])
    assert next(polls, "done") == "done"  # returned at the first reached poll
    with pytest.raises(ParallelError, match=r"rank 0 of 2: chunk 4 did not finish within 0.05 s.*another rank died"):
        wait_within(MESH, lambda: False, "chunk 4", sleep=sleep, clock=lambda: now[0])
    assert now[0] >= 0.05  # it slept up to the deadline, then gave up


class HungLanes(HostLanes):
    """Host lanes whose marks made after `hang` is set are never reached (a replay stuck in a collective)."""

    def __init__(self, overlapped: bool) -> None:
        self.overlapped = overlapped
        self.hang = False

    def mark(self, lane):
        return (lane, self.hang)

    def reached(self, mark) -> bool:
        return not mark[1]

    def host_wait(self, mark) -> None:
        assert self.reached(mark), "blocked on a mark that is never reached: a hang"

    def seconds(self, start, end) -> float:
        return 0.0


@pytest.mark.parametrize(
    ("overlapped", "what"), [(True, "chunk 1's compute"), (False, "chunk 1")], ids=["overlapped", "serial"]
)
@pytest.mark.slow  # a compiled stream per case: ~10 s each
def test_a_stream_gives_up_on_a_hung_chunk_with_a_parallel_error(
    make_tiny_engine, monkeypatch, overlapped: bool, what: str
) -> None:
    """Overlapped, the prompt broadcast before chunk 2 waits for chunk 1's compute; serial, the hand-over waits
    for chunk 1's decode: either wait ends with a ParallelError after the mesh's timeout, never a hang."""
    engine = make_tiny_engine(graphs="chunk")
    lanes = HungLanes(overlapped)
    monkeypatch.setattr(engine, "parallel", MESH)
    monkeypatch.setattr(engine_module, "lanes_for", lambda device, overlap: lanes)
    monkeypatch.setattr(engine_module, "prompt_from_rank0", lambda mesh, fresh, embeds, uncond: (fresh, embeds, uncond))
    stream = engine.generate_stream("a lighthouse", num_frames=None, seed=1)
    launch = stream._launch

    def launch_and_hang_from_chunk_1():
        lanes.hang = lanes.hang or stream._launched == 1
        return launch()

    stream._launch = launch_and_hang_from_chunk_1
    assert next(stream).index == 0
    with pytest.raises(ParallelError, match=rf"rank 0 of 2: {what} did not finish within 0.05 s"):
        next(stream)
    with pytest.raises(StreamFailedError, match="failed at chunk 1"):
        next(stream)
    stream.close()
