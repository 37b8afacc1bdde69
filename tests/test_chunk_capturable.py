"""The chunk body a CUDA graph captures makes no host decision on tensor values (issue 7, item 1).

A CUDA graph records kernels, not Python: a body that reads a device value on the host (`.item()`,
`bool(t)`, `nonzero`, a data-dependent shape) either fails to capture or bakes in the value of the
capture. Running the body on meta tensors finds every such read without a GPU: meta tensors have
shapes and dtypes but no values, so any of them raises. The body runs here for each way a chunk is
sampled (distilled DMD pyramid, the pyramid with UniPC + CFG-Zero* as in Helios-Mid, the base
single-resolution UniPC + CFG), with and without stage programs, over every chunk kind.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from helios_rt import Engine, EngineConfig
from helios_rt.compile.chunk_program import ChunkKind, ChunkProgram
from helios_rt.compile.program import meta_model
from helios_rt.sampling.chunk import ChunkSampler
from helios_rt.sampling.pyramid import block_noise_factor
from helios_rt.sampling.schedules import ScheduleConfig

META = torch.device("meta")
CONFIG = EngineConfig(height=64, width=64, device="cpu", dtype="float32", kernels="reference")


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


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_pretrained("demo", CONFIG)


@pytest.mark.parametrize("programs", [False, True], ids=["eager-ops", "stage-programs"])
@pytest.mark.parametrize("how", ["distilled", "mid", "base"])
def test_chunk_body_runs_on_meta_tensors(engine: Engine, how: str, programs: bool) -> None:
    spec = sampling_specs(engine)[how]
    model = meta_model(engine.transformer)
    sampler = ChunkSampler(model, spec, engine.history_layout, engine.latent_hw, META)
    if spec.pyramid:  # factored once per engine on the host before any capture (a Cholesky needs values)
        sampler._block_factor = block_noise_factor(spec.schedule.gamma, model.config.patch_size[1:]).to(META)
    if programs:
        sampler.compile(batch=1, text_len=16, cuda_graph=False)
    program = ChunkProgram(sampler)
    batch = 2 if spec.uses_cfg else 1
    program.set_text(model.encode_text(torch.zeros(batch, 16, model.config.text_dim, device=META)))
    kinds = {ChunkKind(spec.amplify_first_chunk, True), ChunkKind(spec.amplify_first_chunk, False),
             ChunkKind(False, False)}  # fmt: skip
    for kind in sorted(kinds, key=str):
        out = program.run(kind, torch.Generator().manual_seed(0))
        assert out.device == META and out.shape == (1, model.config.in_channels, 9, *engine.latent_hw)


def test_a_host_read_of_a_value_fails_on_meta() -> None:
    """The premise: a value-dependent read on a meta tensor raises (so the test above can fail)."""
    with pytest.raises(RuntimeError):
        bool(torch.zeros(1, device=META).sum() > 0)
