"""The motion test's measure on rendered scenes (a true scene does not jump, a moved chunk jumps by its move,
a missing object is a missing boundary), and scripts/eval_demo.py's summary and wider sample."""

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
    # 0.85 px a frame, so a measure that forgets the velocity is off by more than the bounds below; 66
    # frames from (11, 11) end at 50, short of the far edge's 54: no bounce to extrapolate across. A circle:
    # a square's thresholded edge moves in whole pixels, and its centroid wobbles by up to 0.7 px.
    return scenes.Scene("red", "circle", "blue", 11.0, 11.0, 0.6, 0.6)


def test_a_true_scene_does_not_jump(measures):
    (jump,) = measures.boundary_jumps(_video(_scene(), 2), "blue")
    assert jump is not None and jump < 0.4, jump


def test_a_moved_chunk_jumps_by_its_move(measures):
    video = _video(_scene(), 2)
    video[1] = np.roll(video[1], 10, axis=2)  # chunk 1, 10 px to the right
    (jump,) = measures.boundary_jumps(video, "blue")
    assert jump == pytest.approx(10.0, abs=0.4)


def test_a_missing_object_is_a_missing_boundary(measures):
    video = _video(_scene(), 2)
    video[1][0] = video[1][0][0, 0]  # chunk 1 starts with background only
    assert measures.boundary_jumps(video, "blue") == [None]


def test_the_summary_counts_unrounded_jumps_against_the_tests_bounds(eval_demo, measures):
    bound = measures.JUMP_PX
    assert eval_demo.summary([None, bound + 0.04, bound - 0.04, 1.0], measures) == {
        "boundaries": 4,
        "within": 2,
        "missing": 1,
        "farther": 1,
        "max": round(bound + 0.04, 1),
        "test_would_pass": False,  # 8.04 > 8, though it prints as 8.0
    }
    assert eval_demo.summary([None, 1.0, 2.0, 3.0], measures)["test_would_pass"]
    assert not eval_demo.summary([None, None, 2.0, 3.0], measures)["test_would_pass"]  # half missing


def test_the_wide_sample_is_distinct_captions_the_tests_do_not_use(eval_demo, measures):
    captions = eval_demo.wide_captions(12, measures.CAPTIONS)
    assert len(set(captions)) == 12 and not set(captions) & set(measures.CAPTIONS)
    assert captions == eval_demo.wide_captions(12, measures.CAPTIONS)
    for obj, shape, background in captions:
        assert obj != background and shape in scenes.SHAPES
    with pytest.raises(ValueError, match="--wide 85"):
        eval_demo.wide_captions(85, measures.CAPTIONS)
