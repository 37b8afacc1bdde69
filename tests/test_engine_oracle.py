"""The engine against diffusers' Helios pipelines: same small weights, seeds and prompt embeddings.

Six (pipeline x task) pairs, three chunks each. The final latents must agree to 1e-3 (float32: both
sides run the same math; differences come from operation order and are ~1e-6 per forward, growing
through the autoregressive history) and the uint8 frames by at most one level (a value that lands
within rounding distance of a .5 boundary may round either way). The engine runs through its static
compiled chunk (`graphs="chunk"`: planned on meta, run from its arena); test_chunk_program.py
compares it with the eager path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from support.pipelines import (
    HEIGHT,
    WIDTH,
    build_pipeline,
    decode_like_pipeline,
    prompt_embeds,
    sample_image,
    sample_video,
    save_pipeline,
)

from helios_rt import Engine, EngineConfig

NUM_FRAMES = 99  # three chunks of 33
SEED = 1234

SETTINGS = {
    "distilled": (
        dict(pyramid_num_inference_steps_list=[2, 2, 2], is_amplify_first_chunk=True, guidance_scale=1.0),
        dict(pyramid_steps=(2, 2, 2), amplify_first_chunk=True),
    ),
    "base": (dict(num_inference_steps=4, guidance_scale=5.0), dict(num_inference_steps=4, guidance_scale=5.0)),
}


@pytest.fixture(scope="module", params=["distilled", "base"])
def pipeline_and_folder(request, tmp_path_factory):
    pipe = build_pipeline(request.param)
    return request.param, pipe, save_pipeline(pipe, tmp_path_factory.mktemp(request.param))


def task_inputs(task: str) -> tuple[dict, dict]:
    """(diffusers kwargs, helios_rt kwargs) of one task."""
    if task == "t2v":
        return {}, {}
    if task == "i2v":
        img = sample_image()
        return {"image": Image.fromarray(img)}, {"image": img}
    vid = sample_video()
    return {"video": [Image.fromarray(f) for f in vid]}, {"video": vid}


def run_reference(pipe, kind: str, task: str) -> tuple[torch.Tensor, np.ndarray]:
    """The pipeline's latents, and its frames: each chunk decoded on its own, as the pipeline does."""
    ref_kwargs, _ = SETTINGS[kind]
    inputs, _ = task_inputs(task)
    latents = pipe(
        prompt_embeds=prompt_embeds(1),
        negative_prompt_embeds=prompt_embeds(2),
        height=HEIGHT,
        width=WIDTH,
        num_frames=NUM_FRAMES,
        **ref_kwargs,
        **inputs,
        generator=torch.Generator().manual_seed(SEED),
        output_type="latent",
    ).frames
    return latents, decode_like_pipeline(pipe, latents)


@pytest.mark.oracle
@pytest.mark.parametrize("task", ["t2v", "i2v", "v2v"])
def test_engine_matches_pipeline(pipeline_and_folder, task: str) -> None:
    kind, pipe, folder = pipeline_and_folder
    ref_latents, ref_frames = run_reference(pipe, kind, task)
    _, engine_kwargs = SETTINGS[kind]
    engine = Engine.from_pretrained(
        folder,
        EngineConfig(
            height=HEIGHT,
            width=WIDTH,
            device="cpu",
            dtype="float32",
            kernels="reference",
            graphs="chunk",
            **engine_kwargs,
        ),
    )
    _, inputs = task_inputs(task)
    with engine.generate_stream(
        prompt_embeds=prompt_embeds(1),
        negative_prompt_embeds=prompt_embeds(2),
        num_frames=NUM_FRAMES,
        seed=SEED,
        **inputs,
    ) as stream:
        chunks = list(stream)
    assert [c.index for c in chunks] == [0, 1, 2]
    latents = torch.cat([c.latents for c in chunks], dim=2)
    ref_latents = ref_latents[:, :, -latents.shape[2] :]
    diff = (latents - ref_latents).abs()
    assert diff.max().item() <= 1e-3, f"latents differ by {diff.max().item():.2e} (> 1e-3) at {diff.argmax().item()}"
    frames = np.concatenate([c.frames for c in chunks])[: len(ref_frames)]
    level = np.abs(frames.astype(np.int16) - ref_frames.astype(np.int16))
    assert level.max() <= 1, f"{(level > 1).sum()} frame values differ by more than one level (max {level.max()})"
