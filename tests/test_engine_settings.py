"""Where the engine reads its settings: the stream's prompt blend and the video's frame rate are arguments
of `generate_stream` / `generate` (the deprecated EngineConfig values still honoured), and a
`gpu_memory` budget is planned by `Engine.from_pretrained` itself, with the plan's own code."""

from __future__ import annotations

import warnings

import pytest
import torch

from helios_rt import Engine, EngineConfig
from helios_rt.benchmarking.side_by_side import with_engine_options
from helios_rt.compile import memory_plan
from helios_rt.config import DebugSwitches, MemorySettings


def test_the_prompt_blend_is_the_streams_argument(tiny_engine: Engine) -> None:
    """`generate_stream(prompt_blend_chunks=N)` blends a switch over N chunks; the default is 3."""
    with tiny_engine.generate_stream("a quiet forest", num_frames=None, seed=1, prompt_blend_chunks=2) as stream:
        first = stream._prompt.target
        stream.set_prompt("a busy city street")
        target = stream._prompt.target
        seen = [stream._prompt.next() for _ in range(3)]
    weights = [((s - first).norm() / (target - first).norm()).item() for s in seen]
    assert weights == pytest.approx([0.5, 1.0, 1.0], abs=1e-5)
    with tiny_engine.generate_stream("a quiet forest", num_frames=None, seed=1) as stream:
        assert stream._prompt.chunks == 3


def test_a_bad_prompt_blend_is_refused_with_the_rule(tiny_engine: Engine) -> None:
    with pytest.raises(ValueError, match=r"prompt_blend_chunks=0: an integer >= 1"):
        tiny_engine.generate_stream("a quiet forest", num_frames=33, prompt_blend_chunks=0)


def test_the_deprecated_config_values_are_still_honoured(make_tiny_engine) -> None:
    """EngineConfig(prompt_blend_chunks=, fps=) keep working for one release, read only where no argument is given."""
    with pytest.warns(DeprecationWarning, match="prompt_blend_chunks"):
        engine = make_tiny_engine(prompt_blend_chunks=5, fps=12)
    with engine.generate_stream("waves", num_frames=None, seed=0) as stream:
        assert stream._prompt.chunks == 5
    with engine.generate_stream("waves", num_frames=None, seed=0, prompt_blend_chunks=1) as stream:
        assert stream._prompt.chunks == 1
    assert engine.generate("waves", num_frames=9, seed=0).fps == 12
    assert engine.generate("waves", num_frames=9, seed=0, fps=30).fps == 30
    engine.close()


def test_the_video_frame_rate_is_generates_argument(tiny_engine: Engine) -> None:
    assert tiny_engine.generate("waves", num_frames=9, seed=0).fps == 24
    assert tiny_engine.generate("waves", num_frames=9, seed=0, fps=30).fps == 30


def test_a_python_callers_budget_is_planned_by_the_engine(tiny_config) -> None:
    """`from_pretrained` plans `gpu_memory` itself (`memory_plan.plan_memory`): on a CPU the plan's own
    refusal, not "plan it first", and before any weight is read."""
    with pytest.raises(ValueError, match=r"gpu_memory=24 budgets a GPU; this engine runs on cpu"):
        Engine.from_pretrained("demo", tiny_config(gpu_memory=24))


def test_settings_planned_for_the_budget_are_kept(tiny_config) -> None:
    """A config already planned for its budget (by hand, or by the CLI) is loaded as it is."""
    memory = MemorySettings(decode_slice_frames=1, planned_for_gb=24)
    engine = Engine.from_pretrained("demo", tiny_config(gpu_memory=24, memory=memory))
    assert engine.config.memory == memory
    engine.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_engine_applies_the_plans_settings_on_a_gpu() -> None:
    """On CUDA the engine's settings are what `plan_memory` (the `helios-rt plan --gpu-memory` code) chooses."""
    config = EngineConfig(height=64, width=64, device="cuda", gpu_memory=1.5)
    planned = memory_plan.plan_memory(config, "demo")
    assert planned.memory.planned_for_gb == 1.5
    with Engine.from_pretrained("demo", config) as engine:
        assert engine.config.memory == planned.memory
    with pytest.raises(ValueError, match=r"gpu_memory=0\.5: demo at 64x64 does not fit 0\.5 GB"):
        Engine.from_pretrained("demo", config.replace(gpu_memory=0.5))
    torch.cuda.empty_cache()


def test_engine_options_land_in_their_groups() -> None:
    """The benchmarks' `--engine-option` names (the CLI's) set the new fields, with no deprecation warning."""
    base = EngineConfig(device="cpu", debug=DebugSwitches(kernels="reference"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        config = with_engine_options(base, {"graphs": "off", "decode_slice_frames": 2, "height": 128})
    assert config.debug == DebugSwitches(kernels="reference", graphs="off")
    assert config.memory.decode_slice_frames == 2 and config.height == 128
    with pytest.raises(ValueError, match="no engine option named 'fps'"):
        with_engine_options(base, {"fps": 30})
