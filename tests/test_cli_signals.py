"""`helios-rt generate` stopped from outside: SIGTERM, SIGINT and a file-size limit keep what was written.

Each test spawns the CLI on the demo model (64x64, about 4 s a chunk here) and stops it around its
second chunk (66 frames): after it is on disk (read from the progress lines on stderr), or while it is
being written (a writer that stops halfway through the chunk's bytes until the signal has come).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helios_rt.cli import EXIT_RUNTIME
from helios_rt.video import read_video

ARGS = ["generate", "--model", "demo", "--prompt", "a lighthouse", "--num-frames", "330"]
ARGS += ["--height", "64", "--width", "64", "--device", "cpu"]
# the file-size limit falls 1000 bytes into the third chunk: the first two are exactly on disk by then
LIMITED = """
import resource, sys
from helios_rt import cli, video
write = video.Mp4Writer.write
def write_under_a_limit(self, frames):
    if self.frames_written == 66:
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.bytes_written + 1000, resource.RLIM_INFINITY))
    write(self, frames)
video.Mp4Writer.write = write_under_a_limit
sys.exit(cli.main(sys.argv[1:]))
"""
# The writer's `os` is wrapped so that chunk two's bytes go to disk in two halves, with the signal
# delivered between them: the child says when half is written, then blocks until the signal has come
# (signal.set_wakeup_fd writes its number to a pipe even when the handler only defers it), so the
# signal provably lands inside `Mp4Writer.write`, not while a chunk is computed.
MID_WRITE = """
import os, signal, sys
from helios_rt import cli, video

class HalvedWrites:
    armed = False

    def __getattr__(self, name):
        return getattr(os, name)

    def write(self, fd, data):
        if not self.armed:
            return os.write(fd, data)
        self.armed = False
        half = os.write(fd, data[: len(data) // 2])
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        print(f"half written: {half} of {len(data)} bytes", file=sys.stderr, flush=True)
        signum = os.read(wake_r, 1)[0]
        print(f"signal {signum} came mid-write", file=sys.stderr, flush=True)
        return half  # the writer's loop writes the rest

halved = video.os = HalvedWrites()
write = video.Mp4Writer.write
def write_chunk_two_in_halves(self, frames):
    halved.armed = self.frames_written == 33
    write(self, frames)
video.Mp4Writer.write = write_chunk_two_in_halves
sys.exit(cli.main(sys.argv[1:]))
"""


def spawn(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


def wait_for_line(child: subprocess.Popen, text: str, timeout_s: float = 120) -> list[str]:
    """Read stderr lines until one contains `text` (the child's progress is one line per chunk)."""
    deadline, lines = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline:
        line = child.stderr.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    child.kill()
    pytest.fail(f"the child never printed {text!r}; stderr:\n{''.join(lines)}")


def finish(child: subprocess.Popen) -> list[str]:
    try:
        rest = child.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        child.kill()
        pytest.fail("the child did not exit within 60 s")
    return rest.strip().splitlines()


@pytest.mark.parametrize(("signum", "name", "code"), [(signal.SIGTERM, "SIGTERM", 143), (signal.SIGINT, "SIGINT", 130)])
def test_a_signal_after_chunk_two_keeps_a_playable_file(tmp_path: Path, signum: int, name: str, code: int) -> None:
    out = tmp_path / "stopped.mp4"
    child = spawn([sys.executable, "-m", "helios_rt.cli", *ARGS, "--out", str(out)])
    wait_for_line(child, "66/330 frames")
    child.send_signal(signum)
    lines = finish(child)
    assert child.returncode == code, lines
    assert lines[-1] == f"helios-rt: stopped by {name}: kept 66 frames in {out}"
    assert not any("Traceback" in line for line in lines)
    assert read_video(out).shape == (66, 64, 64, 3)


@pytest.mark.parametrize(("signum", "name", "code"), [(signal.SIGTERM, "SIGTERM", 143), (signal.SIGINT, "SIGINT", 130)])
def test_a_signal_while_chunk_two_is_written_waits_for_the_whole_chunk(
    tmp_path: Path, signum: int, name: str, code: int
) -> None:
    """The signal is held back until the chunk is whole on disk (`GracefulStop.deferred`), then stops the run."""
    out = tmp_path / "stopped.mp4"
    child = spawn([sys.executable, "-c", MID_WRITE, *ARGS, "--out", str(out)])
    wait_for_line(child, "half written")
    child.send_signal(signum)
    lines = finish(child)
    assert child.returncode == code, lines
    assert lines[-1] == f"helios-rt: stopped by {name}: kept 66 frames in {out}"
    assert not any("Traceback" in line for line in lines)
    assert read_video(out).shape == (66, 64, 64, 3)  # decoded by PyAV: both chunks whole, nothing after them
    # the signal came while the chunk's second half was still to be written, and the write went on
    assert lines[0] == f"signal {int(signum)} came mid-write", lines


def test_a_file_size_limit_at_chunk_three_keeps_chunks_one_and_two(tmp_path: Path) -> None:
    out = tmp_path / "limited.mp4"
    child = spawn([sys.executable, "-c", LIMITED, *ARGS, "--out", str(out)])
    lines = finish(child)
    assert child.returncode == EXIT_RUNTIME, lines
    assert lines[-1] == (
        f"helios-rt: error: could not write frames 66-98 to {out} (File too large); kept 66 frames in {out}"
    )
    assert not any("99/330" in line for line in lines), "generation stops at the chunk that failed"
    assert read_video(out).shape == (66, 64, 64, 3)
