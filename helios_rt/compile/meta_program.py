"""The engine's compiled chunk built on meta tensors, for the tools that plan it without weights: the plan
report (`helios-rt plan`) and the cost model's priced trace. One builder, so both describe the same chunk."""

from __future__ import annotations

import functools

import torch

from ..config import ModelConfig
from ..fp8 import quantize_blocks_
from ..model.transformer import HeliosTransformer, keeps_fp32
from ..ops import OpSet
from ..sampling.chunk import ChunkSampler, SamplingSpec
from ..sampling.history import HistoryLayout
from ..sampling.schedules import ScheduleConfig
from .chunk_program import META, ChunkProgram, TextShape
from .cost.shape import ChunkShape, meta_transformer


def distilled_spec(stages: int = 3, steps: tuple[int, ...] | None = None) -> SamplingSpec:
    """Helios-Distilled's sampling (one DMD step per pyramid stage, amplified first chunk, no CFG)."""
    schedule = ScheduleConfig(kind="dmd", stages=stages)
    return SamplingSpec(schedule, True, True, False, steps or (1,) * stages, 1.0, True)


def meta_model(config: ModelConfig, dtype: torch.dtype, precision: str) -> HeliosTransformer:
    """The transformer on meta as the engine loads it: FP8 block linears with precision="fp8"."""
    return _meta_fp8_model(config, dtype) if precision == "fp8" else meta_transformer(config, dtype)


@functools.lru_cache(maxsize=2)  # a fresh model: `meta_transformer`'s cached one must stay float
def _meta_fp8_model(config: ModelConfig, dtype: torch.dtype) -> HeliosTransformer:
    with torch.device("meta"):
        model = HeliosTransformer(config, OpSet("cpu", "reference"))
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if keeps_fp32(name) else dtype)
    return quantize_blocks_(model).eval()


def meta_chunk_program(
    config: ModelConfig,
    shape: ChunkShape,
    dtype: torch.dtype,
    ops: OpSet,
    spec: SamplingSpec,
    precision: str = "native",
) -> ChunkProgram:
    """The engine's `ChunkProgram` for `config` at `shape` on meta tensors, before any kind is planned."""
    model = meta_model(config, dtype, precision)
    model.ops = ops
    layout = HistoryLayout(shape.history_sizes, shape.latent_frames, shape.keep_first_frame)
    sampler = ChunkSampler(model, spec, layout, shape.latent_hw, META, ops)
    if spec.pyramid:  # the factor's values do not matter to the plan, only its shape
        n = config.patch_size[1] * config.patch_size[2]
        sampler.set_block_factor(torch.empty(n, n, device=META))
    return ChunkProgram(sampler, shape.batch, TextShape(shape.text_len), cuda_graph=False)
