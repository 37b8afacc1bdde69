"""What fixes a chunk's shapes (`ChunkShape`), and the transformer on meta tensors: the inputs of a plan."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ...config import ModelConfig
from ...model.transformer import HeliosTransformer, keeps_fp32
from ...ops import OpSet


@functools.lru_cache(maxsize=4)
def meta_transformer(config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> HeliosTransformer:
    """The transformer on the meta device, in `dtype` except the float32-kept parameters (as loaded)."""
    ops = OpSet("cpu", "reference")
    with torch.device("meta"):
        model = HeliosTransformer(config, ops)
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if keeps_fp32(name) else dtype)
    return model.eval()


@dataclass(frozen=True)
class ChunkShape:
    """What fixes the shapes of a chunk: resolution, chunk and history sizes, batch, text length."""

    height: int = 384
    width: int = 640
    latent_frames: int = 9
    history_sizes: tuple[int, int, int] = (16, 2, 1)  # long, mid, short (+ the prefix frame)
    keep_first_frame: bool = True
    stages: int = 3
    batch: int = 1
    text_len: int = 512
    vae_scale: int = 8  # pixels per latent, spatially
    frames_per_latent: int = 4  # pixel frames per latent frame after the first

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // self.vae_scale, self.width // self.vae_scale

    @property
    def pixel_frames(self) -> int:
        return 1 + self.frames_per_latent * (self.latent_frames - 1)
