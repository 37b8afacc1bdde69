"""CLI failures: one line naming the problem, an exit code per kind, checked before any weight is read."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helios_rt.cli import EXIT_CHECKPOINT, EXIT_INPUT, EXIT_USAGE, main
from helios_rt.video import read_video

# a checkpoint path that would fail with EXIT_CHECKPOINT if it were read: the cases below fail before it
NO_MODEL = "/nonexistent/Helios-Distilled"
SMALL = ["--height", "64", "--width", "64", "--device", "cpu"]


def audio_only(path: Path) -> Path:
    """A valid media file with one audio stream and no video stream."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate, frame.time_base = 8000, Fraction(1, 8000)
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def embeds_file(path: Path, **tensors: torch.Tensor) -> Path:
    save_file(tensors, str(path))
    return path


def cases(tmp: Path) -> dict[str, tuple[list[str], int, str]]:
    """name -> (arguments after 'generate', exit code, text the one line must contain)."""
    (tmp / "folder.mp4").mkdir()
    (tmp / "a_file").write_text("")
    nan = torch.zeros(1, 5, 64)
    nan[0, 2, 7] = float("nan")
    return {
        "out is a folder": (["--model", NO_MODEL, "--prompt", "x", "--out", str(tmp / "folder.mp4")], EXIT_USAGE,
                            "is a folder"),
        "out cannot be created": (["--model", NO_MODEL, "--prompt", "x", "--out", str(tmp / "a_file" / "o.mp4")],
                                  EXIT_USAGE, "cannot be written"),
        "out is not mp4": (["--model", NO_MODEL, "--prompt", "x", "--out", str(tmp / "o.avi")], EXIT_USAGE,
                           "must end in .mp4"),
        "prompt and embeddings": (["--model", NO_MODEL, "--prompt", "x", "--prompt-embeds", "e.safetensors"],
                                  EXIT_USAGE, "exactly one of --prompt"),
        "no prompt": (["--model", NO_MODEL], EXIT_USAGE, "exactly one of --prompt"),
        "video without a video stream": (["--model", NO_MODEL, "--prompt", "x", "--video",
                                          str(audio_only(tmp / "a.wav"))], EXIT_INPUT, "has no video stream"),
        "prompt not utf-8": (["--model", NO_MODEL, "--prompt", b"caf\xe9".decode("utf-8", "surrogateescape")],
                             EXIT_INPUT, "not valid UTF-8"),
        "embeddings with a wrong key": (["--model", NO_MODEL, "--prompt-embeds",
                                         str(embeds_file(tmp / "k.safetensors", embeds=nan))], EXIT_INPUT,
                                        "must hold 'prompt_embeds'"),
        "nan embeddings": (["--model", "demo", *SMALL, "--prompt-embeds",
                            str(embeds_file(tmp / "n.safetensors", prompt_embeds=nan))], EXIT_INPUT,
                           "prompt_embeds hold NaN or Inf (1 of 320 values)"),
        "not a checkpoint": (["--model", str(tmp), "--prompt", "x"], EXIT_CHECKPOINT, "not a Helios checkpoint"),
        "resolution off the grid": (["--model", "demo", "--prompt", "x", "--height", "100", "--device", "cpu"],
                                    EXIT_USAGE, "height=100 is not a multiple of 8"),  # the demo: VAE x4, patch x2, Base
    }  # fmt: skip


@pytest.mark.parametrize(
    "name",
    [
        "out is a folder",
        "out cannot be created",
        "out is not mp4",
        "prompt and embeddings",
        "no prompt",
        "video without a video stream",
        "prompt not utf-8",
        "embeddings with a wrong key",
        "nan embeddings",
        "not a checkpoint",
        "resolution off the grid",
    ],
)
def test_a_failure_is_one_line_with_its_exit_code(tmp_path, capsys, monkeypatch, name: str) -> None:
    monkeypatch.chdir(tmp_path)
    args, code, text = cases(tmp_path)[name]
    out = ["--out", str(tmp_path / "out.mp4")] if "--out" not in args else []
    assert main(["generate", *args, *out]) == code
    err = capsys.readouterr().err
    # a run that got as far as loading has said which attention runs; the error is the one other line
    lines = [line for line in err.strip().splitlines() if not line.startswith("helios-rt: attention: ")]
    assert len(lines) == 1 and lines[0].startswith("helios-rt: error: ") and text in lines[0], err
    assert not (tmp_path / "out.mp4").exists(), "a failed run leaves no output file"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_usage_error(tmp_path, capsys) -> None:
    out = str(tmp_path / "o.mp4")
    assert main(["generate", "--model", NO_MODEL, "--prompt", "x", "--device", "cuda", "--out", out]) == EXIT_USAGE
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("helios-rt: error: device cuda: ")
    assert lines[0].endswith("; use device cpu (--device cpu) or auto")


def test_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path, capsys) -> None:
    args = ["generate", "--model", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "o.mp4")]
    assert main(["--debug", *args]) == EXIT_CHECKPOINT
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "CheckpointError" in err
    assert err.strip().splitlines()[-1].startswith("helios-rt: error: ")
    assert main([*args, "--debug"]) == EXIT_CHECKPOINT  # after the command too
    assert "Traceback" in capsys.readouterr().err


def test_prompt_embeds_from_a_file_make_the_video_the_prompt_makes(tmp_path, capsys, monkeypatch) -> None:
    from helios_rt.demo import DEMO_CHECKPOINT
    from helios_rt.model.text import HashPromptEncoder, word_encoder_config
    from helios_rt.video import Mp4Writer

    embeds = HashPromptEncoder.from_config(word_encoder_config(DEMO_CHECKPOINT)).encode(["a lighthouse"])
    written: list[np.ndarray] = []
    write = Mp4Writer.write

    def recording(self, frames, *args, **kwargs):
        written.append(np.array(frames))
        return write(self, frames, *args, **kwargs)

    monkeypatch.setattr(Mp4Writer, "write", recording)
    path = embeds_file(tmp_path / "e.safetensors", prompt_embeds=embeds)
    by_text, by_file = tmp_path / "text.mp4", tmp_path / "file.mp4"
    common = ["generate", "--model", "demo", *SMALL, "--num-frames", "33", "--dtype", "float32"]
    assert main([*common, "--prompt", "a lighthouse", "--out", str(by_text)]) == 0
    assert main([*common, "--prompt-embeds", str(path), "--out", str(by_file)]) == 0
    assert read_video(by_file).shape == (33, 64, 64, 3)
    # the frames handed to the writer (x264's bytes for equal frames are its own business)
    assert len(written) == 2 and np.array_equal(written[0], written[1])
