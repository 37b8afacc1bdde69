"""V2V reads and encodes only the windows its history can see, and leaves the reference's random stream.

The reference encodes every 33-frame window of the input (aligned to its end) and noises each; only
the newest 19 latent frames reach the history, i.e. the last three windows. The engine encodes those
three and makes the older windows' random draws without computing them. These tests hold it to the
encode-everything path it replaces; test_v2v_oracle.py holds it to diffusers on a long input.
"""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch

from helios_rt import Engine
from helios_rt.errors import InputError
from helios_rt.sampling.history import HistoryMemory, augment_video_latents
from helios_rt.video import Mp4Writer, VideoFile, first_and_last_frames, read_video

WINDOW = 33
# The kept windows go through the encoder as one batch, whose convolutions round differently from
# three batch-1 calls (measured 3e-6 on these latents); a misplaced window or draw differs by ~1.
BATCHED_ROUNDING = 1e-5


def random_video(frames: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, 64, 64, 3), dtype=np.uint8)


def every_window_history(engine: Engine, video: np.ndarray, generator: torch.Generator) -> torch.Tensor:
    """The reference's V2V conditioning: the first frame, then every end-aligned window encoded in turn,
    all of them noised, the newest latents written to the history."""
    first = engine.encode_pixels(video[:1], generator)
    starts = range(len(video) % WINDOW, len(video), WINDOW)
    latents = torch.cat([engine.encode_pixels(video[s : s + WINDOW], generator) for s in starts], dim=2)
    first, latents = augment_video_latents(first, latents, generator, engine.config.latent_frames_per_chunk)
    memory = HistoryMemory(engine.history_layout, 1, engine.transformer.config.in_channels, *engine.latent_hw)
    memory.init_video(first, latents)
    return memory.buffer


def conditioned(engine: Engine, video, seed: int) -> tuple[torch.Tensor, torch.Generator]:
    """The history a V2V stream starts from, and its generator after conditioning."""
    generator = torch.Generator().manual_seed(seed)
    with engine.generate_stream("a fish", video=video, num_frames=33, seed=generator) as stream:
        return stream._history.buffer.clone(), generator


def test_history_and_random_stream_match_encoding_every_window(tiny_engine: Engine) -> None:
    """139 frames: four windows after a 7-frame offset, the oldest of which the history cannot see."""
    video = random_video(4 * WINDOW + 7)
    reference = torch.Generator().manual_seed(9)
    expected = every_window_history(tiny_engine, video, reference)
    got, generator = conditioned(tiny_engine, video, seed=9)
    assert torch.equal(generator.get_state(), reference.get_state()), "the chunks would draw other noise"
    diff = (got - expected).abs()
    assert diff.max() <= BATCHED_ROUNDING, f"history differs by {diff.max():.2e} at {diff.argmax().item()}"


def test_a_one_window_video_is_unchanged(tiny_engine: Engine) -> None:
    """40 frames: one window, encoded alone as before, so the history is bit for bit the same."""
    video = random_video(40, seed=1)
    reference = torch.Generator().manual_seed(2)
    expected = every_window_history(tiny_engine, video, reference)
    got, generator = conditioned(tiny_engine, video, seed=2)
    assert torch.equal(generator.get_state(), reference.get_state())
    assert torch.equal(got, expected)


def test_an_iterable_video_is_read_once_holding_only_the_kept_frames(tiny_engine: Engine) -> None:
    base = random_video(1, seed=3)[0]
    refs: list[weakref.ref] = []
    peak = 0

    def frames():
        nonlocal peak
        for t in range(600):
            frame = np.roll(base, t, axis=1)
            refs.append(weakref.ref(frame))
            peak = max(peak, sum(r() is not None for r in refs))
            yield frame

    got, generator = conditioned(tiny_engine, frames(), seed=4)
    # three windows, the first frame and the one being handed over
    assert peak <= 3 * WINDOW + 2, f"{peak} frames were alive at once while reading 600"
    whole = np.stack([np.roll(base, t, axis=1) for t in range(600)])
    expected, reference = conditioned(tiny_engine, whole, seed=4)
    assert torch.equal(generator.get_state(), reference.get_state())
    assert torch.equal(got, expected)


def test_a_video_file_gives_what_its_decoded_frames_give(tiny_engine: Engine, tmp_path) -> None:
    path = tmp_path / "in.mp4"
    with Mp4Writer(path) as writer:
        writer.write(random_video(80, seed=5))
    frames = read_video(path)
    first, tail, count = first_and_last_frames(VideoFile(path), 2 * WINDOW)
    assert count == 80
    np.testing.assert_array_equal(first, frames[:1])
    np.testing.assert_array_equal(tail, frames[-2 * WINDOW :])
    got, _ = conditioned(tiny_engine, VideoFile(path), seed=6)
    expected, _ = conditioned(tiny_engine, frames, seed=6)
    assert torch.equal(got, expected)


def test_short_and_malformed_videos_name_the_problem(tiny_engine: Engine) -> None:
    with pytest.raises(InputError, match="at least 33 frames, got 32 frames"):
        tiny_engine.generate_stream("x", video=iter(random_video(32)), num_frames=33)
    with pytest.raises(InputError, match=r"frames must be uint8 \[H, W, 3\], got a frame of shape \[64, 64\]"):
        tiny_engine.generate_stream("x", video=iter(np.zeros((40, 64, 64), np.uint8)), num_frames=33)
    with pytest.raises(InputError, match="video has no frames"):
        tiny_engine.generate_stream("x", video=iter([]), num_frames=33)
