"""What fixes a chunk's shapes (`ChunkShape`, the runtime's, from `meta_program`), and the transformer on
meta tensors: the inputs of a plan."""

from __future__ import annotations

import torch

from ...config import ModelConfig
from ...model.transformer import HeliosTransformer
from ..chunk_program import meta_model
from ..meta_program import ChunkShape


def meta_transformer(config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> HeliosTransformer:
    """The transformer on the meta device as loaded (`chunk_program.meta_model`, the one builder), with the
    reference op table. A fresh model per call: a caller may set its `.ops`, and no other caller sees that."""
    return meta_model(config, dtype)


__all__ = ["ChunkShape", "meta_transformer"]
