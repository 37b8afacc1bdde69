"""EngineConfig: the user's fields, the groups, the deprecated names, steps per checkpoint, the memory budget."""

from __future__ import annotations

import warnings

import pytest

from helios_rt.config import DebugSwitches, EngineConfig, MemorySettings
from helios_rt.sampling.chunk import checkpoint_steps
from helios_rt.sampling.overrides import CHECKPOINT_VALUES, SamplingOverrides

USER_FIELDS = ("height", "width", "device", "dtype", "precision", "steps", "guidance_scale", "gpu_memory", "parallel")


def test_engine_config_keeps_the_user_fields_and_three_groups() -> None:
    names = tuple(EngineConfig.__dataclass_fields__)
    assert names == (*USER_FIELDS, "memory", "sampling", "debug")
    config = EngineConfig(height=64, width=128, steps=2, guidance_scale=3.0, debug=DebugSwitches(kernels="reference"))
    assert (config.height, config.width, config.steps, config.debug.kernels) == (64, 128, 2, "reference")
    assert config.sampling == SamplingOverrides() and config.memory == MemorySettings()


def test_the_checkpoint_values_are_the_defaults_of_the_overrides() -> None:
    config = EngineConfig()
    for name, value in CHECKPOINT_VALUES.items():
        assert getattr(config, name) == value, name  # the old read path, without a warning
    tuned = EngineConfig(sampling=SamplingOverrides(history_sizes=[8, 2, 1], latent_frames_per_chunk=5))
    assert (tuned.history_sizes, tuned.latent_frames_per_chunk, tuned.keep_first_frame) == ((8, 2, 1), 5, True)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: EngineConfig(steps=0), r"EngineConfig\.steps=0: an int >= 1"),
        (lambda: EngineConfig(steps=(2, 0)), r"EngineConfig\.steps=\(2, 0\)"),
        (lambda: EngineConfig(steps=True), r"EngineConfig\.steps=True"),
        (lambda: EngineConfig(gpu_memory=0), r"EngineConfig\.gpu_memory=0: a budget in GB > 0"),
        (lambda: EngineConfig(dtype="fp8"), r"EngineConfig\.dtype='fp8': use one of 'auto', "),
        (lambda: EngineConfig(debug="off"), r"EngineConfig\.debug='off': use DebugSwitches\(\.\.\.\)"),
        (lambda: DebugSwitches(graphs="always"), r"DebugSwitches\.graphs='always': use one of 'auto', 'chunk', 'off'"),
        (lambda: MemorySettings(decode_slice_frames=0), r"MemorySettings\.decode_slice_frames=0: None \(whole"),
        (lambda: SamplingOverrides(history_sizes=(16, 2)), r"SamplingOverrides\.history_sizes=\(16, 2\): three"),
        (lambda: SamplingOverrides(zero_init_steps=-1), r"SamplingOverrides\.zero_init_steps=-1: must be"),
    ],
)
def test_invalid_values_name_the_field_and_the_fix(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


OLD_AND_NEW = [
    (dict(kernels="reference", graphs="off"), dict(debug=DebugSwitches(kernels="reference", graphs="off"))),
    (dict(history_sizes=(8, 2, 1), amplify_first_chunk=False),
     dict(sampling=SamplingOverrides(history_sizes=(8, 2, 1), amplify_first_chunk=False))),
    (dict(decode_slice_frames=2, text_encoder_precision="fp8", offload_text_encoder=True),
     dict(memory=MemorySettings(text_encoder_precision="fp8", decode_slice_frames=2, offload_text_encoder=True))),
    (dict(pyramid_steps=(2, 2, 2)), dict(steps=(2, 2, 2))),
    (dict(num_inference_steps=4), dict(steps=4)),
]  # fmt: skip


@pytest.mark.parametrize(("old", "new"), OLD_AND_NEW)
def test_a_deprecated_name_warns_once_naming_the_new_spelling_and_builds_the_same_config(old, new) -> None:
    with pytest.warns(DeprecationWarning) as caught:
        config = EngineConfig(height=64, **old)
    assert len(caught) == 1 and caught[0].filename == __file__  # the caller's line, not config.py's
    text = str(caught[0].message)
    assert all(f"{name} -> " in text for name in old), text
    assert config == EngineConfig(height=64, **new)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reading the old names (engine.py, compile/) stays silent
        for name, value in old.items():
            expected = tuple(value) if isinstance(value, tuple) else value
            assert getattr(config, name) == expected if name not in ("pyramid_steps", "num_inference_steps") else True


def test_replace_takes_old_names_and_keeps_the_spelling_rules() -> None:
    with pytest.warns(DeprecationWarning):
        base = EngineConfig().replace(num_inference_steps=3, graphs="off")
    assert (base.steps, base.steps_option, base.graphs) == (3, "num_inference_steps", "off")
    again = base.replace(height=64)  # no old name: no warning, the spelling carries over
    assert again.steps_option == "num_inference_steps" and again.debug.graphs == "off"
    assert base.replace(steps=5).steps_option == "steps"


def test_the_stream_values_leave_the_fields_but_are_honoured() -> None:
    assert EngineConfig().fps == 24 and EngineConfig().prompt_blend_chunks == 3
    with pytest.warns(DeprecationWarning, match="fps -> .*Mp4Writer"):
        config = EngineConfig(fps=30, prompt_blend_chunks=2)
    assert (config.fps, config.prompt_blend_chunks) == (30, 2)
    assert config.replace(height=64).fps == 30
    with pytest.raises(ValueError, match=r"EngineConfig\.fps=0: must be an integer >= 1"), pytest.warns(
        DeprecationWarning
    ):
        EngineConfig(fps=0)


def test_an_invalid_old_value_is_named_as_the_caller_wrote_it() -> None:
    with pytest.raises(ValueError, match=r"EngineConfig\.kernels='cuda'"), pytest.warns(DeprecationWarning):
        EngineConfig(kernels="cuda")
    with pytest.raises(ValueError, match=r"pyramid_steps and steps both set"), pytest.warns(DeprecationWarning):
        EngineConfig(steps=2, pyramid_steps=(1, 1, 1))


@pytest.mark.parametrize(
    ("steps", "pyramid", "distilled", "expected"),
    [
        (None, True, True, (1, 1, 1)),
        (None, True, False, (20, 20, 20)),
        (None, False, False, (50,)),
        (4, True, True, (4, 4, 4)),  # an int: per stage on a pyramid checkpoint
        (4, False, False, (4,)),  # an int: the total on a base checkpoint
        ((3, 2, 1), True, False, (3, 2, 1)),
        ((7,), False, False, (7,)),
    ],
)
def test_steps_is_one_knob_for_pyramid_and_base_checkpoints(steps, pyramid, distilled, expected) -> None:
    assert checkpoint_steps(steps, "steps", pyramid, distilled, 3) == expected


def test_steps_that_do_not_fit_the_checkpoint_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"EngineConfig\.steps=\(1, 1\) has 2 entries .* 3 stages: give one count"):
        checkpoint_steps((1, 1), "steps", True, True, 3)
    with pytest.raises(ValueError, match=r"base\) checkpoint has one stage; pass its total .* as an int"):
        checkpoint_steps((2, 2), "steps", False, False, 1)
    with pytest.raises(ValueError, match="num_inference_steps applies to HeliosPipeline"):
        checkpoint_steps(10, "num_inference_steps", True, True, 3)  # the deprecated name keeps its rule
    with pytest.raises(ValueError, match="pyramid_steps applies to pyramid checkpoints"):
        checkpoint_steps((1,), "pyramid_steps", False, False, 1)


def test_a_budget_must_be_planned_before_the_engine_reads_the_memory_settings() -> None:
    config = EngineConfig(gpu_memory=24)
    with pytest.raises(ValueError, match=r"gpu_memory=24 is planned .*memory_plan\.plan_memory"):
        config.decode_slice_frames  # noqa: B018 (what engine.py reads)
    by_hand = EngineConfig(memory=MemorySettings(decode_slice_frames=1, offload_text_encoder=True))
    assert (by_hand.decode_slice_frames, by_hand.offload_text_encoder, by_hand.text_encoder_precision) == (
        1, True, "native")  # fmt: skip
