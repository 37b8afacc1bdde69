"""Bad checkpoints each raise an error that names the problem (and nothing half-loaded comes back)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.oracle import build_reference, save_sharded

from helios_rt.checkpoint import CheckpointError, TensorInfo, finite_flag, index_tensors, iter_tensors_to
from helios_rt.model.transformer import load_transformer

SMALL = dict(num_attention_heads=2, attention_head_dim=16, num_layers=1, rope_dim=(4, 6, 6), is_amplify_history=True)


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    return save_sharded(build_reference(SMALL), tmp_path_factory.mktemp("ckpt"))


@pytest.fixture
def ckpt(good_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy that a test may damage."""
    return Path(shutil.copytree(good_checkpoint, tmp_path / "copy"))


def shards(root: Path) -> list[Path]:
    return sorted((root / "transformer").glob("*.safetensors"))


def shard_with(root: Path, key: str) -> Path:
    index = json.loads(next((root / "transformer").glob("*.index.json")).read_text())
    return root / "transformer" / index["weight_map"][key]


def rewrite(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_good_checkpoint_loads_in_each_dtype(ckpt: Path) -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = load_transformer(ckpt, dtype=dtype)
        assert model.proj_out.weight.dtype == dtype
        assert model.blocks[0].scale_shift_table.dtype == torch.float32  # kept in float32
        assert model.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
        assert not any(p.is_meta for p in model.parameters())


def test_missing_key_is_named(ckpt: Path) -> None:
    key = "blocks.0.attn1.to_q.weight"
    rewrite(shard_with(ckpt, key), lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=r"missing keys \[blocks\.0\.attn1\.to_q\.weight\]"):
        load_transformer(ckpt)


def test_unexpected_key_is_named(ckpt: Path) -> None:
    rewrite(shards(ckpt)[0], lambda t: t.__setitem__("blocks.7.extra", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected keys \[blocks\.7\.extra\]"):
        load_transformer(ckpt)


def test_wrong_shape_is_named(ckpt: Path) -> None:
    key = "proj_out.bias"
    rewrite(shard_with(ckpt, key), lambda t: t.__setitem__(key, torch.zeros(5)))
    with pytest.raises(CheckpointError, match=r"proj_out\.bias: checkpoint \[5\] vs model \[16\]"):
        load_transformer(ckpt)


def test_truncated_shard_names_the_file(ckpt: Path) -> None:
    victim = shards(ckpt)[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=f"{victim.name} is truncated"):
        load_transformer(ckpt)


def test_corrupt_header_names_the_file(ckpt: Path) -> None:
    victim = shards(ckpt)[0]
    data = bytearray(victim.read_bytes())
    data[8:16] = b"\xff" * 8
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{victim.name} has a corrupt safetensors header"):
        load_transformer(ckpt)


def test_missing_shard_is_named(ckpt: Path) -> None:
    victim = shards(ckpt)[0]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"missing shards .*{victim.name}"):
        load_transformer(ckpt)


def test_pickle_checkpoint_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(build_reference(SMALL).config))
    torch.save({"w": torch.zeros(1)}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only pickle weights .*safetensors only"):
        load_transformer(folder)


def test_config_that_does_not_match_the_weights(ckpt: Path) -> None:
    cfg_path = ckpt / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["ffn_dim"] = 64
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape mismatches \[blocks\.0\.ffn\.net\.0\.proj\.bias"):
        load_transformer(ckpt)


def test_config_with_unknown_flag_is_refused(ckpt: Path) -> None:
    cfg_path = ckpt / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["use_magic"] = True
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unknown keys \['use_magic'\]"):
        load_transformer(ckpt)


def test_folder_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a Helios checkpoint"):
        load_transformer(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_transformer(tmp_path / "nope")


def test_loaded_tensors_are_the_files_in_their_dtypes(ckpt: Path) -> None:
    """Every weight read through the staging loop equals the stored tensor cast to the model's dtype."""
    model = load_transformer(ckpt, dtype=torch.bfloat16)
    state = model.state_dict()
    stored = {k: v for path in shards(ckpt) for k, v in load_file(path).items()}
    assert set(stored) == set(state)
    for name, tensor in stored.items():
        assert torch.equal(state[name], tensor.to(state[name].dtype)), name


def test_shard_truncated_after_it_was_checked_names_the_file(ckpt: Path) -> None:
    """A file that shrinks between the header check and the read fails the read by name, not with garbage."""
    victim = shards(ckpt)[-1]
    infos = index_tensors([victim])
    victim.write_bytes(victim.read_bytes()[: min(i.end for i in infos.values()) - 1])
    with pytest.raises(CheckpointError, match=f"{victim.name} ended inside a tensor"):
        dict(iter_tensors_to(infos, "cpu"))


def test_unknown_stored_dtype_is_named_before_any_read(tmp_path: Path) -> None:
    """The file is never opened (it does not even exist): the dtype is refused first."""
    info = TensorInfo(tmp_path / "w.safetensors", "F4", (2,), 8, 9)
    with pytest.raises(CheckpointError, match="w.safetensors stores a tensor as F4, which helios_rt cannot read"):
        dict(iter_tensors_to({"w": info}, "cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_cpu_finite_check_sees_nan_and_each_infinity(dtype: torch.dtype, value: float) -> None:
    t = torch.ones(1000, dtype=dtype)
    assert finite_flag(t) is True
    t[617] = value
    assert finite_flag(t) is False
