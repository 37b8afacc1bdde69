"""`ServeConfig`: the server's limits, decided once and checked at construction.

Every number a client can push against (sessions, queue, chunks ahead, prompt length, image bytes)
has a limit here, so a misbehaving or slow client meets a stated bound rather than growing the
server; the defaults are safe for a workstation: localhost only, one stream at a time.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, fields

# JavaScript numbers hold integers exactly only below 2**53; a larger seed from the page would be rounded.
MAX_SEED = 2**53 - 1


@dataclass(frozen=True)
class ServeConfig:
    """Limits of one server. All counts are per server except `chunks_ahead` (per session)."""

    host: str = "127.0.0.1"  # localhost unless told otherwise
    port: int = 8765
    token: str | None = None  # a bearer token every WebSocket must present (header or ?token=)
    max_sessions: int = 1  # streams generating at once; they take turns on the engine chunk by chunk
    max_queue: int = 8  # sessions waiting for a turn; beyond it a start gets a "busy" answer, queue full
    chunks_ahead: int = 2  # chunks generated but not yet acknowledged by the client, at most
    max_prompt_chars: int = 2000
    max_image_bytes: int = 8 * 2**20
    max_num_frames: int = 33 * 600  # about 14 minutes at 24 fps; null (endless) is allowed separately
    jpeg_qscale: int = 3  # MJPEG quantiser: 2 (best) .. 31 (smallest)
    jpeg_chroma: str = "444"  # "444", or "420" for fewer bytes and decoder-dependent colour edges
    heartbeat_s: float = 20.0  # WebSocket ping interval; a client that stops answering is dropped
    ack_timeout_s: float = 30.0  # a stream whose client acknowledges nothing this long is stopped (frees its turn)
    spare_connections: int = 4  # WebSockets beyond max_sessions + max_queue before new ones get HTTP 503
    allowed_origins: tuple[str, ...] = ()  # extra browser origins (besides the server's own) allowed to connect

    def __post_init__(self) -> None:
        positive = ("port", "max_sessions", "chunks_ahead", "max_prompt_chars", "max_image_bytes", "max_num_frames")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ServeConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ValueError(f"ServeConfig.max_queue must be an integer >= 0, got {self.max_queue!r}")
        if self.port > 65535:
            raise ValueError(f"ServeConfig.port must be in 1..65535, got {self.port}")
        if not 2 <= self.jpeg_qscale <= 31:
            raise ValueError(f"ServeConfig.jpeg_qscale must be in 2..31 (MJPEG quantiser), got {self.jpeg_qscale}")
        if self.jpeg_chroma not in ("444", "420"):
            raise ValueError(f"ServeConfig.jpeg_chroma must be '444' or '420', got {self.jpeg_chroma!r}")
        if self.token is not None and (not isinstance(self.token, str) or len(self.token) < 8):
            raise ValueError("ServeConfig.token must be a string of at least 8 characters, or None for no token")
        for name in ("heartbeat_s", "ack_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"ServeConfig.{name} must be a number of seconds > 0, got {value!r}")
        spare = self.spare_connections
        if isinstance(spare, bool) or not isinstance(spare, int) or spare < 0:
            raise ValueError(f"ServeConfig.spare_connections must be an integer >= 0, got {self.spare_connections!r}")

    @property
    def max_connections(self) -> int:
        """WebSockets open at once, at most: the turns, the queue and a few spare (to be told "busy")."""
        return self.max_sessions + self.max_queue + self.spare_connections

    @property
    def is_local(self) -> bool:
        """Whether `host` only accepts connections from this machine."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def limits(self) -> dict[str, int]:
        """What the page is told in `hello`, so it can check input before sending it."""
        names = ("max_prompt_chars", "max_image_bytes", "max_num_frames", "chunks_ahead")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in names}
