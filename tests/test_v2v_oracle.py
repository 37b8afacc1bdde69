"""V2V from a video longer than the history, against diffusers' pipeline (which encodes every window).

The engine encodes only the windows its history can see (test_v2v_windows.py); here a 139-frame
input has four windows after a 7-frame offset, the oldest of which the engine never encodes, and
its first chunk must still be the pipeline's, at the engine oracles' bound (test_engine_oracle.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from support.pipelines import HEIGHT, WIDTH, build_pipeline, decode_like_pipeline, prompt_embeds, sample_video

from helios_rt import Engine, EngineConfig

SEED = 1234
FRAMES = 4 * 33 + 7


@pytest.mark.oracle
@pytest.mark.slow  # the reference encodes all four windows: ~30-80 s on two CPU cores
def test_long_video_first_chunk_matches_pipeline(tmp_path) -> None:
    pipe = build_pipeline("distilled")
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    video = sample_video(FRAMES)
    ref = pipe(
        prompt_embeds=prompt_embeds(1),
        video=[Image.fromarray(f) for f in video],
        height=HEIGHT,
        width=WIDTH,
        num_frames=33,
        pyramid_num_inference_steps_list=[2, 2, 2],
        is_amplify_first_chunk=True,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(SEED),
        output_type="latent",
    ).frames
    config = EngineConfig(
        height=HEIGHT,
        width=WIDTH,
        device="cpu",
        dtype="float32",
        kernels="reference",
        pyramid_steps=(2, 2, 2),
        amplify_first_chunk=True,
    )
    engine = Engine.from_pretrained(tmp_path, config)
    with engine.generate_stream(prompt_embeds=prompt_embeds(1), video=video, num_frames=33, seed=SEED) as stream:
        chunk = next(stream)
    diff = (chunk.latents - ref[:, :, -9:]).abs()
    assert diff.max().item() <= 1e-3, f"latents differ by {diff.max().item():.2e} (> 1e-3) at {diff.argmax().item()}"
    level = np.abs(chunk.frames.astype(np.int16) - decode_like_pipeline(pipe, ref, chunks=1).astype(np.int16))
    assert level.max() <= 1, f"{(level > 1).sum()} frame values differ by more than one level (max {level.max()})"
