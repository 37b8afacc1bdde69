"""The engine's compiled chunk built on meta tensors, for what plans it without weights: the memory plan
(`helios-rt plan`, the settings of a GPU budget) and the cost model's priced trace. One builder, so both
describe the same chunk, and the model in it is the compiler's own meta model (`chunk_program.meta_model`).

This module is runtime, not tooling: it imports nothing from the tools that call it; the engine's memory
plan (`memory_plan`) and the cost model share its `ChunkShape`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..ops import OpSet
from ..sampling.chunk import ChunkSampler, SamplingSpec
from ..sampling.history import HistoryLayout
from ..sampling.schedules import ScheduleConfig
from .chunk_program import META, ChunkProgram, TextShape, meta_model


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


def distilled_spec(stages: int = 3, steps: tuple[int, ...] | None = None) -> SamplingSpec:
    """Helios-Distilled's sampling (one DMD step per pyramid stage, amplified first chunk, no CFG)."""
    schedule = ScheduleConfig(kind="dmd", stages=stages)
    return SamplingSpec(schedule, True, True, False, steps or (1,) * stages, 1.0, True)


def meta_chunk_program(
    config: ModelConfig,
    shape: ChunkShape,
    dtype: torch.dtype,
    ops: OpSet,
    spec: SamplingSpec,
    precision: str = "native",
) -> ChunkProgram:
    """The engine's `ChunkProgram` for `config` at `shape` on meta tensors, before any kind is planned."""
    model = meta_model(config, dtype, precision, ops)
    layout = HistoryLayout(shape.history_sizes, shape.latent_frames, shape.keep_first_frame)
    sampler = ChunkSampler(model, spec, layout, shape.latent_hw, META, ops)
    if spec.pyramid:  # the factor's values do not matter to the plan, only its shape
        n = config.patch_size[1] * config.patch_size[2]
        sampler.set_block_factor(torch.empty(n, n, device=META))
    return ChunkProgram(sampler, shape.batch, TextShape(shape.text_len), cuda_graph=False)


__all__ = ["ChunkShape", "distilled_spec", "meta_chunk_program", "meta_model"]
