"""The engine with `kernels="triton"` against diffusers' HeliosPyramidPipeline.

One small config of `test_engine_oracle.py`: the distilled pyramid (DMD) pipeline, text-to-video,
three chunks (the second and third run with short/mid/long history terms), on the Triton CPU
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no CUDA; the test is skipped
otherwise). The op table must pick Triton for every op the engine runs that has a kernel: the Q/K
prologue, attention, modulated LayerNorm and gated residual inside the transformer, and the
sampler's flow step and stage transition (cfg_combine too, though this no-CFG config does not call
it: the Base pipeline with CFG 5 runs on the Triton kernels in test_engine_fidelity.py). One DMD step per
stage and no amplified first chunk keep it to 9 transformer forwards (~1.5 min on the interpreter);
the other five pairs run with the reference ops in test_engine_oracle.py.

Tolerance: both sides run float32, but the kernels order the arithmetic differently (attention
with an online softmax over key tiles, norm statistics in one pass, modulation and residuals fused,
the flow step in float64 without rounding x0 to float32 in between), so every forward differs by
float32 rounding and the autoregressive history carries it into later chunks. Measured on this
config (latents up to 6.4 in magnitude, float32 ulp there 4.8e-7): reference ops vs pipeline
7.6e-6, Triton ops vs pipeline 7.7e-6 (chunk by chunk 4.2e-6, 6.2e-6, 7.7e-6), Triton vs reference
ops 6.1e-6, i.e. ~15 ulps, reordering-level. The bound, 1e-4, leaves ~13x headroom for other CPUs'
BLAS and reduction orders, yet is 10x tighter than the reference oracle's 1e-3: a kernel error of
the size of a history term, a wrong segment boundary or a swapped half moves latents by O(0.1-1)
and fails it. Frames: at most one uint8 level, as in the oracle (the VAE runs identically).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from support.pipelines import HEIGHT, WIDTH, build_pipeline, decode_like_pipeline, prompt_embeds, save_pipeline

from helios_rt import Engine, EngineConfig

NUM_FRAMES = 99  # three chunks of 33
SEED = 1234
STEPS = (1, 1, 1)  # one DMD step per pyramid stage, no amplified first chunk
TOL = 1e-4
SAMPLER_OPS = ("flow_step", "stage_transition", "cfg_combine")
MODEL_OPS = ("qk_norm_rope", "attention", "modulate_layernorm", "gate_residual")  # what the transformer calls

pytestmark = [
    pytest.mark.oracle,
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1",
        reason="runs the kernels on the Triton CPU interpreter (TRITON_INTERPRET=1, set by conftest without CUDA)",
    ),
]


def run_pipeline(pipe) -> tuple[torch.Tensor, np.ndarray]:
    """The pipeline's latents, and its frames decoded chunk by chunk (as test_engine_oracle.run_reference)."""
    latents = pipe(
        prompt_embeds=prompt_embeds(1),
        negative_prompt_embeds=prompt_embeds(2),
        height=HEIGHT,
        width=WIDTH,
        num_frames=NUM_FRAMES,
        pyramid_num_inference_steps_list=list(STEPS),
        is_amplify_first_chunk=False,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(SEED),
        output_type="latent",
    ).frames
    return latents, decode_like_pipeline(pipe, latents)


def run_engine(folder, kernels: str) -> tuple[Engine, torch.Tensor, np.ndarray]:
    config = EngineConfig(
        height=HEIGHT,
        width=WIDTH,
        device="cpu",
        dtype="float32",
        kernels=kernels,
        pyramid_steps=STEPS,
        amplify_first_chunk=False,
    )
    engine = Engine.from_pretrained(folder, config)
    with engine.generate_stream(
        prompt_embeds=prompt_embeds(1), negative_prompt_embeds=prompt_embeds(2), num_frames=NUM_FRAMES, seed=SEED
    ) as stream:
        chunks = list(stream)
    assert [c.index for c in chunks] == [0, 1, 2]
    latents = torch.cat([c.latents for c in chunks], dim=2)
    return engine, latents, np.concatenate([c.frames for c in chunks])


def test_engine_with_triton_kernels_matches_pipeline(tmp_path) -> None:
    pipe = build_pipeline("distilled")
    folder = save_pipeline(pipe, tmp_path / "distilled")
    ref_latents, ref_frames = run_pipeline(pipe)

    engine, latents, frames = run_engine(folder, "triton")
    ops = engine.sampler.ops
    assert ops is engine.transformer.ops, "the sampler must use the engine's op table"
    chosen = {name: ops.backend_of(name) for name in SAMPLER_OPS + MODEL_OPS}
    assert chosen == dict.fromkeys(chosen, "triton"), f"ops not on Triton: {chosen}"

    ref_latents = ref_latents[:, :, -latents.shape[2] :]
    diff = (latents - ref_latents).abs()
    assert diff.max().item() <= TOL, f"latents differ by {diff.max().item():.2e} (> {TOL:g}) at {diff.argmax().item()}"
    level = np.abs(frames[: len(ref_frames)].astype(np.int16) - ref_frames.astype(np.int16))
    assert level.max() <= 1, f"{(level > 1).sum()} frame values differ by more than one level (max {level.max()})"
