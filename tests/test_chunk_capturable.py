"""The chunk a CUDA graph captures plans on meta tensors, whatever the op table.

A CUDA graph records kernels, not Python: a body that reads a device value on the host (`.item()`,
`bool(t)`, `nonzero`, a data-dependent shape) either fails to capture or bakes in the value of the
capture, and one that allocates outside the planned arena draws on the graph's pool. Planning the
body on meta tensors finds both without a GPU: meta tensors have no values (a host read raises), and
the planner refuses random draws and ops that cannot write into a given buffer. The body is planned
here for each way a chunk is sampled (distilled DMD pyramid, the pyramid with UniPC + CFG-Zero* as in
Helios-Mid, the base single-resolution UniPC + CFG), for the reference and the Triton op tables (the
kernels are custom ops with fake implementations: no launch happens), over every chunk kind.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from helios_rt import Engine
from helios_rt.compile.chunk_program import META, ChunkKind, ChunkProgram, TextShape, meta_model
from helios_rt.compile.workspace import UnplannableOp
from helios_rt.ops import OpSet
from helios_rt.sampling.chunk import ChunkSampler
from helios_rt.sampling.pyramid import block_noise_factor
from helios_rt.sampling.schedules import ScheduleConfig


def sampling_specs(engine: Engine) -> dict:
    distilled = engine.spec
    unipc = ScheduleConfig.from_dict({"stages": 3, "use_dynamic_shifting": True}, kind="unipc")
    mid = replace(distilled, schedule=unipc, is_distilled=False, cfg_zero_star=True, steps=(2, 2, 2),
                  guidance_scale=5.0, amplify_first_chunk=False)  # fmt: skip
    base_schedule = ScheduleConfig.from_dict(
        {"stages": 1, "stage_range": [0.0, 1.0], "use_dynamic_shifting": True}, kind="unipc"
    )
    base = replace(mid, schedule=base_schedule, pyramid=False, cfg_zero_star=False, steps=(3,))
    return {"distilled": distilled, "mid": mid, "base": base}


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("how", ["distilled", "mid", "base"])
def test_chunk_plans_on_meta_tensors(tiny_engine: Engine, how: str, kernels: str) -> None:
    spec = sampling_specs(tiny_engine)[how]
    ops = OpSet.for_planning(kernels)
    real = tiny_engine.transformer
    model = meta_model(real.config, real.dtype, real.precision, ops, like=real)
    sampler = ChunkSampler(model, spec, tiny_engine.history_layout, tiny_engine.latent_hw, META, ops)
    if spec.pyramid:  # factored once per engine on the host before any capture (a Cholesky needs values)
        sampler.set_block_factor(block_noise_factor(spec.schedule.gamma, model.config.patch_size[1:]))
    program = ChunkProgram(sampler, text=TextShape(16))
    assert ops.backend_of("attention") == kernels
    kinds = {ChunkKind(spec.amplify_first_chunk, True), ChunkKind(spec.amplify_first_chunk, False),
             ChunkKind(False, False)}  # fmt: skip
    for kind in sorted(kinds, key=str):
        plan = program.plan(kind)
        assert plan.arena_bytes >= plan.lower_bound_bytes > 0
        fused = [s.op for s in plan.steps if s.op.startswith("helios_rt.")]
        assert bool(fused) == (kernels == "triton"), f"{kernels}: custom ops in the plan: {sorted(set(fused))}"
        if kernels == "triton":
            assert "helios_rt.attention.default" in fused and "helios_rt.modulate_layernorm.default" in fused


def test_a_host_read_in_the_body_fails_the_plan(tiny_engine: Engine, monkeypatch) -> None:
    """The premise: a value-dependent read in the body fails planning, naming the op."""
    real = tiny_engine.transformer
    model = meta_model(real.config, real.dtype, real.precision, real.ops, like=real)
    sampler = ChunkSampler(model, tiny_engine.spec, tiny_engine.history_layout, tiny_engine.latent_hw, META)
    sampler.set_block_factor(block_noise_factor(0.25, model.config.patch_size[1:]))
    program = ChunkProgram(sampler, text=TextShape(16))
    run_chunk = ChunkSampler.run_chunk  # patched on the class: the program plans on a meta copy of the sampler

    def with_a_host_read(self, state, kind, batch) -> None:
        run_chunk(self, state, kind, batch)
        state.output.mul_(float(state.output.sum()))

    monkeypatch.setattr(ChunkSampler, "run_chunk", with_a_host_read)
    with pytest.raises(UnplannableOp, match="reads a tensor value on the host"):
        program.plan(ChunkKind(False, False))
