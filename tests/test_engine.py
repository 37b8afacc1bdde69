"""Engine behaviour: streaming, prompt switching, closing, constant memory, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.memory import live_tensor_bytes
from support.untrained import untrained_engine

from helios_rt import Engine, EngineConfig
from helios_rt.checkpoint import CheckpointError

SMALL = EngineConfig(height=64, width=64, device="cpu", dtype="float32", kernels="reference")


@pytest.fixture(scope="module")
def engine() -> Engine:
    return untrained_engine(SMALL)


def test_stream_yields_chunks_of_33_uint8_frames(engine: Engine) -> None:
    with engine.generate_stream("a tropical fish among corals", num_frames=40, seed=3) as stream:
        chunks = list(stream)
    assert [c.index for c in chunks] == [0, 1]
    assert [c.first_frame for c in chunks] == [0, 33]
    for c in chunks:
        assert c.frames.dtype == np.uint8 and c.frames.shape == (33, 64, 64, 3)
        assert set(c.timings) == {"transformer_s", "decode_s"}
    assert not np.array_equal(chunks[0].frames, chunks[1].frames)


def test_last_chunk_says_how_many_of_its_frames_are_in_the_video(engine: Engine) -> None:
    with engine.generate_stream("a tropical fish among corals", num_frames=40, seed=3) as stream:
        chunks = list(stream)
    assert [c.num_video_frames for c in chunks] == [33, 7]
    assert chunks[1].video_frames.shape == (7, 64, 64, 3)
    np.testing.assert_array_equal(chunks[1].video_frames, chunks[1].frames[:7])
    video = engine.generate("a tropical fish among corals", num_frames=40, seed=3)
    assert len(video) == 40
    np.testing.assert_array_equal(video.frames, np.concatenate([chunks[0].frames, chunks[1].frames[:7]]))


def test_a_generator_seeds_like_its_seed_and_advances(engine: Engine) -> None:
    by_seed = engine.generate("a red kite over a beach", num_frames=33, seed=7).frames
    g = torch.Generator().manual_seed(7)
    by_generator = engine.generate("a red kite over a beach", num_frames=33, seed=g).frames
    np.testing.assert_array_equal(by_seed, by_generator)
    assert not torch.equal(g.get_state(), torch.Generator().manual_seed(7).get_state()), (
        "the caller's generator advances"
    )


@pytest.mark.parametrize(
    "seed, error, match",
    [
        (-1, ValueError, "2\\*\\*64"),
        (2**64, ValueError, "2\\*\\*64"),
        (1.5, TypeError, "float"),
        (True, TypeError, "bool"),
    ],
)
def test_bad_seeds_are_refused(engine: Engine, seed, error, match) -> None:
    with pytest.raises(error, match=match):
        engine.generate_stream("a red kite", num_frames=33, seed=seed)


def test_same_seed_same_video_other_seed_other_video(engine: Engine) -> None:
    a = engine.generate("a red kite over a beach", num_frames=33, seed=7).frames
    b = engine.generate("a red kite over a beach", num_frames=33, seed=7).frames
    c = engine.generate("a red kite over a beach", num_frames=33, seed=8).frames
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("graphs", ["off", "chunk"], ids=["eager", "compiled-chunk"])
def test_memory_stays_flat_over_40_chunks(engine: Engine, graphs: str) -> None:
    """Eager, and through the compiled chunk's arena and static buffers (what a CUDA chunk graph replays)."""
    if graphs == "chunk":
        engine = untrained_engine(SMALL.replace(graphs="chunk"))
    stream = engine.generate_stream("waves", num_frames=None, seed=0)
    sizes = {}
    for chunk in stream:
        if chunk.index in (5, 39):
            del chunk
            sizes[len(sizes)] = live_tensor_bytes()
        if len(sizes) == 2:
            break
    stream.close()
    assert sizes[1] <= sizes[0], f"live tensor bytes grew from {sizes[0]} to {sizes[1]} between chunks 5 and 39"


def test_set_prompt_blends_into_the_new_prompt(engine: Engine) -> None:
    """After a switch the text embedding moves to the new prompt over prompt_blend_chunks chunks."""
    stream = engine.generate_stream("a quiet forest", num_frames=None, seed=1)
    next(stream)
    first = stream._prompt.target
    stream.set_prompt("a busy city street")
    target = stream._prompt.target
    seen = [stream._prompt.next() for _ in range(SMALL.prompt_blend_chunks + 1)]
    weights = [((s - first).norm() / (target - first).norm()).item() for s in seen]
    assert weights == pytest.approx([(i + 1) / SMALL.prompt_blend_chunks for i in range(3)] + [1.0], abs=1e-5)
    stream.close()


def test_close_ends_iteration_and_frees_buffers(engine: Engine) -> None:
    stream = engine.generate_stream("a lighthouse", num_frames=None, seed=2)
    next(stream)
    stream.close()
    assert stream._history is None
    with pytest.raises(StopIteration):
        next(stream)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(prompt=""), ValueError, "prompt is empty"),
        (dict(prompt="   "), ValueError, "prompt is empty"),
        (dict(prompt=3), TypeError, "prompt must be a str"),
        (dict(prompt="x", num_frames=0), ValueError, "num_frames must be a positive integer"),
        (dict(prompt="x", num_frames=-5), ValueError, "num_frames must be a positive integer"),
        (dict(prompt="x", image=np.zeros((32, 32, 3), np.uint8)), ValueError, "input frames are 32x32"),
        (dict(prompt="x", image=np.zeros((64, 64), np.uint8)), ValueError, r"image must be uint8 \[H, W, 3\]"),
        (dict(prompt="x", image=np.zeros((64, 64, 3), np.float32)), ValueError, "frames must be uint8"),
        (dict(prompt="x", video=np.zeros((20, 64, 64, 3), np.uint8)), ValueError, "at least 33 frames"),
        (
            dict(prompt="x", image=np.zeros((64, 64, 3), np.uint8), video=np.zeros((40, 64, 64, 3), np.uint8)),
            ValueError,
            "not both",
        ),
        (dict(prompt_embeds=torch.zeros(1, 4, 7)), ValueError, r"prompt_embeds must be \[1, S, 64\]"),
    ],
)
def test_bad_inputs_raise_clear_errors(engine: Engine, kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        engine.generate_stream(**kwargs)


@pytest.mark.parametrize(("height", "width"), [(100, 64), (64, 72)])
def test_resolution_not_on_the_pyramid_grid_is_refused(height: int, width: int) -> None:
    with pytest.raises(ValueError, match="is not a multiple of 64"):
        untrained_engine(SMALL.replace(height=height, width=width))


def test_folder_that_is_not_a_checkpoint(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not a Helios checkpoint folder"):
        Engine.from_pretrained(tmp_path, SMALL)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(height=0), r"EngineConfig\.height=0"),
        (dict(dtype="fp8"), r"EngineConfig\.dtype='fp8'"),
        (dict(kernels="cuda"), r"EngineConfig\.kernels='cuda'"),
        (dict(pyramid_steps=(1, 0, 1)), r"EngineConfig\.pyramid_steps"),
        (dict(guidance_scale=0.5), r"EngineConfig\.guidance_scale=0\.5"),
        (dict(device="tpu"), r"EngineConfig\.device='tpu'"),
    ],
)
def test_engine_config_names_the_bad_field(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(**changes)


def test_pyramid_steps_must_match_the_stage_count() -> None:
    with pytest.raises(ValueError, match=r"pyramid_steps=\(1, 1\) has 2 entries but .* 3 stages"):
        untrained_engine(SMALL.replace(pyramid_steps=(1, 1)))


def test_generate_needs_a_frame_count_and_a_closed_stream_takes_no_prompt(engine: Engine) -> None:
    with pytest.raises(ValueError, match="generate\\(\\) collects the whole video"):
        engine.generate("a lighthouse", num_frames=None)
    stream = engine.generate_stream("a lighthouse", num_frames=33)
    stream.close()
    with pytest.raises(RuntimeError, match="stream is closed"):
        stream.set_prompt("a harbour")


def test_options_that_do_not_apply_to_the_checkpoint_are_refused() -> None:
    with pytest.raises(ValueError, match="num_inference_steps applies to HeliosPipeline"):
        untrained_engine(SMALL.replace(num_inference_steps=10))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_a_cuda_engine_without_cuda_is_refused_before_loading() -> None:
    with pytest.raises(ValueError, match="device cuda: .*use device cpu"):
        Engine.from_pretrained("/nonexistent/checkpoint", EngineConfig(device="cuda"))
