"""NaN and Inf are stopped where they enter: weights at load, embeddings on input, latents per chunk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.oracle import build_reference, save_sharded

from helios_rt.checkpoint import CheckpointError
from helios_rt.errors import NonFiniteError, StreamFailedError
from helios_rt.model.transformer import load_transformer

TINY = dict(num_attention_heads=2, attention_head_dim=16, num_layers=1, rope_dim=(4, 6, 6), is_amplify_history=True)


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    return save_sharded(build_reference(TINY), tmp_path_factory.mktemp("ckpt"))


def with_value(root: Path, tmp_path: Path, key: str, index: int, value: float) -> Path:
    """A copy of the checkpoint with one element of one tensor set to `value`."""
    copy = Path(shutil.copytree(root, tmp_path / "copy"))
    weight_map = json.loads(next((copy / "transformer").glob("*.index.json")).read_text())["weight_map"]
    shard = copy / "transformer" / weight_map[key]
    tensors = load_file(shard)
    tensors[key].view(-1)[index] = value
    save_file(tensors, shard)
    return copy


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_weight_fails_at_load_naming_the_tensor(good_checkpoint, tmp_path, value: float) -> None:
    ckpt = with_value(good_checkpoint, tmp_path, "blocks.0.attn1.to_k.weight", 37, value)
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) hold NaN or Inf .*: blocks\.0\.attn1\.to_k\.weight "):
        load_transformer(ckpt)


def test_a_weight_that_overflows_the_dtype_fails_at_load(good_checkpoint, tmp_path) -> None:
    ckpt = with_value(good_checkpoint, tmp_path, "proj_out.weight", 3, 1e5)  # finite in float32, Inf in float16
    load_transformer(ckpt, dtype=torch.float32)
    with pytest.raises(CheckpointError, match=r"proj_out\.weight \(torch\.float16\).*overflow this dtype"):
        load_transformer(ckpt, dtype=torch.float16)


def test_nan_prompt_embeddings_fail_on_input(tiny_engine) -> None:
    embeds = torch.zeros(1, 6, 64)
    embeds[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"prompt_embeds hold NaN or Inf \(1 of 384 values\)"):
        tiny_engine.generate_stream(prompt_embeds=embeds, num_frames=33)


def test_a_chunk_with_non_finite_latents_stops_the_stream_naming_it(make_tiny_engine) -> None:
    engine = make_tiny_engine()  # its weights are broken below
    stream = engine.generate_stream("a lighthouse", num_frames=99, seed=1)
    assert next(stream).index == 0
    with torch.no_grad():
        engine.transformer.proj_out.weight[0, 0] = float("nan")  # a fault that appears mid-stream
    with pytest.raises(NonFiniteError, match=r"chunk 1's latents hold NaN or Inf"):
        next(stream)
    with pytest.raises(StreamFailedError, match=r"failed at chunk 1 \(NonFiniteError"):
        next(stream)
