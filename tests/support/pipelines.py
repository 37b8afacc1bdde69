"""Small diffusers Helios pipelines (the oracle of the engine) saved as checkpoint folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .oracle import build_reference

Z = 4  # latent channels of the small models
TRANSFORMER = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=2,
    rope_dim=(4, 6, 6),
    is_amplify_history=True,
    in_channels=Z,
    out_channels=Z,
    text_dim=24,
)
VAE = dict(
    base_dim=8,
    z_dim=Z,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
    latents_mean=[0.1, -0.2, 0.05, 0.3],
    latents_std=[1.5, 0.8, 1.2, 2.0],
)
HEIGHT = WIDTH = 64


def build_vae(seed: int = 3):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**VAE).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae


def build_pipeline(kind: str):
    """kind: "distilled" (HeliosPyramidPipeline + DMD) or "base" (HeliosPipeline + UniPC)."""
    from diffusers import HeliosDMDScheduler, HeliosPipeline, HeliosPyramidPipeline, HeliosScheduler

    transformer = build_reference(TRANSFORMER, seed=11)
    vae = build_vae()
    if kind == "distilled":
        # gamma 1/3 (the default) makes the block-noise covariance singular: the reference cannot factor it on every CPU
        scheduler = HeliosDMDScheduler(use_dynamic_shifting=True, gamma=0.25)
        return HeliosPyramidPipeline(
            tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=transformer, is_distilled=True
        )
    if kind == "base":
        scheduler = HeliosScheduler(stages=1, stage_range=[0.0, 1.0], use_dynamic_shifting=True)
        return HeliosPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=transformer)
    raise ValueError(kind)


def save_pipeline(pipe, root: Path) -> Path:
    pipe.save_pretrained(root, safe_serialization=True)
    return root


def prompt_embeds(seed: int, length: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, length, TRANSFORMER["text_dim"], generator=g)


def sample_image(seed: int = 5) -> np.ndarray:
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = np.stack([x * 3, y * 3, (x + y) * 2], axis=-1) % 256
    return np.clip(base + g.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)


def sample_video(frames: int = 40, seed: int = 6) -> np.ndarray:
    img = sample_image(seed).astype(np.int32)
    return np.stack([np.roll(img, 2 * t, axis=1) for t in range(frames)]).astype(np.uint8)


def decode_like_pipeline(pipe, latents: torch.Tensor, chunks: int = 3) -> np.ndarray:
    """uint8 frames of the last `chunks` chunks of pipeline latents, each decoded on its own as the pipeline does."""
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        video = torch.cat(
            [
                vae.decode(c / inv_std + mean, return_dict=False)[0]
                for c in latents[:, :, -chunks * 9 :].split(9, dim=2)
            ],
            dim=2,
        )
    frames = pipe.video_processor.postprocess_video(video, output_type="np")[0]
    return np.round(frames * 255).astype(np.uint8)
