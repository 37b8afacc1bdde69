"""Frames in and out of the server: JPEG encoding of chunks, decoding of uploaded images (PyAV).

JPEG frames drawn on a canvas were chosen over WebM/VP9 through Media Source Extensions: every
frame stands alone (a slow or reconnecting client never waits for a keyframe, a frame can be
compared pixel for pixel with what the engine made), Chromium decodes them without proprietary
codecs, and `av` (already a runtime dependency) encodes MJPEG, so nothing new is installed.
The cost is bandwidth: `helios_rt.serve.measure` reports bytes per chunk for both.
"""

from __future__ import annotations

import fractions

import av
import numpy as np

from .protocol import ProtocolError

_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG = b"\xff\xd8\xff"


CHROMA = {"444": "yuvj444p", "420": "yuvj420p"}


class JpegEncoder:
    """RGB uint8 `[H, W, 3]` frames -> baseline JPEG bytes, at a fixed quantiser.

    4:4:4 by default: with 4:2:0 the picture depends on how the decoder upsamples chroma, and
    Chromium's and FFmpeg's differ by ~6 levels on the demo's detailed frames (0.06 with 4:4:4);
    4:2:0 halves the bytes of those frames (`python -m helios_rt.serve.measure`), for remote clients.
    """

    def __init__(self, height: int, width: int, qscale: int = 3, chroma: str = "444") -> None:
        if chroma not in CHROMA:
            raise ValueError(f"chroma must be one of {sorted(CHROMA)}, got {chroma!r}")
        self.height, self.width, self.qscale, self.pix_fmt = height, width, qscale, CHROMA[chroma]

    def _context(self) -> av.CodecContext:
        ctx = av.CodecContext.create("mjpeg", "w")
        ctx.width, ctx.height = self.width, self.height
        ctx.pix_fmt = self.pix_fmt
        ctx.time_base = fractions.Fraction(1, 24)
        ctx.qmin = ctx.qmax = self.qscale  # the MJPEG encoder's quality knob
        return ctx

    def encode(self, frames: np.ndarray) -> list[bytes]:
        """Each frame of `[T, H, W, 3]` as one JPEG (one codec context per call: thread-safe)."""
        if frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3) or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [T, {self.height}, {self.width}, 3], got {frames.dtype} "
                             f"{list(frames.shape)}")  # fmt: skip
        ctx = self._context()
        out = []
        for i, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            picture = picture.reformat(format=self.pix_fmt)
            picture.pts = i
            out.extend(bytes(packet) for packet in ctx.encode(picture))
        out.extend(bytes(packet) for packet in ctx.encode(None))
        if len(out) != len(frames):
            raise RuntimeError(f"the MJPEG encoder returned {len(out)} packets for {len(frames)} frames")
        return out


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes -> RGB uint8 `[H, W, 3]` (tests and tools)."""
    return _decode(data, "mjpeg")


def decode_image(data: bytes, height: int, width: int) -> np.ndarray:
    """An uploaded PNG or JPEG -> RGB uint8 `[height, width, 3]`; anything else is a `ProtocolError`.

    The type is read from the file's signature, never from a name the client gives, and the size
    must be the engine's: the page crops and scales the image before it uploads it.
    """
    if data.startswith(_PNG):
        codec = "png"
    elif data.startswith(_JPEG):
        codec = "mjpeg"
    else:
        raise ProtocolError("'image' is neither a PNG nor a JPEG file (by its first bytes); upload a PNG or JPEG")
    try:
        image = _decode(data, codec)
    except (av.FFmpegError, ValueError) as err:
        kind = "PNG" if codec == "png" else "JPEG"
        raise ProtocolError(f"'image' could not be decoded as {kind}: {err}") from None
    if image.shape[:2] != (height, width):
        raise ProtocolError(
            f"'image' is {image.shape[1]}x{image.shape[0]} but the model runs at {width}x{height}; "
            "scale and crop it to that size (the page does this before uploading)"
        )
    return image


def _decode(data: bytes, codec: str) -> np.ndarray:
    ctx = av.CodecContext.create(codec, "r")
    frames = ctx.decode(av.Packet(data)) + ctx.decode(None)
    if not frames:
        raise ValueError("no picture in the data")
    return frames[0].to_ndarray(format="rgb24")
