"""`Hub`: who generates now, who waits, and the one thread the engine runs on.

The engine is not thread-safe and a chunk takes from tens of milliseconds (GPU) to seconds (CPU),
so every engine call (start a stream, next chunk, switch prompt, close) runs on one worker thread,
off the event loop: the server keeps answering while a chunk is made. At most `max_sessions`
streams generate at once; their `next()` calls queue on that thread and so take turns chunk by
chunk. Sessions beyond that wait in a first-come queue of at most `max_queue` and are told their
place whenever it changes; beyond the queue a start gets a "busy" answer saying the queue is full.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from .config import ServeConfig

T = TypeVar("T")


class QueueFull(Exception):
    """No turn and no room in the queue: the session answers "busy" and stays connected."""


@dataclass
class HubStats:
    """What the server did, for tests and monitoring (`GET /stats`)."""

    streams_started: int = 0
    streams_ended: int = 0
    busy_answers: int = 0  # queue positions and queue-full answers sent
    queue_full: int = 0
    peak_active: int = 0
    peak_waiting: int = 0
    buffered_bytes: int = 0  # encoded frames generated but not yet acknowledged, all sessions
    peak_buffered_bytes: int = 0
    peak_unacked_chunks: int = 0  # most chunks any session had generated ahead of its acknowledgements

    def buffer(self, nbytes: int) -> None:
        self.buffered_bytes += nbytes
        self.peak_buffered_bytes = max(self.peak_buffered_bytes, self.buffered_bytes)


class Hub:
    """Turns and the engine thread, shared by every session of one server."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.stats = HubStats()
        self.active: set[object] = set()
        self.waiting: list[object] = []
        self._changed: asyncio.Event | None = None
        self._engine_thread = ThreadPoolExecutor(1, thread_name_prefix="helios-engine")
        self._codec_threads = ThreadPoolExecutor(2, thread_name_prefix="helios-codec")

    async def on_engine(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn` on the engine thread (calls run one at a time, in the order they were made)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._engine_thread, partial(fn, *args, **kwargs))

    def on_engine_later(self, fn: Callable[[], object]) -> None:
        """Queue `fn` on the engine thread without waiting (closing a stream whose chunk still runs)."""
        self._engine_thread.submit(fn)

    async def on_codec(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` (JPEG encode, image decode) on a codec thread, beside the engine."""
        return await asyncio.get_running_loop().run_in_executor(self._codec_threads, partial(fn, *args))

    @asynccontextmanager
    async def turn(self, session: object, announce: Callable[[int, int], Awaitable[None]]) -> AsyncIterator[None]:
        """Hold one of the `max_sessions` turns; wait in the queue (calling `announce(place, waiting)`).

        Raises `QueueFull` when there is neither a turn nor room in the queue.
        """
        if len(self.active) >= self.config.max_sessions or self.waiting:
            if len(self.waiting) >= self.config.max_queue:
                self.stats.queue_full += 1
                raise QueueFull(f"the server is busy: {len(self.active)} streams playing and the queue of "
                                f"{self.config.max_queue} is full; try again later")  # fmt: skip
            self.waiting.append(session)
            self.stats.peak_waiting = max(self.stats.peak_waiting, len(self.waiting))
            try:
                await self._wait_for_turn(session, announce)
            except BaseException:  # cancelled (stop or disconnect) while waiting, or just after the turn came
                if session in self.waiting:
                    self.waiting.remove(session)
                self.active.discard(session)
                self._admit()
                raise
        else:
            self._activate(session)
        try:
            yield
        finally:
            self.active.discard(session)
            self._admit()

    async def _wait_for_turn(self, session: object, announce: Callable[[int, int], Awaitable[None]]) -> None:
        told = None
        while session not in self.active:
            changed = self._event()
            place = (self.waiting.index(session) + 1, len(self.waiting))
            if place != told:
                self.stats.busy_answers += 1
                await announce(*place)
                told = place
                continue  # the queue may have moved while the answer was sent
            await changed.wait()

    def _activate(self, session: object) -> None:
        self.active.add(session)
        self.stats.peak_active = max(self.stats.peak_active, len(self.active))

    def _admit(self) -> None:
        while self.waiting and len(self.active) < self.config.max_sessions:
            self._activate(self.waiting.pop(0))
        self._event().set()
        self._changed = None  # the next waiter gets a fresh event

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def close(self) -> None:
        """Stop the threads once the queued engine calls (stream closes) are done."""
        self._engine_thread.shutdown(wait=True)
        self._codec_threads.shutdown(wait=True)
