"""What the serve tests check the server against: the engine's own frames, and memory per chunk.

`RecordingEncoder` keeps every chunk the server encodes, before encoding, with the JPEGs it made of
it: a client's JPEGs are looked up among them (so the bytes were not changed on the way) and the
frames behind them compared with the engine's own stream byte for byte (so nothing before the
encoder changed them either). `engine_frames` is that stream, with a prompt switch where the
server announced one. `heap_bytes` and `slope` measure the memory a server holds per chunk.
"""

from __future__ import annotations

import ctypes
import dataclasses
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import pytest
from aiohttp import web

from helios_rt import Engine
from helios_rt.serve import ServeConfig, create_app
from helios_rt.serve.app import HUB_KEY
from helios_rt.serve.frames import JpegEncoder
from helios_rt.serve.hub import Hub

from .serve_harness import SMALL_DEMO

# Nine frames a chunk (three latent frames): about a quarter of SMALL_DEMO's 33-frame chunk's time.
FAST_DEMO = dataclasses.replace(SMALL_DEMO, latent_frames_per_chunk=3)
# One frame a chunk: the cheapest chunk that still runs the whole path, for tests that need many chunks.
TINY_DEMO = dataclasses.replace(SMALL_DEMO, latent_frames_per_chunk=1)


class RecordingEncoder(JpegEncoder):
    """A `JpegEncoder` that keeps each call's frames (a copy) and the JPEGs it returned for them."""

    def __init__(self, engine: Engine, config: ServeConfig | None = None) -> None:
        config = config or ServeConfig()
        super().__init__(engine.config.height, engine.config.width, config.jpeg_qscale, config.jpeg_chroma)
        self.calls: list[tuple[np.ndarray, list[bytes]]] = []
        self._lock = threading.Lock()  # the server encodes on two codec threads

    def encode(self, frames: np.ndarray) -> list[bytes]:
        jpegs = super().encode(frames)
        with self._lock:
            self.calls.append((frames.copy(), jpegs))
        return jpegs

    def frames_behind(self, jpegs: list[bytes]) -> list[np.ndarray]:
        """The frames of every call whose JPEGs begin with `jpegs` (a client that left mid-chunk got a prefix)."""
        with self._lock:
            return [frames[: len(jpegs)] for frames, out in self.calls if out[: len(jpegs)] == jpegs]


@asynccontextmanager
async def recording_server(
    engine: Engine, config: ServeConfig | None = None
) -> AsyncIterator[tuple[str, Hub, RecordingEncoder]]:
    """Serve `engine` on a free localhost port with a `RecordingEncoder`; yields the URL, the hub and the encoder."""
    encoder = RecordingEncoder(engine, config)
    app = create_app(engine, config, encoder=encoder)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", app[HUB_KEY], encoder
    finally:
        await runner.cleanup()


def engine_frames(
    engine: Engine,
    prompt: str,
    seed: int,
    chunks: int,
    image: np.ndarray | None = None,
    switch: tuple[int, str] | None = None,
) -> list[np.ndarray]:
    """The first `chunks` chunks of `engine`'s own stream; `switch=(k, prompt)` calls `set_prompt` before chunk k.

    Made on the server's engine before the server runs (nothing the server does can then make the two
    agree, and the engine's first-chunk warm-up is paid once), or after it stopped where the stream's
    inputs are known only then; the engine runs on one thread at a time either way.
    """
    with engine.generate_stream(prompt, image=image, seed=seed) as stream:
        out = []
        for index in range(chunks):
            if switch is not None and index == switch[0]:
                assert stream.set_prompt(switch[1]) == index, "the engine's own switch must land at the chunk asked"
            out.append(next(stream).video_frames.copy())
        return out


def by_chunk(frames: list[tuple[int, int, bytes]]) -> dict[int, list[bytes]]:
    """A client's (chunk, frame, jpeg) records grouped by chunk, in arrival order."""
    chunks: dict[int, list[bytes]] = {}
    for chunk, _, jpeg in frames:
        chunks.setdefault(chunk, []).append(jpeg)
    return chunks


def pixel_difference(got: np.ndarray, want: np.ndarray) -> str:
    """How two frame stacks differ: the count of differing values, the first one's index and both values."""
    if got.shape != want.shape:
        return f"shapes differ: {list(got.shape)} against {list(want.shape)}"
    diff = np.argwhere(got != want)
    if not len(diff):
        return "identical"
    first = tuple(int(i) for i in diff[0])
    return f"{len(diff)} of {got.size} values differ, first at {first}: {got[first]} against {want[first]}"


def assert_served_from(
    encoder: RecordingEncoder, served: dict[int, list[bytes]], reference: list[np.ndarray], who: str
) -> None:
    """Every chunk `who` received is JPEGs the server's encoder made of exactly the engine's frames of that chunk."""
    for chunk, jpegs in served.items():
        behind = encoder.frames_behind(jpegs)
        assert behind, f"{who}'s chunk {chunk}: no encoder call made these JPEGs (the bytes changed after encoding)"
        assert chunk < len(reference), f"{who} got chunk {chunk}; the reference has {len(reference)} chunks"
        want = reference[chunk][: len(jpegs)]
        for got in behind:
            assert np.array_equal(got, want), (
                f"{who}'s chunk {chunk} is not the engine's: {pixel_difference(got, want)}"
            )


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]  # fmt: skip


def heap_bytes() -> int:
    """Bytes this process holds allocated from malloc, every thread's arena and mmapped blocks (glibc's mallinfo2).

    Not the resident set: memory freed earlier (by a previous test, or a chunk's working memory) stays
    resident and is reused, so a leak can grow inside it without moving the RSS at all. Tensors, numpy
    arrays and large Python objects (JPEG bytes) are malloc'd; only pymalloc's small objects are not.
    """
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("heap_bytes needs glibc's mallinfo2 (glibc 2.33+)")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def slope(values: list[float]) -> float:
    """The least-squares slope of `values` against their index (growth per step, noise averaged out)."""
    x = np.arange(len(values), dtype=np.float64)
    return float(np.polyfit(x, np.asarray(values, dtype=np.float64), 1)[0])
