"""`helios-rt generate` stopped from outside: SIGTERM, SIGINT and a file-size limit keep what was written.

Each test spawns the CLI on the demo model (64x64, about 4 s a chunk here) and stops it after its
second chunk (66 frames) is on disk, which it reads from the progress lines on stderr.
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
