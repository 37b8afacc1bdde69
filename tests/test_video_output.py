"""The mp4 writer: every write is playable on disk when it returns; a failed write keeps the rest."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import av
import numpy as np
import pytest

from helios_rt.video import Mp4Writer, read_video


def batches() -> list[np.ndarray]:
    """Three batches a reader can tell apart: smooth frames at three grey levels (the last one short).

    Smooth, because H.264 at yuv420p keeps smooth images to a few levels but not per-pixel RGB noise.
    """
    ramp = np.linspace(0, 40, 48, dtype=np.float32)[None, None, :, None]
    frame = lambda level, n: np.broadcast_to(level + ramp, (n, 32, 48, 3)).astype(np.uint8)  # noqa: E731
    return [frame(40, 33), frame(100, 33), frame(180, 7)]


def presentation_times(path) -> list[int]:
    with av.open(str(path)) as container:
        return [frame.pts for frame in container.decode(video=0)]


def test_each_write_is_playable_before_the_writer_is_closed(tmp_path) -> None:
    out = tmp_path / "grow.mp4"
    written = 0
    with Mp4Writer(out, fps=24) as writer:
        for batch in batches():
            writer.write(batch)
            written += len(batch)
            frames = read_video(out)  # read while the writer is still open: as after a SIGKILL here
            assert frames.shape == (written, 32, 48, 3)
            assert np.abs(frames[written - len(batch) :].astype(int) - batch).max() <= 3
    times = presentation_times(out)
    steps = set(np.diff(times))
    assert len(times) == 73 and len(steps) == 1 and steps.pop() > 0, "frames continue in time across the fragments"


def test_a_writer_that_wrote_nothing_leaves_no_file(tmp_path) -> None:
    out = tmp_path / "nothing.mp4"
    Mp4Writer(out).close()
    assert not out.exists()


def test_a_file_size_limit_keeps_the_writes_before_it(tmp_path) -> None:
    out = tmp_path / "limited.mp4"
    child = textwrap.dedent(
        f"""
        import resource, signal, sys
        import numpy as np
        sys.path.insert(0, {str(tmp_path)!r})
        from helios_rt.errors import OutputError
        from helios_rt.video import Mp4Writer
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # as the CLI does: the limit becomes an OSError
        rng = np.random.default_rng(0)
        with Mp4Writer({str(out)!r}) as writer:
            for k in range(3):
                if k == 2:
                    limit = writer.bytes_written + 1000
                    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
                try:
                    writer.write(rng.integers(0, 255, (33, 32, 48, 3), dtype=np.uint8))
                except OutputError as err:
                    print(err)
                    sys.exit(5)
        """
    )
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert result.returncode == 5, result.stderr
    assert result.stdout.strip() == f"could not write frames 66-98 to {out} (File too large); kept 66 frames in {out}"
    assert read_video(out).shape == (66, 32, 48, 3)


@pytest.mark.parametrize("make", ["a directory", "under a file"])
def test_an_unwritable_path_is_an_output_error(tmp_path, make: str) -> None:
    from helios_rt.errors import OutputError

    if make == "a directory":
        path = tmp_path / "dir.mp4"
        path.mkdir()
    else:
        (tmp_path / "file").write_text("")
        path = tmp_path / "file" / "x.mp4"
    with pytest.raises(OutputError, match="cannot write .* choose another --out"):
        Mp4Writer(path)
