"""The engine running its chunks through static stage programs (issue 5, items 3 and 5).

`test_engine_oracle.py` runs its six (pipeline x task) pairs with `programs="on"` (the default
"auto" turns programs on only for CUDA);
this module checks the programs against the eager path (`programs="off"`) and what they promise:

- the demo engine gives the same frames both ways. The programs compute attention as
  softmax(q k^T) v from `bmm`/`_softmax` (ArenaOps' "math" mode: `F.scaled_dot_product_attention`'s
  fused aten kernel has no out= variant and cannot write into the arena), the eager reference
  through SDPA: with the eager engine given the same attention math the two are bit-identical
  (latents and frames); with SDPA they differ by float32 reordering (measured ~4-7e-6 on latents of
  magnitude ~5, frames by at most one uint8 level);
- in steady state (chunk >= 2) every transformer forward and flow step of a chunk runs inside the
  programs and every intermediate lies in the planned arena; text K/V are set once per prompt,
  history tokens once per chunk;
- the CFG programs (batch-2 forward + combine, CFG-Zero* zero-init steps) equal the eager math;
- a stage that cannot be planned, or programs="on" with Triton kernels, raises with the reason.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.pipelines import HEIGHT, WIDTH, build_pipeline, prompt_embeds, save_pipeline
from test_program import TEXT_LEN, Inputs, layouts, tiny_model

from helios_rt import Engine, EngineConfig
from helios_rt.compile import program as program_module
from helios_rt.compile.program import Program, StepSpec
from helios_rt.compile.workspace import ArenaOps, UnplannableOp
from helios_rt.ops import OpSet
from helios_rt.sampling.chunk import ChunkSampler

SMALL = EngineConfig(height=64, width=64, device="cpu", dtype="float32", kernels="reference")
PROMPT = "a tropical fish among corals"


def stream_chunks(engine: Engine, chunks: int = 2, seed: int = 3):
    with engine.generate_stream(PROMPT, num_frames=33 * chunks, seed=seed) as stream:
        return list(stream)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_pretrained("demo", SMALL.replace(programs="on"))


def test_one_program_per_stage_built_with_the_engine(engine: Engine) -> None:
    programs = engine.sampler.programs
    assert programs is not None and set(programs.programs) == set(engine.sampler.plan(False).hw)
    largest, *others = programs.programs.values()
    assert largest.layout.n_tokens == max(p.layout.n_tokens for p in programs.programs.values())
    for p in others:  # the smaller stages reuse the largest stage's arena and conditioning buffers
        assert p.arena is largest.arena
        assert p.io.text_keys is largest.io.text_keys and p.io.history is largest.io.history
    assert Engine.from_pretrained("demo", SMALL).sampler.programs is None  # "auto" = on only for CUDA
    assert Engine.from_pretrained("demo", SMALL.replace(programs="off")).sampler.programs is None


def test_demo_frames_equal_the_eager_engine(engine: Engine) -> None:
    on = stream_chunks(engine)
    off = stream_chunks(Engine.from_pretrained("demo", SMALL.replace(programs="off")))
    same_math = Engine.from_pretrained("demo", SMALL.replace(programs="off"))
    same_math.transformer.ops = ArenaOps(same_math.transformer.ops, "math")  # the programs' attention
    exact = stream_chunks(same_math)
    for a, b, c in zip(on, off, exact, strict=True):
        assert torch.equal(a.latents, c.latents) and np.array_equal(a.frames, c.frames), f"chunk {a.index}"
        diff = (a.latents - b.latents).abs().max().item()
        assert diff <= 1e-4, f"chunk {a.index}: programs vs SDPA eager latents differ by {diff:.2e}"
        assert np.abs(a.frames.astype(np.int16) - b.frames.astype(np.int16)).max() <= 1


def test_steady_state_chunk_runs_in_the_programs_and_allocates_in_the_arena(engine, monkeypatch) -> None:
    calls = {"set_text": 0, "set_history": 0}
    runs: list = []
    for name in calls:
        original = getattr(Program, name)

        def counted(self, *args, _original=original, _name=name):
            calls[_name] += 1
            return _original(self, *args)

        monkeypatch.setattr(Program, name, counted)
    stream = engine.generate_stream(PROMPT, num_frames=None, seed=4)
    for _ in range(2):
        next(stream)
    assert calls == {"set_text": 1, "set_history": 2}

    execute = Program.execute
    monkeypatch.setattr(Program, "execute", lambda self, record_ranges=False: runs.append((self, execute(self, True))))

    def no_eager_forward(*args, **kwargs):
        raise AssertionError("a transformer forward ran outside the programs")

    monkeypatch.setattr(ChunkSampler, "_predict", no_eager_forward)
    next(stream)
    stream.close()
    assert calls == {"set_text": 1, "set_history": 3}
    assert len(runs) == sum(engine.spec.steps)  # one run per step: forward + flow step
    params = [p for p in engine.transformer.parameters()]
    for prog, executor in runs:
        io = prog.io
        persistent = [*params, io.latents, io.start, io.timestep, io.sigma_t, io.sigma_next, io.history,
                      *io.text_keys, *io.text_values, io.rope_cos, io.rope_sin, io.history_mod, io.output]  # fmt: skip
        spans = [(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in persistent]
        arena = (prog.arena.data_ptr(), prog.arena.numel())
        for step, op, start, end in executor.ranges:
            inside = [s for s, n in [arena, *spans] if s <= start and end <= s + n]
            assert inside, f"step {step} ({op}) returned storage outside the arena and the static buffers"
            assert not prog.plan.steps[step].allocs or inside[0] == arena[0], f"step {step} ({op}) allocated"


def test_cfg_programs_equal_the_eager_guided_prediction() -> None:
    model, layout = tiny_model(), layouts()[1]
    ref = OpSet("cpu", "reference")
    math = ArenaOps(ref, "math")
    inputs = Inputs(model, layout, 2, 0)  # batch 2: [cond; uncond] text of a batch-1 sample
    cond = Inputs(model, layout, 1, 1)
    x = cond.latents
    for spec in (StepSpec(False, 5.0, False), StepSpec(False, 4.0, True), StepSpec(True, 3.0, True)):
        prog = Program(model, layout, batch=1, text_len=TEXT_LEN, step=spec)
        rope = (prog.io.rope_cos, prog.io.rope_sin)
        prog.set_text(inputs.text)
        prog.set_history(cond.history)
        saved, model.ops = model.ops, math
        try:
            v = model(torch.cat([x, x]), inputs.timestep, inputs.text, layout, rope, cond.history,
                      model.history_modulation(), unpatchify=not spec.flow_step)  # fmt: skip
        finally:
            model.ops = saved
        guided = ref.cfg_combine(v, spec.guidance_scale, spec.cfg_zero_star)
        for zero in (False, True) if spec.cfg_zero_star else (None,):
            want = v[:1] * 0.0 if zero else guided
            if spec.flow_step:
                want = ref.flow_step(want, x, cond.start, cond.sigma_t, cond.sigma_next, model.config.patch_size)
            prog.set_inputs(x, cond.start, inputs.timestep, cond.sigma_t, cond.sigma_next, zero_init=zero)
            got = prog.run()
            assert torch.equal(got, want), f"{spec}, zero_init={zero}"
            if zero and not spec.flow_step:
                assert torch.equal(got.signbit(), want.signbit())  # `cond * 0.0` keeps signed zeros


def test_unplannable_stage_raises_with_the_reason(monkeypatch) -> None:
    step = program_module._step

    def with_random(model, ops, layout, io, spec=program_module.DMD):
        step(model, ops, layout, io, spec)
        io.output.add_(torch.randn_like(io.output))

    monkeypatch.setattr(program_module, "_step", with_random)
    with pytest.raises(UnplannableOp, match=r"stage .*draws random numbers.*programs='off'"):
        Engine.from_pretrained("demo", SMALL.replace(programs="on"))
    assert Engine.from_pretrained("demo", SMALL.replace(programs="off")).sampler.programs is None


def test_programs_on_with_triton_kernels_is_refused() -> None:
    pytest.importorskip("triton")
    try:
        OpSet("cpu", "triton")
    except (RuntimeError, ValueError) as err:
        pytest.skip(f"Triton kernels unavailable here: {err}")
    with pytest.raises(ValueError, match="static programs run the reference ops"):
        Engine.from_pretrained("demo", SMALL.replace(kernels="triton", programs="on"))
    assert Engine.from_pretrained("demo", SMALL.replace(kernels="triton")).sampler.programs is None


def test_config_rejects_an_unknown_programs_value() -> None:
    with pytest.raises(ValueError, match=r"EngineConfig\.programs='yes'"):
        EngineConfig(programs="yes")


@pytest.mark.oracle
def test_cfg_engine_through_programs_equals_the_eager_engine(tmp_path) -> None:
    """The base pipeline (UniPC + CFG 5.0, batch-2 programs) on and off, prompts of 12 tokens (re-planned)."""
    folder = save_pipeline(build_pipeline("base"), tmp_path / "base")
    config = EngineConfig(height=HEIGHT, width=WIDTH, device="cpu", dtype="float32", kernels="reference",
                          num_inference_steps=4, guidance_scale=5.0)  # fmt: skip
    latents = {}
    for programs in ("on", "off"):  # "on": what test_engine_oracle.py runs
        engine = Engine.from_pretrained(folder, config.replace(programs=programs))
        assert (engine.sampler.programs is not None) == (programs == "on")
        with engine.generate_stream(prompt_embeds=prompt_embeds(1), negative_prompt_embeds=prompt_embeds(2),
                                    num_frames=66, seed=1234) as stream:  # fmt: skip
            latents[programs] = torch.cat([c.latents for c in stream], dim=2)
        if programs == "on":
            assert engine.sampler.programs.text_len == 12 and engine.sampler.programs.step.guided
    diff = (latents["on"] - latents["off"]).abs().max().item()
    assert diff <= 1e-4, f"CFG programs vs eager latents differ by {diff:.2e}"


def test_cfg_programs_plan_each_half_at_its_own_text_length(tmp_path) -> None:
    """Positive 24 tokens, negative 16: the programs re-plan for the split and equal the eager engine
    (which test_engine_fidelity.py checks against diffusers)."""
    folder = save_pipeline(build_pipeline("base"), tmp_path / "base")
    config = EngineConfig(height=HEIGHT, width=WIDTH, device="cpu", dtype="float32", kernels="reference",
                          num_inference_steps=2, guidance_scale=5.0)  # fmt: skip
    latents = {}
    for programs in ("on", "off"):
        engine = Engine.from_pretrained(folder, config.replace(programs=programs))
        with engine.generate_stream(prompt_embeds=prompt_embeds(1, length=24),
                                    negative_prompt_embeds=prompt_embeds(2, length=16),
                                    num_frames=33, seed=1234) as stream:  # fmt: skip
            latents[programs] = torch.cat([c.latents for c in stream], dim=2)
        if programs == "on":
            planned = engine.sampler.programs
            assert (planned.text_len, planned.text_lengths) == (24, (24, 16))
            assert planned.largest.io.text_lengths == (24, 16)
    diff = (latents["on"] - latents["off"]).abs().max().item()
    assert diff <= 1e-4, f"CFG programs vs eager latents differ by {diff:.2e}"
