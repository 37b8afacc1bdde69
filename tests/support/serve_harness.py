"""An in-process `helios-rt serve` for the serve tests, and a WebSocket client that records what it got."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from aiohttp import web

from helios_rt import Engine, EngineConfig
from helios_rt.serve import ServeConfig, create_app
from helios_rt.serve.app import HUB_KEY
from helios_rt.serve.hub import Hub
from helios_rt.serve.protocol import unpack_frame
from helios_rt.serve.session import timed_next
from support.untrained import untrained_engine

# The demo model at its smallest legal size, first chunk not amplified: about a second per chunk here.
SMALL_DEMO = EngineConfig(height=64, width=64, device="cpu", dtype="float32", kernels="reference",
                          amplify_first_chunk=False)  # fmt: skip


def small_demo_engine() -> Engine:
    return untrained_engine(SMALL_DEMO)


@asynccontextmanager
async def running_server(engine: Engine, config: ServeConfig | None = None) -> AsyncIterator[tuple[str, Hub]]:
    """Serve `engine` on a free localhost port; yields the base URL and the hub (its counters)."""
    app = create_app(engine, config)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", app[HUB_KEY]
    finally:
        await runner.cleanup()


class Client:
    """One WebSocket client: JSON messages and frames in arrival order."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.messages: list[dict] = []
        self.frames: list[tuple[int, int, bytes]] = []  # (chunk, frame, jpeg)

    async def send(self, message: dict | str) -> None:
        await self.ws.send_str(message if isinstance(message, str) else json.dumps(message))

    async def receive(self) -> dict | None:
        """The next message (frames are recorded and returned as {"type": "frame", ...}); None once closed."""
        msg = await self.ws.receive()
        if msg.type == aiohttp.WSMsgType.TEXT:
            message = json.loads(msg.data)
            self.messages.append(message)
            return message
        if msg.type == aiohttp.WSMsgType.BINARY:
            chunk, frame, jpeg = unpack_frame(msg.data)
            self.frames.append((chunk, frame, jpeg))
            return {"type": "frame", "chunk": chunk, "frame": frame}
        return None

    async def until(self, *types: str) -> dict:
        """Read until a JSON message of one of `types` (an AssertionError if the socket closes first)."""
        while True:
            message = await self.receive()
            assert message is not None, f"the socket closed while waiting for {types}; got {self.messages}"
            if message["type"] in types:
                return message


class ChunkGate:
    """Lets a test decide when the server may generate: every `timed_next(stream)` on the hub's engine thread
    waits until the gate is open and has chunks left to allow (`allow(n)`; None: any number).

    The stall, pause and end-of-stream states of the page are then reached by the test's choice, not by
    the machine's speed: a closed gate is a server whose generation is slower than playback.
    """

    def __init__(self, hub: Hub) -> None:
        self.left: int | None = None
        self._changed = asyncio.Event()
        original = hub.on_engine

        async def on_engine(fn, *args, **kwargs):
            if fn is timed_next:
                while self.left is not None and self.left <= 0:
                    self._changed.clear()
                    await self._changed.wait()
                if self.left is not None:
                    self.left -= 1
            return await original(fn, *args, **kwargs)

        hub.on_engine = on_engine  # the sessions call hub.on_engine(timed_next, stream) for each chunk

    def allow(self, chunks: int | None) -> None:
        """Let `chunks` more chunks be generated (0: none, a stall; None: all)."""
        self.left = chunks
        self._changed.set()
