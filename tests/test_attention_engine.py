"""The engine picks its attention backend at load, reports it, and refuses an impossible EngineConfig.attention."""

import pytest

from helios_rt.config import EngineConfig
from helios_rt.engine import Engine


def test_engine_config_rejects_an_unknown_attention():
    with pytest.raises(ValueError, match="EngineConfig.attention='flash'"):
        EngineConfig(attention="flash")


def test_the_engine_reports_its_attention_and_refuses_an_impossible_one():
    cfg = EngineConfig(device="cpu", height=64, width=64, attention="sdpa")
    engine = Engine.from_pretrained("demo", cfg)
    assert engine.attention.backend == "sdpa" and engine.sampler.ops.backend_of("attention") == "sdpa"
    assert engine.attention.describe().startswith("attention: sdpa (float32, head dim")
    engine.close()
    with pytest.raises(ValueError, match="attention='fa2' cannot run here: needs a CUDA device"):
        Engine.from_pretrained("demo", cfg.replace(attention="fa2"))
