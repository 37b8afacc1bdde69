"""ModelConfig validation and the 14B preset's size."""

from __future__ import annotations

import logging

import pytest
import torch

from helios_rt.config import HELIOS_14B, ModelConfig
from helios_rt.model.transformer import HeliosTransformer, count_parameters


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(rope_dim=(44, 42, 40)), r"ModelConfig\.rope_dim=\(44, 42, 40\): must be three sizes .* summing to"),
        (dict(rope_dim=(43, 43, 42)), r"ModelConfig\.rope_dim=.*each axis must be even"),
        (dict(num_attention_heads=0), r"ModelConfig\.num_attention_heads=0: must be a positive integer"),
        (dict(history_scale_mode="per_token"), r"ModelConfig\.history_scale_mode='per_token'"),
        (dict(qk_norm="layer_norm"), r"ModelConfig\.qk_norm='layer_norm'"),
        (dict(added_kv_proj_dim=64), r"ModelConfig\.added_kv_proj_dim=64"),
        (dict(patch_size=(1, 2)), r"ModelConfig\.patch_size"),
        (dict(eps=0.0), r"ModelConfig\.eps=0\.0: must be positive"),
    ],
)
def test_invalid_values_name_the_field(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HELIOS_14B.replace(**changes)


def test_heads_times_head_dim_must_match_rope() -> None:
    """A head dim that the RoPE split does not cover is rejected by name."""
    with pytest.raises(ValueError, match=r"attention_head_dim=64"):
        ModelConfig(attention_head_dim=64)


def test_unknown_keys_are_rejected_and_bookkeeping_ignored() -> None:
    raw = HELIOS_14B.to_dict() | {"_class_name": "HeliosTransformer3DModel", "_diffusers_version": "0.42.1"}
    assert ModelConfig.from_dict(raw) == HELIOS_14B
    with pytest.raises(ValueError, match=r"unknown keys \['window_size'\]"):
        ModelConfig.from_dict(raw | {"window_size": [-1, -1]})


TRAINING_KEYS = {"restrict_self_attn": False, "restrict_lora": False, "is_train_restrict_lora": False,
                 "restrict_lora_rank": 64}  # fmt: skip


def test_training_keys_at_inactive_values_are_accepted_and_named(caplog) -> None:
    """The official training code's config keys change nothing when off: accepted, named in one line."""
    raw = HELIOS_14B.to_dict() | TRAINING_KEYS
    with caplog.at_level(logging.INFO, logger="helios_rt"):
        assert ModelConfig.from_dict(raw) == HELIOS_14B
    lines = [r.getMessage() for r in caplog.records if r.name == "helios_rt"]
    assert len(lines) == 1 and all(key in lines[0] for key in TRAINING_KEYS), lines


@pytest.mark.parametrize(
    "key, value",
    [("restrict_self_attn", True), ("restrict_lora", True), ("is_train_restrict_lora", True),
     ("restrict_lora_rank", -1), ("restrict_lora_rank", "8")],
)  # fmt: skip
def test_active_training_keys_are_refused_by_name(key: str, value) -> None:
    with pytest.raises(ValueError, match=key):
        ModelConfig.from_dict(HELIOS_14B.to_dict() | TRAINING_KEYS | {key: value})


def test_14b_preset_has_14_point_3_billion_parameters() -> None:
    with torch.device("meta"):
        model = HeliosTransformer(HELIOS_14B)
    n = count_parameters(model)
    assert 14.0e9 <= n <= 14.5e9, n


@pytest.mark.oracle
def test_14b_parameter_count_equals_diffusers() -> None:
    from diffusers import HeliosTransformer3DModel

    with torch.device("meta"):
        ours = HeliosTransformer(HELIOS_14B)
        reference = HeliosTransformer3DModel(**{k: v for k, v in HELIOS_14B.to_dict().items()})
    assert count_parameters(ours) == count_parameters(reference)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in reference.state_dict().items()
    }


def test_engine_config_takes_a_torch_device() -> None:
    from helios_rt import EngineConfig

    assert EngineConfig(device=torch.device("cpu")).device == "cpu"
    assert EngineConfig(device=torch.device("cuda", 1)).resolved_device() == "cuda:1"


def test_triton_ops_of_a_numbered_cuda_device_launch_under_a_device_guard() -> None:
    """Triton launches on the current device; an op table for cuda:1 must switch to it first."""
    from helios_rt.ops import OpSet, op_names

    guarded, plain = OpSet("cuda:1", "triton"), OpSet("cuda", "triton")
    for name in op_names():
        if guarded.backend_of(name) == "triton":
            op = getattr(guarded, name)
            assert op.__wrapped__ is getattr(plain, name), name  # the same kernel, behind torch.cuda.device
