"""The motion test's measure, as scripts/eval_demo.py reports it: a true scene does not jump, a moved chunk jumps
by its move, a missing object is a missing boundary; and the script's summary and wider sample."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from helios_rt.demo import scenes

REPO = Path(__file__).resolve().parents[1]
SIZE = 64


@pytest.fixture(scope="module")
def eval_demo():
    spec = importlib.util.spec_from_file_location("eval_demo", REPO / "scripts" / "eval_demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def measures(eval_demo):
    return eval_demo.load_measures(REPO)


def _video(scene: scenes.Scene, chunks: int) -> list[np.ndarray]:
    """`chunks` chunks of 33 uint8 `[H, W, 3]` frames of `scene`, as the engine hands them out."""
    out = []
    for _ in range(chunks):
        clip, scene = scenes.clip(scene, 33, SIZE, SIZE)
        out.append(((clip.numpy() + 1) * 127.5).round().astype(np.uint8).transpose(1, 2, 3, 0))
    return out


def _scene() -> scenes.Scene:
    # slow enough (0.3 px a frame) that 99 frames never reach an edge: no bounce to extrapolate across
    return scenes.Scene("red", "square", "blue", 20.0, 24.0, 0.3, 0.15)


def test_a_true_scene_does_not_jump(eval_demo, measures):
    jumps = eval_demo.jumps(measures, _video(_scene(), 3), "blue")
    assert len(jumps) == 2 and all(j is not None and j < 0.5 for j in jumps), jumps


def test_a_moved_chunk_jumps_by_its_move(eval_demo, measures):
    video = _video(_scene(), 2)
    video[1] = np.roll(video[1], 10, axis=2)  # chunk 1, 10 px to the right
    (jump,) = eval_demo.jumps(measures, video, "blue")
    assert jump == pytest.approx(10.0, abs=0.6)


def test_a_missing_object_is_a_missing_boundary(eval_demo, measures):
    video = _video(_scene(), 3)
    video[1][0] = video[1][0][0, 0]  # chunk 1 starts with background only
    jumps = eval_demo.jumps(measures, video, "blue")
    assert jumps[0] is None and jumps[1] is not None
    assert eval_demo.summary(jumps + [9.0], 8.0) == {
        "boundaries": 3,
        "within": 1,
        "missing": 1,
        "farther": 1,
        "max": 9.0,
    }


def test_the_wide_sample_draws_valid_captions(eval_demo):
    captions = eval_demo.wide_captions(12)
    assert len(set(captions)) > 6
    for obj, shape, background in captions:
        assert obj != background and shape in scenes.SHAPES
        assert scenes.parse_caption(scenes.caption(obj, shape, background)) == (obj, shape, background)
