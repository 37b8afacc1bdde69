"""Fragmented MP4 in appendable pieces: each batch of frames becomes bytes that extend a playable file.

A plain mp4 is playable only once its index (`moov`) is written at close, so a process that dies
mid-stream leaves nothing. A fragmented mp4 is an init segment (`ftyp` + an empty `moov`) followed by
self-contained fragments (`moof` + `mdat`); every complete fragment on disk plays. FFmpeg's mov muxer
only writes a fragment when the next one starts (or at close), so instead each batch is encoded by
its own encoder into its own small fragmented mp4 in memory (a keyframe at its start by
construction), and its fragments are renumbered and re-timed to continue the file:

    file   = ftyp moov | moof mdat (batch 0) | moof mdat (batch 1) | ...
    batch k: ftyp moov moof mdat mfra   ->   moof mdat, with mfhd.sequence and tfdt.decode_time
                                             continuing from batch k-1 (mfra, the index, is dropped)
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from .optional import require

_MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"  # default_base_moof: offsets survive the move
_TFHD_BASE_OFFSET, _TFHD_DESCRIPTION, _TFHD_DURATION = 0x1, 0x2, 0x8
_TRUN_SAMPLE_DURATION = 0x100


@dataclass
class Fragments:
    """One encoded batch: its init segment and its fragments, not yet placed in a file."""

    init: bytes
    fragments: bytes


def encode_batch(frames: np.ndarray, fps: int, crf: int) -> Fragments:
    """uint8 `[T, H, W, 3]` frames -> one H.264 fragmented mp4 in memory, split into init and fragments."""
    av = require("av")

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4", options={"movflags": _MOVFLAGS}) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        stream.height, stream.width = frames.shape[1:3]
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # drain the encoder: the batch is whole
    init, fragments = bytearray(), bytearray()
    for kind, box in _boxes(buffer.getvalue(), 0, len(buffer.getvalue())):
        if kind in ("ftyp", "moov"):
            init += box
        elif kind in ("moof", "mdat"):
            fragments += box
    return Fragments(bytes(init), bytes(fragments))


def continue_fragments(fragments: bytes, sequence: int, decode_time: int) -> tuple[bytes, int, int]:
    """Renumber a batch's fragments from `sequence` and shift them to start at `decode_time`.

    Returns the bytes, the next sequence number and the next decode time (in the track's timescale).
    """
    out = bytearray(fragments)
    for kind, start, size in _box_spans(out, 0, len(out)):
        if kind != "moof":
            continue
        struct.pack_into(">I", out, _child(out, start, size, "mfhd") + 12, sequence)
        sequence += 1
        traf, traf_size = _find(out, start, size, "traf")
        tfdt = _child(out, traf, traf_size, "tfdt")
        if out[tfdt + 8] != 1:
            raise ValueError("expected a version-1 (64-bit) tfdt box from FFmpeg's mov muxer")
        struct.pack_into(">Q", out, tfdt + 12, decode_time)
        decode_time += _traf_duration(out, traf, traf_size)
    return bytes(out), sequence, decode_time


def _traf_duration(buf: bytearray, traf: int, size: int) -> int:
    """Samples in the run times the default sample duration (FFmpeg writes constant-rate video so)."""
    tfhd = _child(buf, traf, size, "tfhd")
    flags = int.from_bytes(buf[tfhd + 9 : tfhd + 12], "big")
    trun = _child(buf, traf, size, "trun")
    trun_flags = int.from_bytes(buf[trun + 9 : trun + 12], "big")
    if not flags & _TFHD_DURATION or trun_flags & _TRUN_SAMPLE_DURATION:
        raise ValueError("expected fragments with one default sample duration (constant frame rate)")
    offset = tfhd + 16 + (8 if flags & _TFHD_BASE_OFFSET else 0) + (4 if flags & _TFHD_DESCRIPTION else 0)
    (duration,) = struct.unpack_from(">I", buf, offset)
    (samples,) = struct.unpack_from(">I", buf, trun + 12)
    return samples * duration


def _box_spans(buf, start: int, end: int):
    """(type, offset, size) of each box in `buf[start:end]`; 32-bit sizes only, as FFmpeg writes them here."""
    i = start
    while i < end:
        size, kind = struct.unpack_from(">I4s", buf, i)
        if size < 8 or i + size > end:
            raise ValueError(f"malformed mp4 box {kind!r} of size {size} at byte {i}")
        yield kind.decode("latin-1"), i, size
        i += size


def _boxes(buf: bytes, start: int, end: int):
    for kind, i, size in _box_spans(buf, start, end):
        yield kind, buf[i : i + size]


def _find(buf, start: int, size: int, kind: str) -> tuple[int, int]:
    """The first child box of `kind` inside the box at `start` (header of 8 bytes)."""
    for child, i, child_size in _box_spans(buf, start + 8, start + size):
        if child == kind:
            return i, child_size
    raise ValueError(f"no {kind} box inside the box at byte {start}")


def _child(buf, start: int, size: int, kind: str) -> int:
    return _find(buf, start, size, kind)[0]
