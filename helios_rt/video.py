"""Frames in and out: mp4 writing through PyAV, and reading images and videos for I2V and V2V.

The writer appends each batch of frames (a chunk) as a fragment of a fragmented mp4 and hands it to
the OS before returning (`fmp4`), so the file grows playable chunk by chunk: whatever stops the
process afterwards (SIGKILL, a crash, a full disk) keeps every chunk written before it.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import InputError, OutputError
from .fmp4 import continue_fragments, encode_batch
from .optional import require


class Mp4Writer:
    """Append uint8 `[T, H, W, 3]` frames to an H.264 mp4; each `write` is on disk, playable, when it returns.

    A write that fails (disk full, file-size limit) raises `OutputError` after cutting the file back
    to the frames written before it, so the file stays playable. `close()` only closes the file (a
    writer that wrote nothing removes it: an empty mp4 is not a video).
    """

    def __init__(self, path: str | Path, fps: int = 24, crf: int = 18) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.path = Path(path)
        if self.path.suffix.lower() != ".mp4":
            raise ValueError(f"output path {self.path} must end in .mp4")
        self.fps, self.crf = fps, crf
        require("av")  # missing PyAV fails here, before a chunk is generated, not at the first write
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        except OSError as err:
            raise OutputError(f"cannot write {self.path} ({err.strerror}); choose another --out") from None
        self._size: tuple[int, int] | None = None
        self._init: bytes | None = None
        self._sequence, self._decode_time = 1, 0
        self.bytes_written = 0
        self.frames_written = 0

    def write(self, frames: np.ndarray | torch.Tensor) -> None:
        if self._fd is None:
            raise RuntimeError(f"the writer of {self.path} is closed")
        frames = _as_uint8_numpy(frames)
        if self._size is None:
            h, w = frames.shape[1:3]
            if h % 2 or w % 2:
                raise ValueError(f"H.264 needs even frame sizes, got {h}x{w}")
        elif frames.shape[1:3] != self._size:
            raise ValueError(f"frame size changed from {self._size} to {frames.shape[1:3]}")
        batch = encode_batch(frames, self.fps, self.crf)
        if self._init is not None and batch.init != self._init:
            raise RuntimeError("the encoder changed its stream header between chunks; the file cannot continue")
        data, sequence, decode_time = continue_fragments(batch.fragments, self._sequence, self._decode_time)
        self._append((batch.init if self._init is None else b"") + data, len(frames))
        self._size, self._init = frames.shape[1:3], batch.init
        self._sequence, self._decode_time = sequence, decode_time
        self.frames_written += len(frames)

    def _append(self, data: bytes, frames: int) -> None:
        """Write all of `data` or none of it: on an error the partial tail is cut off again."""
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as err:
            os.ftruncate(self._fd, self.bytes_written)
            first = self.frames_written
            raise OutputError(
                f"could not write frames {first}-{first + frames - 1} to {self.path} ({err.strerror}); "
                f"kept {first} frames in {self.path}"
            ) from None
        self.bytes_written += len(data)

    def close(self) -> None:
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        if self.frames_written == 0:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _as_uint8_numpy(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    return np.ascontiguousarray(frames)


@dataclass
class Video:
    """A finished generation: uint8 frames `[T, H, W, 3]`."""

    frames: np.ndarray
    fps: int = 24
    info: dict = field(default_factory=dict)

    def save(self, path: str | Path, fps: int | None = None) -> Path:
        with Mp4Writer(path, fps or self.fps) as writer:
            writer.write(self.frames)
        return Path(path)

    def __len__(self) -> int:
        return len(self.frames)


class VideoFile:
    """A video file read lazily: iterating decodes its first video stream one uint8 `[H, W, 3]` frame at a time.

    Opening checks that the file exists and has a video stream, so a bad `--video` fails before the
    model loads; decoding waits until the frames are consumed. V2V (`generate_stream(video=...)`)
    keeps only the frames its history can see, so a long input is never held in memory whole.
    """

    def __init__(self, path: str | Path) -> None:
        av = require("av")  # before the model loads when the CLI opens --video

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(
                f"{self.path} is not a file" if self.path.exists() else f"video {self.path} does not exist"
            )
        try:
            with av.open(str(self.path)) as container:
                if not container.streams.video:
                    raise InputError(
                        f"{self.path} has no video stream (only {_stream_kinds(container)}); pass a video file"
                    )
        except av.error.FFmpegError as err:
            raise InputError(f"{self.path} is not a readable video ({err})") from None

    def __iter__(self) -> Iterator[np.ndarray]:
        return (_rgb(frame) for frame in self.decoded())

    def decoded(self) -> Iterator:
        """The decoded `av.VideoFrame`s, not yet converted to RGB (the conversion costs more than decoding)."""
        av = require("av")

        count = 0
        try:
            with av.open(str(self.path)) as container:
                for frame in container.decode(video=0):
                    count += 1
                    yield frame
        except av.error.FFmpegError as err:
            raise InputError(f"{self.path} is not a readable video ({err})") from None
        if count == 0:
            raise InputError(f"{self.path} has no video frames")


def _rgb(frame) -> np.ndarray:
    return frame.to_ndarray(format="rgb24")


def read_video(path: str | Path) -> np.ndarray:
    """Decode every frame of a video file's first video stream to uint8 `[T, H, W, 3]`."""
    return np.stack(list(VideoFile(path)))


def first_and_last_frames(
    video: np.ndarray | torch.Tensor | Iterable, last: int
) -> tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor, int]:
    """(first frame `[1, H, W, 3]`, the last `last` frames (fewer if the video is shorter), frame count).

    `video` is `[T, H, W, 3]` (sliced, not copied) or an iterable of `[H, W, 3]` frames, read once
    while holding at most `last` of them: what V2V needs from a video of any length.
    """
    if isinstance(video, (np.ndarray, torch.Tensor)):
        if video.ndim != 4 or len(video) == 0:
            raise InputError(f"video must be uint8 [T, H, W, 3] with T >= 1, got {list(video.shape)}")
        return video[:1], video[max(len(video) - last, 0) :], len(video)
    # a file's frames stay decoded but unconverted until they are known to be kept
    frames, convert = (video.decoded(), _rgb) if isinstance(video, VideoFile) else (video, np.asarray)
    first, tail, count = None, deque(maxlen=last), 0
    for frame in frames:
        first = frame if first is None else first
        tail.append(frame)
        count += 1
    if first is None:
        raise InputError("video has no frames")
    return _stack([convert(first)]), _stack(convert(f) for f in tail), count


def _stack(frames: Iterable) -> np.ndarray:
    frames = [np.asarray(f) for f in frames]
    if any(f.ndim != 3 for f in frames):
        shape = next(list(f.shape) for f in frames if f.ndim != 3)
        raise InputError(f"video frames must be uint8 [H, W, 3], got a frame of shape {shape}")
    return np.stack(frames)


def _stream_kinds(container) -> str:
    kinds = sorted({s.type for s in container.streams})
    return ", ".join(kinds) + " streams" if kinds else "no streams"


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file to uint8 `[H, W, 3]` (through PyAV, which decodes png/jpeg as one-frame videos)."""
    frames = read_video(path)
    return frames[0]
