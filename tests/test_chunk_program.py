"""The compiled chunk on CPU: planned on meta, run on its arena, equal to the eager sampler.

`graphs="chunk"` compiles each chunk kind into one plan over one arena; on a GPU that arena run is what
a CUDA graph captures, on a CPU it runs as it is. These tests pin down what that promises:

- the compiled chunk equals the eager engine bit for bit, for both op tables (the reference ops, the
  Triton kernels on the interpreter), distilled pyramid and base CFG, text- and image-to-video;
- a steady-state chunk allocates nothing (every intermediate is a view of the arena, counted by a
  dispatch mode and by the profiler's allocation events);
- kinds: the first chunk of a distilled model is amplified, a chunk writes the prefix only when the
  history has none yet (one rule, `stream_kinds`); the static noise holds the generator's draws in order;
- the eager engine runs the same `ChunkSampler.run_chunk`, not a copy of it;
- streams take turns on one program, `warmup` keeps the owner's state, a prompt of a new shape is
  an explicit re-plan (refused under capture), graphs dropped mid-stream are captured again.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from support.pipelines import build_pipeline, prompt_embeds, save_pipeline
from support.untrained import untrained_engine
from torch.utils._python_dispatch import TorchDispatchMode

from helios_rt import Engine, EngineConfig
from helios_rt.compile.chunk_program import STEADY, ChunkKind, ChunkProgram, TextShape, stream_kinds
from helios_rt.compile.workspace import PlanMismatch
from helios_rt.sampling.chunk import ChunkSampler
from helios_rt.sampling.noise import GeneratorNoise, StaticNoise

SMALL = EngineConfig(height=64, width=64, device="cpu", dtype="float32", kernels="reference", graphs="chunk")
PROMPT = "a tropical fish among corals"
INTERPRETER = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton interpreter (set by conftest without CUDA)"
)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return untrained_engine(SMALL)


def stream_chunks(engine: Engine, chunks: int, seed: int = 3, **kwargs) -> list:
    with engine.generate_stream(PROMPT if "prompt_embeds" not in kwargs else None, num_frames=33 * chunks,
                                seed=seed, **kwargs) as stream:  # fmt: skip
        return list(stream)


def assert_same(compiled: list, eager: list) -> None:
    assert len(compiled) == len(eager)
    for a, b in zip(compiled, eager, strict=True):
        assert torch.equal(a.latents, b.latents), (
            f"chunk {a.index}: latents differ by {(a.latents - b.latents).abs().max():.2e}"
        )
        assert np.array_equal(a.frames, b.frames), f"chunk {a.index}: frames differ"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """The oracle tests' two-layer pipelines, saved: small enough for the Triton interpreter."""
    return {kind: save_pipeline(build_pipeline(kind), tmp_path_factory.mktemp(kind)) for kind in ("distilled", "base")}


TRITON_FAST = SMALL.replace(kernels="triton", pyramid_steps=(1, 1, 1), amplify_first_chunk=False)
EMBEDS = {"prompt_embeds": prompt_embeds(1), "negative_prompt_embeds": prompt_embeds(2)}


BASE_32 = SMALL.replace(height=32, width=32, num_inference_steps=1, guidance_scale=5.0)
IMAGE_32 = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def test_graphs_chunk_compiles_and_off_runs_eagerly(engine: Engine) -> None:
    assert isinstance(engine.chunk_program, ChunkProgram) and not engine.chunk_program.cuda_graph  # a CPU
    assert untrained_engine(SMALL.replace(graphs="off")).chunk_program is None
    assert untrained_engine(SMALL.replace(graphs="auto")).chunk_program is None  # auto: eager on CPU


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_compiled_chunk_equals_the_eager_engine_bit_for_bit(engine: Engine, task: str) -> None:
    rng = np.random.default_rng(0)
    kwargs = {"image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)} if task == "i2v" else {}
    eager = untrained_engine(SMALL.replace(graphs="off"))
    assert_same(stream_chunks(engine, 3, **kwargs), stream_chunks(eager, 3, **kwargs))
    assert engine.chunk_program.plans and engine.chunk_program.arena is not None


def test_compiled_base_cfg_equals_the_eager_engine_bit_for_bit(tiny) -> None:
    """HeliosPipeline (UniPC, CFG 5 as one batch-2 forward), text- and image-to-video, three chunks."""
    config = BASE_32.replace(num_inference_steps=2)
    compiled, eager = (Engine.from_pretrained(tiny["base"], config.replace(graphs=g)) for g in ("chunk", "off"))
    for kwargs in ({}, {"image": IMAGE_32}):
        assert_same(stream_chunks(compiled, 3, **kwargs, **EMBEDS), stream_chunks(eager, 3, **kwargs, **EMBEDS))


@INTERPRETER
def test_compiled_chunk_on_the_triton_kernels_equals_their_eager_run(tiny) -> None:
    """The Triton op table, compiled: its kernels are custom ops, planned like aten ops. Three chunks of
    the distilled pyramid (T2V: the first writes the history's prefix, the next two read the history the
    arena runs wrote) and three base CFG I2V chunks. The interpreter runs one Python program per token
    row, so the other task of each pipeline is left to the reference-op tests above (same body)."""
    runs = {g: Engine.from_pretrained(tiny["distilled"], TRITON_FAST.replace(graphs=g)) for g in ("chunk", "off")}
    assert runs["chunk"].sampler.ops.backend_of("attention") == "triton"
    assert_same(stream_chunks(runs["chunk"], 3, **EMBEDS), stream_chunks(runs["off"], 3, **EMBEDS))
    base = BASE_32.replace(kernels="triton")
    compiled, eager = (Engine.from_pretrained(tiny["base"], base.replace(graphs=g)) for g in ("chunk", "off"))
    assert_same(stream_chunks(compiled, 3, image=IMAGE_32, **EMBEDS), stream_chunks(eager, 3, image=IMAGE_32, **EMBEDS))
    assert set(runs["chunk"].chunk_program.plans) == {ChunkKind(False, True), ChunkKind(False, False)}
    assert set(compiled.chunk_program.plans) == {ChunkKind(False, False)}


class _CountAllocations(TorchDispatchMode):
    """Counts op results whose storage is neither the arena nor an input's (a fresh allocation)."""

    def __init__(self, arena: torch.Tensor) -> None:
        super().__init__()
        self.arena_ptr = arena.untyped_storage().data_ptr()
        self.fresh: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}  # fmt: skip
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs | {self.arena_ptr}:
                self.fresh.append(str(func))
        return out


def steady_state_allocations(engine: Engine) -> tuple[list[str], list[tuple[int, str]]]:
    """(ops that allocated, (bytes, op) of each allocation the profiler saw) in one steady-state chunk.

    The base pipeline with an image: its every chunk is the steady kind (the image gave the prefix)."""
    program = engine.chunk_program
    stream = engine.generate_stream(num_frames=None, seed=4, image=IMAGE_32, **EMBEDS)
    next(stream)  # planned, the arena sized, run once
    generator = torch.Generator().manual_seed(1)
    kind = program.kind(first_chunk=False)
    assert kind == ChunkKind(False, False)
    counter = _CountAllocations(program.arena)
    with counter:  # entered outside the executor: sees each op after the arena view was handed out
        program.run(kind, generator)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        program.run(kind, generator)  # every storage allocation, inside kernels' launchers too
    stream.close()
    allocated = [(e.cpu_memory_usage, e.cpu_parent.name if e.cpu_parent else "?") for e in prof.events()
                 if e.name == "[memory]" and e.cpu_memory_usage > 0]  # fmt: skip
    return counter.fresh, allocated


@pytest.mark.parametrize("kernels", ["reference", pytest.param("triton", marks=INTERPRETER)])
def test_a_steady_state_chunk_allocates_nothing(tiny, kernels: str) -> None:
    fresh, allocated = steady_state_allocations(Engine.from_pretrained(tiny["base"], BASE_32.replace(kernels=kernels)))
    assert fresh == [], f"ops that allocated outside the arena: {sorted(set(fresh))}"
    # PyTorch wraps a Python scalar operand (`x * 0.5`) in a 0-dim float64 host tensor: 8 bytes, with no
    # op around it in the profile, and host memory even for a CUDA run. Anything larger is a buffer.
    buffers = [(n, op) for n, op in allocated if n > 8 or op != "?"]
    assert buffers == [], f"the profiler saw buffers (bytes, op) allocated during a steady-state chunk: {buffers}"


def test_chunk_kinds_follow_amplification_and_the_prefix(engine: Engine, monkeypatch) -> None:
    kinds: list[ChunkKind] = []
    run = ChunkProgram.run
    monkeypatch.setattr(ChunkProgram, "run", lambda self, kind, g: (kinds.append(kind), run(self, kind, g))[1])
    assert engine.spec.amplify_first_chunk  # the demo is a distilled pyramid checkpoint
    stream_chunks(engine, 3)
    assert kinds == [ChunkKind(True, True), ChunkKind(False, False), ChunkKind(False, False)]
    kinds.clear()
    stream_chunks(engine, 2, image=np.zeros((64, 64, 3), dtype=np.uint8))
    assert kinds == [ChunkKind(True, False), ChunkKind(False, False)]  # the image supplied the prefix
    assert set(engine.chunk_program.plans) >= {ChunkKind(True, True), ChunkKind(True, False), ChunkKind(False, False)}


def test_static_noise_holds_the_generator_draws_in_order(engine: Engine) -> None:
    shapes = engine.sampler.noise_shapes(1)
    assert len(shapes) == len(engine.sampler.plan(False).hw)  # start noise + one per transition
    static = StaticNoise(shapes, "cpu")
    static.fill(torch.Generator().manual_seed(11))
    drawn = GeneratorNoise(torch.Generator().manual_seed(11), "cpu")
    assert torch.equal(static.chunk(shapes[0]), drawn.chunk(shapes[0]))
    for s, shape in enumerate(shapes[1:], start=1):
        assert torch.equal(static.block(s, shape), drawn.block(s, shape)), f"transition {s}"
    with pytest.raises(ValueError, match="was not planned"):
        static.block(1, (3, 4))


def test_streams_take_turns_on_one_program(engine: Engine) -> None:
    """Interleaving two streams chunk by chunk gives each the video it gets alone."""
    alone = [stream_chunks(engine, 3, seed=s) for s in (1, 2)]
    a = engine.generate_stream(PROMPT, num_frames=99, seed=1)
    b = engine.generate_stream(PROMPT, num_frames=99, seed=2)
    together: list[list] = [[], []]
    for _ in range(3):
        together[0].append(next(a))
        together[1].append(next(b))
    a.close(), b.close()
    for solo, mixed in zip(alone, together, strict=True):
        assert_same(mixed, solo)


def test_warmup_keeps_the_owners_history_and_resets_its_own(engine: Engine) -> None:
    program = engine.chunk_program
    stream = engine.generate_stream(PROMPT, num_frames=None, seed=5)
    next(stream)
    state = program.history.buffer.clone()
    engine.warmup()
    assert torch.equal(stream._history.buffer, state) and stream._history.prefix_set
    assert not program.history.buffer.any() and not program.history.prefix_set
    after = next(stream)  # re-attached from the stream's own copy
    stream.close()
    assert torch.equal(after.latents, stream_chunks(engine, 2, seed=5)[1].latents)


def test_a_prompt_of_another_shape_is_an_explicit_replan(engine: Engine) -> None:
    program = engine.chunk_program
    stream_chunks(engine, 1)
    assert program.text_shape == TextShape(512)
    embeds = torch.randn(1, 7, engine.transformer.config.text_dim)
    text = engine.transformer.encode_text(embeds)
    with pytest.raises(ValueError, match="call replan"):
        program.set_text(text)
    stream_chunks(engine, 1, prompt_embeds=embeds)  # the stream re-plans between chunks
    assert program.text_shape == TextShape(7) and set(program.plans) == {ChunkKind(True, True)}
    assert program.arena is not None and program.arena.numel() >= program.plans[ChunkKind(True, True)].arena_bytes


def test_the_executor_refuses_a_body_that_departs_from_its_plan(engine: Engine, monkeypatch) -> None:
    """A run whose ops differ from the planned ones (here: one more step) fails at once, naming the step."""
    program = engine.chunk_program
    stream_chunks(engine, 1)
    run_chunk = engine.sampler.run_chunk

    def one_more_op(state, kind, batch) -> None:
        run_chunk(state, kind, batch)
        state.output.mul_(1.0)

    monkeypatch.setattr(engine.sampler, "run_chunk", one_more_op)
    with pytest.raises(PlanMismatch, match="step"):
        program.run(ChunkKind(True, True), torch.Generator())


def test_chunk_program_refuses_what_it_cannot_run(engine: Engine) -> None:
    with pytest.raises(ValueError, match="needs a CUDA sampler"):
        ChunkProgram(engine.sampler, cuda_graph=True)
    fresh = ChunkProgram(engine.sampler)
    with pytest.raises(RuntimeError, match="no prompt bound"):
        fresh.run(ChunkKind(False, False), torch.Generator())


def test_compiled_chunk_through_a_prompt_switch_equals_the_eager_stream() -> None:
    def run(engine: Engine) -> list:
        stream = engine.generate_stream(PROMPT, num_frames=None, seed=9)
        chunks = [next(stream)]
        stream.set_prompt("a busy city street")
        chunks += [next(stream) for _ in range(4)]  # through the blend (3 chunks) and past it
        stream.close()
        return chunks

    compiled = untrained_engine(SMALL)
    expected = run(untrained_engine(SMALL.replace(graphs="off")))
    assert_same(run(compiled), expected)
    buffers = compiled.chunk_program.state.text.keys[0]
    run(compiled)
    assert compiled.chunk_program.state.text.keys[0] is buffers  # a new prompt is copied in, not re-bound


def test_bf16_dmd_stages_after_the_first_run_in_the_model_dtype(monkeypatch) -> None:
    """As the reference: a DMD stage ends on x0 in the model dtype; the next transition and steps use it.
    The compiled chunk equals the eager one bit for bit in bfloat16 too."""
    config = SMALL.replace(dtype="bfloat16", vae_dtype="float32")
    eager = untrained_engine(config.replace(graphs="off"))
    seen: list[torch.dtype] = []
    transition = eager.sampler.ops.stage_transition

    def spy(x, noise, alpha, beta, out=None):
        seen.append(x.dtype)
        return transition(x, noise, alpha, beta, out=out)

    monkeypatch.setattr(eager.sampler.ops, "stage_transition", spy)
    expected = stream_chunks(eager, 2)
    assert seen and set(seen) == {torch.bfloat16}
    compiled = stream_chunks(untrained_engine(config), 2)
    assert all(c.latents.dtype == torch.float32 for c in compiled)
    assert_same(compiled, expected)


def test_stream_kinds_is_the_one_rule() -> None:
    """The next chunk's kind (amplified if it is a distilled model's first; writing the prefix frame if the
    history has none), then the steady kind, each once."""
    yes, no = True, False
    assert stream_kinds(yes, yes, prefix_set=no) == (ChunkKind(True, True), STEADY)  # distilled text-to-video
    assert stream_kinds(yes, yes, prefix_set=yes) == (ChunkKind(True, False), STEADY)  # image/video-to-video
    assert stream_kinds(no, yes, prefix_set=no) == (ChunkKind(False, True), STEADY)  # base text-to-video
    assert stream_kinds(no, yes, prefix_set=yes) == (STEADY,)  # base I2V: every chunk is the steady kind
    assert stream_kinds(yes, no, prefix_set=no) == (ChunkKind(True, False), STEADY)  # no prefix frame kept
    assert stream_kinds(yes, yes, prefix_set=yes, first_chunk=no) == (STEADY,)


def test_the_eager_engine_runs_the_one_chunk(monkeypatch) -> None:
    """graphs="off" runs `ChunkSampler.run_chunk` itself, once per chunk, on the stream's own history, with
    the kinds `stream_kinds` gives (a second, hand-written chunk would not be seen here)."""
    calls: list[tuple[ChunkKind, object]] = []
    body = ChunkSampler.run_chunk

    def recorded(sampler, state, kind, batch) -> None:
        calls.append((kind, state.history))
        body(sampler, state, kind, batch)

    monkeypatch.setattr(ChunkSampler, "run_chunk", recorded)
    eager = untrained_engine(SMALL.replace(graphs="off"))
    with eager.generate_stream(PROMPT, num_frames=99, seed=3) as stream:
        list(stream)
        history = stream._history
    assert [kind for kind, _ in calls] == [ChunkKind(True, True), STEADY, STEADY]
    assert all(h is history for _, h in calls)


class _ReplayByRunning:
    """A stand-in graph on a CPU: replaying it runs the kind's plan on the arena, as the graph's kernels would."""

    def __init__(self, program: ChunkProgram, kind: ChunkKind) -> None:
        self.program, self.kind = program, kind

    def replay(self) -> None:
        self.program._execute(self.kind)


def test_graphs_dropped_mid_stream_are_captured_again(monkeypatch) -> None:
    """A larger arena drops every graph (a stale cached plan re-planned bigger during a stream); the
    stream's next chunk captures the steady kind again, its own run being the warm-up, instead of
    running on the arena from then on."""
    engine = untrained_engine(SMALL)
    program, runs = engine.chunk_program, []
    execute = program._execute
    monkeypatch.setattr(program, "cuda_graph", True)
    monkeypatch.setattr(program, "_execute", lambda kind: (runs.append(("run", kind)), execute(kind))[1])
    monkeypatch.setattr(program, "_capture", lambda kind: (runs.append(("capture", kind)),
                                                           _ReplayByRunning(program, kind))[1])  # fmt: skip
    stream = engine.generate_stream(PROMPT, num_frames=None, seed=3)
    next(stream), next(stream)
    assert set(program.captured) == {ChunkKind(True, True), STEADY}
    program.arena = program.arena[:0]  # as if a re-plan needed more: the arena grows, the graphs go
    program._grow_arena()
    assert program.captured == ()
    runs.clear()
    next(stream), next(stream)
    stream.close()
    assert runs == [("run", STEADY), ("capture", STEADY), ("run", STEADY)], runs
