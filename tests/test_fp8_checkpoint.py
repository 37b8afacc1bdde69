"""`helios-rt quantize` round-trips a checkpoint, and an FP8 checkpoint is loaded as strictly as any."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.oracle import build_reference, save_sharded

from helios_rt.checkpoint import CheckpointError
from helios_rt.cli import main
from helios_rt.fp8 import FP8_DTYPE, FP8Linear
from helios_rt.model.transformer import load_transformer
from helios_rt.quantize import quantize_checkpoint

SMALL = dict(num_attention_heads=2, attention_head_dim=16, num_layers=1, rope_dim=(4, 6, 6), is_amplify_history=True)
KEY = "blocks.0.ffn.net.0.proj"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fp8")
    src = save_sharded(build_reference(SMALL), root / "src")
    (src / "vae").mkdir()
    (src / "vae" / "marker.json").write_text('{"kept": true}')
    return src, quantize_checkpoint(src, root / "fp8")


@pytest.fixture
def fp8_copy(folders, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folders[1], tmp_path / "copy"))


def _shard_with(root: Path, key: str) -> Path:
    index = json.loads(next((root / "transformer").glob("*.index.json")).read_text())
    return root / "transformer" / index["weight_map"][key]


def _tensor_bytes(root: Path) -> int:
    files = (root / "transformer").glob("*.safetensors")
    return sum(t.numel() * t.element_size() for f in files for t in load_file(f).values())


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_quantize_round_trips_and_halves_the_linear_bytes(folders) -> None:
    src, dst = folders
    stored = load_transformer(dst, torch.bfloat16, precision="fp8")
    on_the_fly = load_transformer(src, torch.bfloat16, precision="fp8")
    assert isinstance(stored.get_submodule(KEY), FP8Linear) and stored.get_submodule(KEY).weight.dtype == FP8_DTYPE
    a, b = stored.state_dict(), on_the_fly.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k
    assert (dst / "vae" / "marker.json").read_text() == '{"kept": true}'  # the other components are copied
    # float32 source: each block linear [N, K] goes from 4NK bytes to NK (e4m3) + 4N (scales); nothing else moves
    saved = sum(3 * m.weight.numel() - 4 * m.out_features for m in stored.modules() if isinstance(m, FP8Linear))
    assert _tensor_bytes(src) - _tensor_bytes(dst) == saved > 0
    assert not (dst.parent / "fp8.partial").exists()


def test_the_cli_writes_it_and_refuses_to_overwrite(folders, tmp_path: Path, capsys) -> None:
    assert main(["quantize", str(folders[0]), str(tmp_path / "q")]) == 0
    assert "GiB ->" in capsys.readouterr().out
    with pytest.raises(ValueError, match="exists; quantize writes a new folder"):
        quantize_checkpoint(folders[0], tmp_path / "q")
    with pytest.raises(CheckpointError, match="already quantised"):
        quantize_checkpoint(tmp_path / "q", tmp_path / "qq")


def test_an_fp8_checkpoint_needs_precision_fp8(folders) -> None:
    with pytest.raises(CheckpointError, match=r"holds an FP8 checkpoint .* EngineConfig\(precision='fp8'\)"):
        load_transformer(folders[1])


def test_a_weight_of_the_wrong_dtype_is_named(fp8_copy: Path) -> None:
    key = f"{KEY}.weight"
    _rewrite(_shard_with(fp8_copy, key), lambda t: t.update({key: t[key].to(torch.bfloat16)}))
    with pytest.raises(CheckpointError, match=rf"{key}: BF16 \(expected F8_E4M3\)"):
        load_transformer(fp8_copy, precision="fp8")


def test_a_missing_scale_is_named(fp8_copy: Path) -> None:
    key = f"{KEY}.weight_scale"
    _rewrite(_shard_with(fp8_copy, key), lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=rf"missing keys \[{key}\]"):
        load_transformer(fp8_copy, precision="fp8")


def test_a_nan_in_an_fp8_weight_is_named(fp8_copy: Path) -> None:
    key = f"{KEY}.weight"

    def poison(t: dict) -> None:
        w = t[key].view(torch.uint8).clone()
        w[0, 0] = 0x7F  # e4m3fn's NaN
        t[key] = w.view(FP8_DTYPE)

    _rewrite(_shard_with(fp8_copy, key), poison)
    with pytest.raises(CheckpointError, match=rf"{key} .*NaN"):
        load_transformer(fp8_copy, precision="fp8")


def test_a_zero_scale_is_named(fp8_copy: Path) -> None:
    key = f"{KEY}.weight_scale"
    _rewrite(_shard_with(fp8_copy, key), lambda t: t[key].__setitem__(3, 0.0))
    with pytest.raises(CheckpointError, match=rf"{key} .*a scale that is not positive and finite"):
        load_transformer(fp8_copy, precision="fp8")


def test_scales_without_the_config_marker_are_refused(fp8_copy: Path) -> None:
    config = fp8_copy / "transformer" / "config.json"
    raw = json.loads(config.read_text())
    del raw["quantization_config"]
    config.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="stores FP8 scales .* no quantization_config"):
        load_transformer(fp8_copy, precision="fp8")
