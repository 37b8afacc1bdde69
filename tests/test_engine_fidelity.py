"""The engine against diffusers on inputs the six engine oracles do not use.

- A Base checkpoint exactly as diffusers saves and loads it: `HeliosScheduler(stages=1)` with the
  class-default four `stage_range` entries, and a transformer config carrying the official
  training code's keys at their inactive values.
- Positive and negative prompt embeddings of different lengths: each CFG half must attend to its
  own tokens, as the reference (which runs each prompt at its own length) does.

Each runs on the reference op table and on the Triton kernels (CPU interpreter; skipped when the
kernels are compiled for a GPU, where test_gpu_* cover them). Bounds: the engine oracles' (latents
1e-3 for the reference ops, test_engine_triton's 1e-4 for Triton, frames within one uint8 level);
measured here: 1.0e-5 and 1.6e-5 (reference ops, programs on/off), 6.7e-6 (Triton). Before the
fix, unequal lengths moved latents by 0.23 and the four-entry scheduler config was refused.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from support.pipelines import build_pipeline, decode_like_pipeline, prompt_embeds, save_pipeline

from helios_rt import Engine, EngineConfig

SEED = 1234
SIZE = 32  # 2x2 tokens per latent frame, a quarter of the 64x64 oracles': the Triton interpreter runs one
# Python program per token row in the row kernels, and this keeps the four runs within CI's budget
STEPS = 2  # UniPC: a first-order step, then the second-order predictor with the corrector
TOL = {"reference": 1e-3, "triton": 1e-4, "sdpa": 1e-3}
TRAINING_KEYS = {"restrict_self_attn": False, "restrict_lora": False, "is_train_restrict_lora": False,
                 "restrict_lora_rank": 64}  # fmt: skip


def _kernels(name: str):
    marks = []
    if name == "triton":
        marks.append(
            pytest.mark.skipif(
                os.environ.get("TRITON_INTERPRET") != "1",
                reason="the Triton interpreter run (TRITON_INTERPRET=1, set by conftest without CUDA)",
            )
        )
    return pytest.param(name, marks=marks)


KERNELS = [_kernels("reference"), _kernels("triton")]
pytestmark = pytest.mark.oracle


def run_both(
    pipe, folder, kernels: str, pos: torch.Tensor, neg: torch.Tensor, num_frames: int, attention="auto", graphs="auto"
):
    """(engine latents, engine frames, reference latents, reference frames) of one Base CFG-5 run."""
    ref = pipe(
        prompt_embeds=pos,
        negative_prompt_embeds=neg,
        height=SIZE,
        width=SIZE,
        num_frames=num_frames,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(SEED),
        output_type="latent",
    ).frames
    chunks = num_frames // 33
    config = EngineConfig(height=SIZE, width=SIZE, device="cpu", dtype="float32", kernels=kernels,
                          num_inference_steps=STEPS, guidance_scale=5.0, attention=attention,
                          graphs=graphs)  # fmt: skip
    engine = Engine.from_pretrained(folder, config)
    assert engine.sampler.ops.backend_of("attention") == (kernels if attention == "auto" else attention)
    with engine.generate_stream(prompt_embeds=pos, negative_prompt_embeds=neg, num_frames=num_frames, seed=SEED) as s:
        out = list(s)
    latents = torch.cat([c.latents for c in out], dim=2)
    frames = np.concatenate([c.frames for c in out])
    return latents, frames, ref[:, :, -latents.shape[2] :], decode_like_pipeline(pipe, ref, chunks)


def assert_matches(latents, frames, ref_latents, ref_frames, kernels: str) -> None:
    diff = (latents - ref_latents).abs().max().item()
    assert diff <= TOL[kernels], f"{kernels}: latents differ by {diff:.2e} (> {TOL[kernels]:g})"
    level = np.abs(frames[: len(ref_frames)].astype(np.int16) - ref_frames.astype(np.int16))
    assert level.max() <= 1, f"{(level > 1).sum()} frame values differ by more than one level (max {level.max()})"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    pipe = build_pipeline("base")
    return pipe, save_pipeline(pipe, tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def as_diffusers_saves_it(tmp_path_factory):
    """A Base pipeline whose scheduler keeps the class-default stage_range, saved, with the training keys added."""
    from diffusers import HeliosScheduler, HeliosTransformer3DModel

    pipe = build_pipeline("base")
    pipe.scheduler = HeliosScheduler(stages=1, use_dynamic_shifting=True)
    folder = save_pipeline(pipe, tmp_path_factory.mktemp("base-default-range"))
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["stages"] == 1 and len(scheduler["stage_range"]) == 4
    config_path = folder / "transformer" / "config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | TRAINING_KEYS))
    HeliosTransformer3DModel.from_config(
        HeliosTransformer3DModel.load_config(folder / "transformer")
    )  # diffusers takes it
    return pipe, folder


@pytest.mark.parametrize("kernels", KERNELS)
def test_a_checkpoint_that_diffusers_loads(as_diffusers_saves_it, kernels: str) -> None:
    pipe, folder = as_diffusers_saves_it
    result = run_both(pipe, folder, kernels, prompt_embeds(1), prompt_embeds(2), num_frames=33)
    assert_matches(*result, kernels)


@pytest.mark.parametrize("kernels", KERNELS)
def test_positive_and_negative_embeddings_of_different_lengths(base, kernels: str) -> None:
    pipe, folder = base
    pos, neg = prompt_embeds(1, length=24), prompt_embeds(2, length=16)
    result = run_both(pipe, folder, kernels, pos, neg, num_frames=66)  # chunk 2 runs with history
    assert_matches(*result, kernels)


@pytest.mark.parametrize("graphs", ["off", "chunk"])
def test_a_library_attention_backend_with_cfg_rows_of_different_lengths(base, graphs: str) -> None:
    """The backend table's library ops (SDPA here: it runs on a CPU; FA2/FA3 share its adapter) write each
    CFG row's prefix attention into its `out=` row, eager and compiled."""
    pipe, folder = base
    pos, neg = prompt_embeds(1, length=24), prompt_embeds(2, length=16)
    latents, frames, ref_latents, ref_frames = run_both(pipe, folder, "reference", pos, neg, 33, "sdpa", graphs)
    assert_matches(latents, frames, ref_latents, ref_frames, "sdpa")
