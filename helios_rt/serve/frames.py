"""Frames in and out of the server: JPEG encoding of chunks, decoding of uploaded images (PyAV).

JPEG frames drawn on a canvas were chosen over WebM/VP9 through Media Source Extensions: every
frame stands alone (a slow or reconnecting client never waits for a keyframe, a frame can be
compared pixel for pixel with what the engine made), Chromium decodes them without proprietary
codecs, and `av` (already a runtime dependency) encodes MJPEG, so nothing new is installed.
The cost is bandwidth: `helios_rt.serve.measure` reports bytes per chunk for both.
"""

from __future__ import annotations

import fractions
import struct

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
        codec, size = "png", _png_size(data)
    elif data.startswith(_JPEG):
        codec, size = "mjpeg", _jpeg_size(data)
    else:
        raise ProtocolError("'image' is neither a PNG nor a JPEG file (by its first bytes); upload a PNG or JPEG")
    kind = "PNG" if codec == "png" else "JPEG"
    if size is None:
        raise ProtocolError(f"'image' could not be decoded as {kind}: no image size in its header")
    _check_size(size, height, width)  # from the header, before a decode that could allocate width x height pixels
    try:
        image = _decode(data, codec)
    except (av.FFmpegError, ValueError) as err:
        raise ProtocolError(f"'image' could not be decoded as {kind}: {err}") from None
    _check_size(image.shape[:2], height, width)
    return image


def _check_size(size: tuple[int, int], height: int, width: int) -> None:
    if tuple(size) != (height, width):
        raise ProtocolError(
            f"'image' is {size[1]}x{size[0]} but the model runs at {width}x{height}; "
            "scale and crop it to that size (the page does this before uploading)"
        )


def _png_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a PNG's IHDR chunk, which must come first; None if it does not."""
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return height, width


# start-of-frame markers (baseline, progressive, lossless, ...); C4, C8 and CC are other segments
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's start-of-frame segment, walking the segments before it; None if absent."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # segments without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _SOF:
            if length < 7 or i + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return height, width
        i += 2 + length
    return None


def _decode(data: bytes, codec: str) -> np.ndarray:
    ctx = av.CodecContext.create(codec, "r")
    frames = ctx.decode(av.Packet(data)) + ctx.decode(None)
    if not frames:
        raise ValueError("no picture in the data")
    return frames[0].to_ndarray(format="rgb24")
