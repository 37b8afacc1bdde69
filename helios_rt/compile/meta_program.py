"""The engine's compiled chunk built on meta tensors, for the tools that plan it without weights: the plan
report (`helios-rt plan`) and the cost model's priced trace. One builder, so both describe the same chunk,
and the model in it is the compiler's own meta model (`chunk_program.meta_model`).

This module is runtime, not tooling: it imports nothing from the tools that call it. The shape of the
chunk is whatever has the fields of `PlannedShape` (the cost model's `ChunkShape` has them).
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..config import ModelConfig
from ..ops import OpSet
from ..sampling.chunk import ChunkSampler, SamplingSpec
from ..sampling.history import HistoryLayout
from ..sampling.schedules import ScheduleConfig
from .chunk_program import META, ChunkProgram, TextShape, meta_model


class PlannedShape(Protocol):
    """What fixes the shapes of a planned chunk (`compile.cost.ChunkShape` is the tools' one)."""

    history_sizes: tuple[int, int, int]
    latent_frames: int
    keep_first_frame: bool
    batch: int
    text_len: int

    @property
    def latent_hw(self) -> tuple[int, int]: ...


def distilled_spec(stages: int = 3, steps: tuple[int, ...] | None = None) -> SamplingSpec:
    """Helios-Distilled's sampling (one DMD step per pyramid stage, amplified first chunk, no CFG)."""
    schedule = ScheduleConfig(kind="dmd", stages=stages)
    return SamplingSpec(schedule, True, True, False, steps or (1,) * stages, 1.0, True)


def meta_chunk_program(
    config: ModelConfig,
    shape: PlannedShape,
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


__all__ = ["PlannedShape", "distilled_spec", "meta_chunk_program", "meta_model"]
