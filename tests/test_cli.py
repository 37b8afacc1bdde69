"""`helios-rt generate` end to end on the demo model, and mp4 writing."""

from __future__ import annotations

import numpy as np
import pytest

from helios_rt.cli import main
from helios_rt.video import Mp4Writer, read_video


@pytest.mark.parametrize("num_frames", [40, 66])
def test_generate_demo_writes_exactly_the_frames_asked_for(tmp_path, capsys, num_frames: int) -> None:
    out = tmp_path / "demo.mp4"
    code = main(
        [
            "generate",
            "--model",
            "demo",
            "--prompt",
            "a tropical fish among corals",
            "--num-frames",
            str(num_frames),
            "--height",
            "64",
            "--width",
            "64",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    frames = read_video(out)
    assert frames.shape == (num_frames, 64, 64, 3)  # two chunks of 33 made; the second trimmed for 40
    err = capsys.readouterr().err
    assert f"wrote {num_frames} frames" in err and "first frame after" in err and "FPS" in err


@pytest.mark.parametrize("seed", ["-1", str(2**64), "1.5"])
def test_generate_rejects_a_bad_seed_before_loading(seed: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", "demo", "--prompt", "x", "--seed", seed])
    assert exit_info.value.code == 2
    assert "--seed" in capsys.readouterr().err


def test_generate_reports_bad_input_without_a_traceback(tmp_path, capsys) -> None:
    code = main(
        [
            "generate",
            "--model",
            "demo",
            "--prompt",
            "  ",
            "--out",
            str(tmp_path / "x.mp4"),
            "--height",
            "64",
            "--width",
            "64",
        ]
    )
    assert code == 3  # an input error
    assert "prompt is empty" in capsys.readouterr().err


def test_generate_rejects_a_non_positive_frame_count() -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--model", "demo", "--prompt", "x", "--num-frames", "0"])


def test_an_interrupted_write_keeps_the_frames_made_so_far(tmp_path) -> None:
    out = tmp_path / "partial.mp4"
    frames = np.random.default_rng(0).integers(0, 255, (10, 32, 48, 3), dtype=np.uint8)
    with pytest.raises(KeyboardInterrupt), Mp4Writer(out, fps=24) as writer:
        writer.write(frames)
        raise KeyboardInterrupt
    assert read_video(out).shape == (10, 32, 48, 3)


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (np.zeros((2, 31, 32, 3), np.uint8), "even frame sizes"),
        (np.zeros((2, 32, 32, 3), np.float32), "frames must be uint8"),
    ],
)
def test_mp4_writer_rejects_bad_frames(tmp_path, frames, message) -> None:
    with pytest.raises(ValueError, match=message), Mp4Writer(tmp_path / "x.mp4") as writer:
        writer.write(frames)


def test_mp4_writer_needs_an_mp4_path(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"must end in \.mp4"):
        Mp4Writer(tmp_path / "x.avi")


def test_generate_verbose_prints_the_cold_start_by_phase(tmp_path, capsys) -> None:
    """--verbose: one line of the cold start (load with its rate, plan with where the plans came from, the
    first chunk, the first frame), after the attention line that follows the warm-up."""
    args = ["generate", "--model", "demo", "--prompt", "x", "--num-frames", "33", "--height", "64", "--width", "64",
            "--device", "cpu", "--graphs", "chunk", "--out", str(tmp_path / "v.mp4")]  # fmt: skip
    assert main([*args, "--verbose"]) == 0
    err = capsys.readouterr().err
    assert "helios-rt: attention:" in err
    (line,) = [x for x in err.splitlines() if "cold start:" in x]
    for phase in ("load ", "GB/s", "plan ", "loaded,", "made)", "first chunk ", "first frame at "):
        assert phase in line, f"{phase!r} missing from {line!r}"
    assert main(args) == 0 and "cold start:" not in capsys.readouterr().err
