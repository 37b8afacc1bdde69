"""The WebSocket protocol: every client message is parsed here into a typed message, or refused.

Client -> server, JSON text only:
  {"type": "start", "prompt": str, "seed"?: int, "num_frames"?: int | null, "image"?: base64 PNG/JPEG}
  {"type": "prompt", "prompt": str}        switch the prompt of the playing stream
  {"type": "ack", "chunk": int}            every frame of that chunk arrived (opens room for one more)
  {"type": "stop"}
  {"type": "pause"}                        generate nothing more (no acknowledgement deadline) until resume
  {"type": "resume"}
Server -> client: JSON text (hello, busy, started, chunk, prompt, paused, resumed, end, stopped, error) and one binary
message per frame: `FRAME_HEADER` (magic, chunk index, frame index in the video) then the JPEG bytes.

A refused message raises `ProtocolError` whose text names the field, what was wrong and what to
send instead; the session sends it back as {"type": "error"} and keeps serving. Nothing a client
sends is ever used as a file path.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass

from .config import MAX_SEED, ServeConfig

FRAME_MAGIC = b"HRT1"
FRAME_HEADER = struct.Struct("<4sII")  # magic, chunk index, frame index in the video


class ProtocolError(ValueError):
    """A client message the server refuses; its text is sent back to the client as is."""


@dataclass(frozen=True)
class Start:
    prompt: str
    seed: int
    num_frames: int | None
    image: bytes | None  # encoded PNG or JPEG, decoded later (frames.decode_image)


@dataclass(frozen=True)
class SetPrompt:
    prompt: str


@dataclass(frozen=True)
class Ack:
    chunk: int


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Pause:
    """The page was hidden: keep the stream, generate nothing more and wait for `Resume` (no ack deadline)."""


@dataclass(frozen=True)
class Resume:
    pass


Message = Start | SetPrompt | Ack | Stop | Pause | Resume

_FIELDS = {
    "start": {"type", "prompt", "seed", "num_frames", "image"},
    "prompt": {"type", "prompt"},
    "ack": {"type", "chunk"},
    "stop": {"type"},
    "pause": {"type"},
    "resume": {"type"},
}


def parse_message(text: str, config: ServeConfig) -> Message:
    """One client text message -> a typed message; `ProtocolError` names what is wrong."""
    if len(text) > max_message_chars(config):
        raise ProtocolError(
            f"message of {len(text)} characters is too long; the largest accepted is "
            f"{max_message_chars(config)} (an image of at most {config.max_image_bytes} bytes)"
        )
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as err:  # ValueError: also an integer over Python's 4300-digit limit
        raise ProtocolError(f"message is not valid JSON ({_short(err)}); send one JSON object per message") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"message must be a JSON object with a 'type', got {type(data).__name__}")
    kind = data.get("type")
    if not isinstance(kind, str) or kind not in _FIELDS:
        raise ProtocolError(f"unknown message type {_short(kind)}; expected one of {sorted(_FIELDS)}")
    unknown = sorted(set(data) - _FIELDS[kind])
    if unknown:
        raise ProtocolError(f"'{kind}' message has unknown fields {unknown}; allowed: {sorted(_FIELDS[kind])}")
    if kind == "start":
        return _start(data, config)
    if kind == "prompt":
        return SetPrompt(_prompt(data, config))
    if kind == "ack":
        return Ack(_integer(data, "chunk", 0, 2**31 - 1))
    return {"stop": Stop, "pause": Pause, "resume": Resume}[kind]()


def _start(data: dict, config: ServeConfig) -> Start:
    num_frames = data.get("num_frames")
    if num_frames is not None:
        num_frames = _integer(data, "num_frames", 1, config.max_num_frames)
    seed = _integer(data, "seed", 0, MAX_SEED) if "seed" in data else 0
    image = _image(data["image"], config) if data.get("image") is not None else None
    return Start(_prompt(data, config), seed, num_frames, image)


def _prompt(data: dict, config: ServeConfig) -> str:
    prompt = data.get("prompt")
    if not isinstance(prompt, str):
        raise ProtocolError(f"'prompt' must be a string, got {_type(prompt)}")
    if len(prompt) > config.max_prompt_chars:
        raise ProtocolError(f"'prompt' has {len(prompt)} characters; at most {config.max_prompt_chars} are accepted")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (\ud800) that JSON allows and UTF-8 cannot hold
        raise ProtocolError("'prompt' is not valid Unicode text (a lone surrogate); send UTF-8 text") from None
    if not prompt.strip():
        raise ProtocolError("'prompt' is empty; describe the video to generate")
    return prompt


def _integer(data: dict, name: str, low: int, high: int) -> int:
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"'{name}' must be an integer in [{low}, {high}], got {_type(value)}")
    if not low <= value <= high:
        raise ProtocolError(f"'{name}' must be in [{low}, {high}], got {value}")
    return value


def _image(value: object, config: ServeConfig) -> bytes:
    """A base64 string (optionally a data: URL) -> bytes; the bytes' type is checked when decoded."""
    if not isinstance(value, str):
        raise ProtocolError(f"'image' must be a base64 string of a PNG or JPEG file, got {_type(value)}")
    if value.startswith("data:"):
        head, _, value = value.partition(",")
        if not head.endswith(";base64"):
            raise ProtocolError("'image' data URL must be base64 encoded (data:image/png;base64,...)")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("'image' is not valid base64; send the PNG or JPEG file's bytes base64 encoded") from None
    if len(raw) > config.max_image_bytes:
        raise ProtocolError(f"'image' has {len(raw)} bytes; at most {config.max_image_bytes} are accepted")
    return raw


def max_message_chars(config: ServeConfig) -> int:
    """The longest client message: twice a start with the largest image (base64) and the longest prompt.

    The slack lets an image somewhat over the limit get an error that says the limit; a message
    beyond it is closed by the WebSocket layer (close code 1009) without being read.
    """
    return 2 * (config.max_image_bytes * 4 // 3 + 4 * config.max_prompt_chars) + 4096


def _type(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _short(value: object, limit: int = 60) -> str:
    text = repr(value) if not isinstance(value, BaseException) else str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def pack_frame(chunk: int, frame: int, jpeg: bytes) -> bytes:
    """One binary frame message: the header, then the JPEG."""
    return FRAME_HEADER.pack(FRAME_MAGIC, chunk, frame) + jpeg


def unpack_frame(data: bytes) -> tuple[int, int, bytes]:
    """(chunk, frame, jpeg) of a binary frame message (clients and tests)."""
    magic, chunk, frame = FRAME_HEADER.unpack_from(data)
    if magic != FRAME_MAGIC:
        raise ValueError(f"not a helios_rt frame message (magic {magic!r})")
    return chunk, frame, data[FRAME_HEADER.size :]
