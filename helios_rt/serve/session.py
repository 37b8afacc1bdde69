"""`Session`: one WebSocket client, from hello to disconnect.

Backpressure: a stream's next chunk is generated only while fewer than `chunks_ahead` of its chunks
are generated but not acknowledged by the client (`{"type": "ack"}` once every frame of a chunk has
arrived). A slow client therefore pauses its own stream and the server holds at most
`chunks_ahead` encoded chunks per session; a client that disconnects ends its stream, whose
buffers are freed on the engine thread as soon as the chunk in progress (if any) is done.

Pause: a page that is hidden sends `pause` rather than acknowledging frames nobody sees (or going
silent until `ack_timeout_s` ends its stream). The stream is kept whole: the chunks already made are
still sent, nothing more is generated and no acknowledgement deadline runs until `resume`. The
paused stream keeps its turn, so with `max_sessions` 1 other clients queue meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

from ..errors import InputError
from ..video import Video
from .frames import JpegEncoder, decode_image
from .hub import Hub, QueueFull
from .protocol import Ack, Pause, ProtocolError, Resume, SetPrompt, Start, Stop, pack_frame, parse_message

log = logging.getLogger("helios_rt.serve")

# a prompt switch from the page blends the embedding over this many chunks (about 4 s of video at 24 fps)
PROMPT_BLEND_CHUNKS = 3


class AckTimeout(Exception):
    """The client acknowledged nothing for `ack_timeout_s` while its stream waited for room."""


def timed_next(stream: Any) -> tuple[Any, float]:
    """The stream's next chunk (None at its end) and the wall seconds the engine thread spent on it.

    Timed on the engine thread: a wait in its queue (another session's chunk) is not generation time.
    """
    began = time.perf_counter()
    chunk = next(stream, None)
    return chunk, time.perf_counter() - began


class _PastTheEnd(Exception):
    """A prompt switch that would take effect at or after a chunk the stream will never make."""

    def __init__(self, total: int, chunk: int) -> None:
        last = f"its last chunk is {total - 1}" if total > 1 else "it has one chunk, chunk 0"
        super().__init__(f"the switch would take effect at chunk {chunk}, past the end of this stream ({last}); "
                         "start a new stream with this prompt")  # fmt: skip


class Session:
    """The state of one connection: at most one stream, playing or waiting for its turn."""

    def __init__(self, ws: web.WebSocketResponse, engine: Any, hub: Hub, encoder: JpegEncoder) -> None:
        self.ws, self.engine, self.hub, self.encoder = ws, engine, hub, encoder
        self.config = hub.config
        self._play: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()  # prompt switches in flight
        self._stream: Any = None
        self._generated = 0  # chunks of the current stream handed over by the engine
        self._sent = -1  # the last chunk whose frames were all sent
        self._acked = -1  # the last chunk the client acknowledged
        self._unacked: dict[int, int] = {}  # chunk -> encoded bytes, generated and not yet acknowledged
        self._room = asyncio.Event()
        self._paused = False  # the client asked for nothing more until it resumes (a hidden tab)

    # ---- the receive loop ------------------------------------------------------------------------
    async def serve(self) -> None:
        """Answer every message until the client goes; then end whatever it was playing."""
        await self.send(self._hello())
        try:
            async for msg in self.ws:
                if msg.type == WSMsgType.TEXT:
                    await self._on_text(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await self.error("binary messages are not accepted; send JSON text messages")
                else:  # ERROR (e.g. a message over the size limit): aiohttp closes the socket
                    break
        finally:
            await self._stop()
            for task in list(self._tasks):
                task.cancel()

    def _hello(self) -> dict:
        cfg = self.engine.config
        frames_per_chunk = self.engine.vae.config.num_frames(self.engine.history_layout.chunk_frames)
        # the page plays the frames at a Video's rate (Helios's 24 fps)
        return {"type": "hello", "protocol": 1, "width": cfg.width, "height": cfg.height, "fps": Video.fps,
                "frames_per_chunk": frames_per_chunk, "format": "jpeg", **self.config.limits()}  # fmt: skip

    async def _on_text(self, text: str) -> None:
        try:
            message = parse_message(text, self.config)
        except ProtocolError as err:
            await self.error(str(err))
            return
        if isinstance(message, Start):
            await self._start(message)
        elif isinstance(message, SetPrompt):
            if self._tasks:  # one switch at a time: each queues a text encode on the shared engine thread
                await self.error("a prompt switch is already pending; wait for its 'prompt' answer, then send the next")
                return
            task = asyncio.create_task(self._set_prompt(message.prompt))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif isinstance(message, Ack):
            await self._ack(message.chunk)
        elif isinstance(message, Stop):
            playing = self._play is not None and not self._play.done()
            await self._stop()
            await self.send({"type": "stopped", "reason": "stop" if playing else "nothing was playing"})
        elif isinstance(message, (Pause, Resume)):
            await self._pause(isinstance(message, Pause))

    # ---- messages --------------------------------------------------------------------------------
    async def _start(self, message: Start) -> None:
        if self._play is not None and not self._play.done():
            await self.error("a stream is already playing or waiting for its turn; send stop first")
            return
        image = None
        if message.image is not None:
            try:
                image = await self.hub.on_codec(decode_image, message.image, self.engine.config.height,
                                                self.engine.config.width)  # fmt: skip
            except ProtocolError as err:
                await self.error(str(err))
                return
        self._play = asyncio.create_task(self._play_stream(message, image))

    async def _set_prompt(self, prompt: str) -> None:
        stream = self._stream
        if stream is None:
            await self.send({"type": "error", "message": "no stream is playing; send start first", "fatal": False,
                             "about": "prompt"})  # fmt: skip
            return
        total = stream.chunks_total
        try:
            if total is not None and self._generated >= total:  # every chunk is made: nothing left to switch
                raise _PastTheEnd(total, total)
            chunk = await self.hub.on_engine(stream.set_prompt, prompt)
            if total is not None and chunk >= total:  # the switch would land on a chunk that never comes
                raise _PastTheEnd(total, chunk)
        except _PastTheEnd as past:
            reply = {"type": "error", "message": str(past), "fatal": False, "about": "prompt"}
        except (InputError, TypeError) as err:
            reply = {"type": "error", "message": str(err), "fatal": False, "about": "prompt"}
        except RuntimeError:  # the stream ended or failed while the switch waited for the engine
            reply = {"type": "error", "fatal": False, "about": "prompt",
                     "message": "the stream ended before the prompt could switch; start a new one"}  # fmt: skip
        else:
            reply = {"type": "prompt", "prompt": prompt, "chunk": chunk}
        self._tasks.discard(asyncio.current_task())  # no longer pending: the client may send the next one
        await self.send(reply)

    async def _pause(self, pause: bool) -> None:
        if self._stream is None:
            await self.error(f"no stream is playing to {'pause' if pause else 'resume'}; send start first")
            return
        self._paused = pause
        self._room.set()  # a wait for room re-reads the pause (and, on resume, restarts its deadline)
        await self.send({"type": "paused" if pause else "resumed", "generated": self._generated})

    async def _ack(self, chunk: int) -> None:
        if chunk > self._sent:
            await self.error(f"ack for chunk {chunk}, but this stream has sent chunks up to {self._sent} only")
        elif chunk > self._acked:  # acknowledgements are cumulative; a repeated one changes nothing
            for k in range(self._acked + 1, chunk + 1):
                self.hub.stats.buffered_bytes -= self._unacked.pop(k, 0)
            self._acked = chunk
            self._room.set()

    async def _stop(self) -> None:
        play, self._play = self._play, None
        if play is not None and not play.done():
            play.cancel()
            await asyncio.gather(play, return_exceptions=True)

    # ---- one stream ------------------------------------------------------------------------------
    async def _play_stream(self, start: Start, image: np.ndarray | None) -> None:
        try:
            async with self.hub.turn(self, self._announce_place):
                await self._generate(start, image)
        except QueueFull as busy:
            await self.send({"type": "busy", "position": None, "queue_full": True, "message": str(busy)})
        except AckTimeout:
            seconds = self.config.ack_timeout_s
            await self.error(f"no acknowledgement for {seconds:g} s; the stream was stopped", fatal=True)
        except (InputError, ValueError, TypeError) as err:  # the engine refused the prompt or the image
            await self.error(str(err), fatal=True)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a chunk failed (e.g. non-finite latents): say so, keep the server up
            log.exception("stream failed")
            await self.error(f"the stream stopped: {type(err).__name__}: {err}", fatal=True)

    async def _announce_place(self, position: int, waiting: int) -> None:
        await self.send({"type": "busy", "position": position, "waiting": waiting, "queue_full": False,
                         "message": f"the server is busy; you are number {position} in the queue"})  # fmt: skip

    async def _generate(self, start: Start, image: np.ndarray | None) -> None:
        stream = await self._new_stream(start, image)
        self._reset(stream)
        self.hub.stats.streams_started += 1
        queue: asyncio.Queue = asyncio.Queue(maxsize=self.config.chunks_ahead)
        sender = asyncio.create_task(self._send_chunks(queue))
        try:
            await self.send({"type": "started", "num_frames": start.num_frames, "seed": start.seed,
                             "chunks_total": stream.chunks_total, "image": image is not None})  # fmt: skip
            while True:
                await self._wait_for_room()
                chunk, generate_s = await self.hub.on_engine(timed_next, stream)
                if chunk is None:
                    break
                jpegs = await self.hub.on_codec(self.encoder.encode, chunk.video_frames)
                self._count(chunk.index, sum(map(len, jpegs)))
                await queue.put((chunk, jpegs, generate_s))
            await queue.put(None)
            await sender
            await self.send({"type": "end", "chunks": self._generated, "ttff_s": stream.time_to_first_frame_s,
                             "steady_fps": stream.steady_fps})  # fmt: skip
        finally:
            sender.cancel()
            self._release(stream)
            del stream  # a cancelled task's kept traceback holds this frame: it must not hold the stream too

    async def _new_stream(self, start: Start, image: np.ndarray | None) -> Any:
        """The engine's new stream; cancelled (stop, disconnect) meanwhile, it is closed once it exists."""
        created = asyncio.ensure_future(self.hub.on_engine(self.engine.generate_stream, start.prompt, image=image,
                                                           num_frames=start.num_frames, seed=start.seed,
                                                           prompt_blend_chunks=PROMPT_BLEND_CHUNKS))  # fmt: skip
        try:
            return await asyncio.shield(created)
        except asyncio.CancelledError:
            created.add_done_callback(self._close_orphan)
            raise

    def _close_orphan(self, created: asyncio.Future) -> None:
        if not created.cancelled() and created.exception() is None:
            self.hub.on_engine_later(created.result().close)

    def _reset(self, stream: Any) -> None:
        self._stream, self._generated, self._sent, self._acked = stream, 0, -1, -1
        self._paused = False
        self._unacked.clear()

    def _release(self, stream: Any) -> None:
        """Forget the stream; its buffers are freed on the engine thread after any chunk in progress."""
        self._stream = None
        self.hub.stats.buffered_bytes -= sum(self._unacked.values())
        self._unacked.clear()
        self.hub.on_engine_later(stream.close)
        self.hub.stats.streams_ended += 1

    async def _wait_for_room(self) -> None:
        """Wait until the client acknowledged enough and is not paused; `AckTimeout` after `ack_timeout_s`
        without room (a paused client has no deadline: it asked for the wait)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.ack_timeout_s
        while self._paused or self._generated - (self._acked + 1) >= self.config.chunks_ahead:
            self._room.clear()
            if self._paused:
                await self._room.wait()
                deadline = loop.time() + self.config.ack_timeout_s
                continue
            try:
                await asyncio.wait_for(self._room.wait(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise AckTimeout from None

    def _count(self, index: int, nbytes: int) -> None:
        self._generated += 1
        self._unacked[index] = nbytes
        self.hub.stats.buffer(nbytes)
        unacked = self._generated - (self._acked + 1)
        self.hub.stats.peak_unacked_chunks = max(self.hub.stats.peak_unacked_chunks, unacked)

    async def _send_chunks(self, queue: asyncio.Queue) -> None:
        while (item := await queue.get()) is not None:
            chunk, jpegs, generate_s = item
            await self.send({"type": "chunk", "index": chunk.index, "first_frame": chunk.first_frame,
                             "frames": len(jpegs), "bytes": sum(map(len, jpegs)), "generate_s": generate_s,
                             **chunk.timings})  # fmt: skip
            for i, jpeg in enumerate(jpegs):
                if i == len(jpegs) - 1:  # before the write: the client may acknowledge as soon as it arrives
                    self._sent = chunk.index
                await self._send_bytes(pack_frame(chunk.index, chunk.first_frame + i, jpeg))

    # ---- sending ---------------------------------------------------------------------------------
    async def send(self, message: dict) -> None:
        """Send one JSON message; a client that is gone is not an error (its receive loop ends)."""
        if not self.ws.closed:
            with contextlib.suppress(ConnectionError):
                await self.ws.send_json(message)

    async def _send_bytes(self, data: bytes) -> None:
        if not self.ws.closed:
            with contextlib.suppress(ConnectionError):
                await self.ws.send_bytes(data)

    async def error(self, message: str, fatal: bool = False) -> None:
        await self.send({"type": "error", "message": message, "fatal": fatal})
