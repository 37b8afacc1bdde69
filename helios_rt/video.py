"""Frames in and out: mp4 writing through PyAV (incrementally, so a long run can be watched while it
grows and an interrupted run keeps what it made), and reading images and videos for I2V and V2V."""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch


class Mp4Writer:
    """Append uint8 `[T, H, W, 3]` frames to an H.264 mp4 as they arrive; `close()` finalises the file."""

    def __init__(self, path: str | Path, fps: int = 24, crf: int = 18) -> None:
        import av

        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.path = Path(path)
        if self.path.suffix.lower() != ".mp4":
            raise ValueError(f"output path {self.path} must end in .mp4")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.path), mode="w")
        self._stream = self._container.add_stream("libx264", rate=Fraction(fps))
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"crf": str(crf)}
        self._size: tuple[int, int] | None = None
        self.frames_written = 0

    def write(self, frames: np.ndarray | torch.Tensor) -> None:
        import av

        frames = _as_uint8_numpy(frames)
        if self._size is None:
            h, w = frames.shape[1:3]
            if h % 2 or w % 2:
                raise ValueError(f"H.264 needs even frame sizes, got {h}x{w}")
            self._stream.height, self._stream.width = h, w
            self._size = (h, w)
        elif frames.shape[1:3] != self._size:
            raise ValueError(f"frame size changed from {self._size} to {frames.shape[1:3]}")
        for frame in frames:
            for packet in self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                self._container.mux(packet)
        self.frames_written += len(frames)

    def close(self) -> None:
        if self._container is None:
            return
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        self._container = None

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


def read_video(path: str | Path) -> np.ndarray:
    """Decode every frame of a video file to uint8 `[T, H, W, 3]`."""
    import av

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"video {path} does not exist")
    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except av.error.FFmpegError as err:
        raise ValueError(f"{path} is not a readable video ({err})") from None
    if not frames:
        raise ValueError(f"{path} has no video frames")
    return np.stack(frames)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file to uint8 `[H, W, 3]` (through PyAV, which decodes png/jpeg as one-frame videos)."""
    frames = read_video(path)
    return frames[0]
