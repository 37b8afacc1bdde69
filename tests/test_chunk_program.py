"""The whole-chunk program (issue 7, item 1) on CPU: the body a CUDA graph captures, run eagerly.

On a CPU `ChunkProgram.run` executes the same body that CUDA captures once per `ChunkKind`, on the
same static buffers (history, noise, output). These tests pin down what the capture relies on:

- the body equals the per-step path it replaces bit for bit (the engine's stage programs driven by
  the stream with the history and noise outside), over chunks of every kind;
- the static noise holds the draws `GeneratorNoise` makes, in the same order (graph-safe noise that
  does not change the random stream);
- kinds: the first chunk of a distilled model is amplified, a chunk writes the prefix only when the
  history has none yet (text-to-video chunk 0, not image-to-video);
- streams take turns on one program through `attach`, `prepare` keeps the owner's state, and a
  re-plan for another text length drops whatever was captured.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helios_rt import Engine, EngineConfig
from helios_rt.compile.chunk_program import ChunkKind, ChunkProgram
from helios_rt.sampling.noise import GeneratorNoise, StaticNoise

SMALL = EngineConfig(height=64, width=64, device="cpu", dtype="float32", kernels="reference", programs="on")
PROMPT = "a tropical fish among corals"


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_pretrained("demo", SMALL)


def stream_chunks(engine: Engine, chunks: int, seed: int = 3, **kwargs) -> list:
    with engine.generate_stream(PROMPT, num_frames=33 * chunks, seed=seed, **kwargs) as stream:
        return list(stream)


def without_chunk_program(engine: Engine):
    """The same engine driving its stage programs step by step from the stream (the pre-chunk-graph path)."""
    program, engine.chunk_program = engine.chunk_program, None
    return program


def test_programs_on_builds_a_chunk_program_over_uncaptured_stage_programs(engine: Engine) -> None:
    assert isinstance(engine.chunk_program, ChunkProgram)
    assert not engine.chunk_program.cuda_graph and not engine.sampler.programs.cuda_graph  # a CPU: no capture
    assert Engine.from_pretrained("demo", SMALL.replace(programs="off")).chunk_program is None


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_chunk_program_equals_the_step_by_step_programs_bit_for_bit(engine: Engine, task: str) -> None:
    rng = np.random.default_rng(0)
    kwargs = {"image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)} if task == "i2v" else {}
    whole = stream_chunks(engine, 3, **kwargs)
    program = without_chunk_program(engine)
    try:
        stepped = stream_chunks(engine, 3, **kwargs)
    finally:
        engine.chunk_program = program
    for a, b in zip(whole, stepped, strict=True):
        assert torch.equal(a.latents, b.latents), f"chunk {a.index}: latents differ"
        assert np.array_equal(a.frames, b.frames), f"chunk {a.index}: frames differ"


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
        for x, y in zip(solo, mixed, strict=True):
            assert torch.equal(x.latents, y.latents), f"chunk {x.index}"


def test_prepare_keeps_the_owners_history_and_resets_its_own(engine: Engine) -> None:
    program = engine.chunk_program
    stream = engine.generate_stream(PROMPT, num_frames=None, seed=5)
    next(stream)
    state = program.history.buffer.clone()
    engine.warmup()
    assert torch.equal(stream._history.buffer, state) and stream._history.prefix_set
    assert not program.history.buffer.any() and not program.history.prefix_set
    after = next(stream)  # re-attached from the stream's own copy
    stream.close()
    reference = stream_chunks(engine, 2, seed=5)[1]
    assert torch.equal(after.latents, reference.latents)


def test_another_text_length_replans_and_drops_the_kinds_seen(engine: Engine) -> None:
    program = engine.chunk_program
    stream_chunks(engine, 2)
    assert program._warm
    generation = engine.sampler.programs.generation
    embeds = torch.randn(1, 7, engine.transformer.config.text_dim)
    with engine.generate_stream(prompt_embeds=embeds, num_frames=33, seed=1) as stream:
        next(stream)
    assert engine.sampler.programs.generation == generation + 1 and engine.sampler.programs.text_len == 7
    assert program._warm == {ChunkKind(True, True)}  # only what ran after the re-plan


def test_chunk_program_refuses_what_it_cannot_run(engine: Engine) -> None:
    with pytest.raises(ValueError, match="needs a CUDA sampler"):
        ChunkProgram(engine.sampler, cuda_graph=True)
    fresh = ChunkProgram(engine.sampler)
    with pytest.raises(RuntimeError, match="no prompt bound"):
        fresh.run(ChunkKind(False, False), torch.Generator())


def test_chunk_program_over_the_eager_op_table_equals_the_eager_stream_through_a_prompt_switch() -> None:
    """Without stage programs (the Triton path on CUDA) the body runs the eager sampler on static text K/V."""
    eager = Engine.from_pretrained("demo", SMALL.replace(programs="off"))
    assert eager.chunk_program is None

    def run(engine: Engine) -> list:
        stream = engine.generate_stream(PROMPT, num_frames=None, seed=9)
        chunks = [next(stream)]
        stream.set_prompt("a busy city street")
        chunks += [next(stream) for _ in range(4)]  # through the blend (3 chunks) and past it
        stream.close()
        return chunks

    expected = run(eager)
    eager.chunk_program = ChunkProgram(eager.sampler)
    for a, b in zip(run(eager), expected, strict=True):
        assert torch.equal(a.latents, b.latents), f"chunk {a.index}"
    text_buffers = eager.chunk_program._text.keys[0]
    run(eager)
    assert eager.chunk_program._text.keys[0] is text_buffers  # a new prompt is copied in, not re-bound


def test_bf16_dmd_stages_after_the_first_run_in_the_model_dtype(monkeypatch) -> None:
    """As the reference: a DMD stage ends on x0 in the model dtype; the next transition and steps use it.

    Through the stage programs (per-stage latent dtype) the chunk equals the eager sampler given the
    programs' attention math, bit for bit, in bfloat16 too.
    """
    from helios_rt.compile.workspace import ArenaOps

    config = SMALL.replace(dtype="bfloat16", vae_dtype="float32")
    eager = Engine.from_pretrained("demo", config.replace(programs="off"))
    eager.transformer.ops = ArenaOps(eager.transformer.ops, "math")
    seen: list[torch.dtype] = []
    transition = eager.sampler.ops._resolved["stage_transition"]

    def spy(x, noise, alpha, beta, out=None):
        seen.append(x.dtype)
        return transition(x, noise, alpha, beta, out=out)

    monkeypatch.setitem(eager.sampler.ops._resolved, "stage_transition", spy)
    expected = stream_chunks(eager, 2)
    assert seen and set(seen) == {torch.bfloat16}
    programs = Engine.from_pretrained("demo", config)
    dtypes = {hw: p.io.latents.dtype for hw, p in programs.sampler.programs.programs.items()}
    assert sorted(dtypes.values(), key=str) == [torch.bfloat16, torch.bfloat16, torch.float32]
    for a, b in zip(stream_chunks(programs, 2), expected, strict=True):
        assert a.latents.dtype == torch.float32 and torch.equal(a.latents, b.latents), f"chunk {a.index}"
