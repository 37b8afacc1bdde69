"""`helios-rt serve` under load (issue 17): nine clients of the demo model on loopback, at once.

Two turns (`max_sessions=2`), a queue of four, one chunk ahead. The clients: one that never
acknowledges (its stream must stop after one chunk and hold one chunk of memory), a fast one, a slow
one (reads slowly, acknowledges late), one that leaves while queued, one that leaves mid-chunk,
a short one, and three that find the queue full. Every stream uses the same prompt and seed, so
every client that stays must receive a prefix of the same bytes, in order: nothing lost, repeated
or reordered, whatever the other sessions did on the shared engine.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time

import aiohttp
from support.serve_harness import Client, running_server, small_demo_engine

from helios_rt.serve import ServeConfig

START = {"type": "start", "prompt": "a tropical fish among corals", "seed": 7}
FRAMES_PER_CHUNK = 33


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def consume(client: Client, read_delay: float = 0.0, ack_delay: float = 0.0) -> list[dict]:
    """Read a stream to its end, acknowledging each chunk once all its frames are in; returns busy answers."""
    expected: dict[int, int] = {}
    busy = []
    while True:
        message = await client.receive()
        assert message is not None, f"closed before the end; got {client.messages[-3:]}"
        kind = message["type"]
        assert kind != "error", message
        if kind == "busy":
            busy.append(message)
        elif kind == "chunk":
            expected[message["index"]] = message["frames"]
        elif kind == "frame":
            await asyncio.sleep(read_delay)
            chunk = message["chunk"]
            if sum(c == chunk for c, _, _ in client.frames) == expected[chunk]:
                await asyncio.sleep(ack_delay)
                await client.send({"type": "ack", "chunk": chunk})
        elif kind == "end":
            return busy


async def leave_after(client: Client, frames: int) -> None:
    """Wait for the turn, take `frames` frames of the first chunk, then disconnect mid-chunk."""
    while len(client.frames) < frames:
        assert await client.receive() is not None
    await client.ws.close()


async def rss_once_warm(client: Client) -> int:
    """The RSS once the engine thread has made two chunks (the allocator and its arena are warm)."""
    while not client.frames:
        await asyncio.sleep(0.02)
    return rss_bytes()


async def stats_while_engine_busy(http: aiohttp.ClientSession, url: str, hub) -> dict:
    """GET /stats while the engine thread is provably busy: the event loop must not wait for the engine.

    The engine thread runs a call that waits until /stats has answered (queued behind the chunks in
    progress): an event loop that waited for the engine would never answer, and the hang guard fails.
    """
    entered, release, returned = threading.Event(), threading.Event(), threading.Event()

    def busy() -> None:
        entered.set()
        release.wait()
        returned.set()

    hub.on_engine_later(busy)
    try:
        while not entered.is_set():
            await asyncio.sleep(0.02)
        response = await http.get(f"{url}/stats")
        return {"status": response.status, "engine_busy": not returned.is_set(), "body": await response.json()}
    finally:
        release.set()


async def read_forever(client: Client) -> None:
    """Read whatever arrives and never acknowledge (reading also answers the server's pings)."""
    while await client.receive() is not None:
        pass


def test_nine_clients_slow_leaving_and_busy() -> None:
    async def run() -> dict:
        engine = small_demo_engine()
        # the stalled client keeps its turn for the whole test (the ack timeout is tested in test_serve_messages)
        config = ServeConfig(max_sessions=2, max_queue=4, chunks_ahead=1, ack_timeout_s=3600)
        rss = [rss_bytes()]

        async def sample_rss() -> None:
            while True:
                rss.append(rss_bytes())
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample_rss())
        async with running_server(engine, config) as (url, hub), aiohttp.ClientSession() as http:

            async def connect(start: dict) -> tuple[Client, dict]:
                client = Client(await http.ws_connect(f"{url}/ws"))
                await client.until("hello")
                await client.send(start)
                return client, await client.until("started", "busy")

            stalled, answer = await connect(START)  # endless, never acknowledges
            assert answer["type"] == "started"
            stalled_reader = asyncio.create_task(read_forever(stalled))
            fast, answer = await connect({**START, "num_frames": 66})
            assert answer["type"] == "started"
            queued = [await connect({**START, "num_frames": n}) for n in (66, 66, 33, None)]
            assert [(a["type"], a["position"], a["queue_full"]) for _, a in queued] == [
                ("busy", i, False) for i in (1, 2, 3, 4)
            ]
            full = [await connect(START) for _ in range(3)]
            for _, answer in full:
                assert answer["type"] == "busy" and answer["queue_full"] and answer["position"] is None
                assert "queue of 4 is full" in answer["message"]
            (slow, _), (leaver, _), (short, _), (midway, _) = queued
            await leaver.ws.close()  # leaves the queue: the ones behind it move up

            began = time.perf_counter()
            warm = asyncio.create_task(rss_once_warm(fast))
            consumers = asyncio.gather(consume(fast), consume(slow, read_delay=0.01, ack_delay=0.5), consume(short))
            busy_updates, _, stats_probe = await asyncio.gather(
                consumers, leave_after(midway, 10), stats_while_engine_busy(http, url, hub)
            )
            await asyncio.sleep(1.0)  # everyone else is done: the stalled stream must still be paused
            elapsed = time.perf_counter() - began
            assert len(stalled.frames) == FRAMES_PER_CHUNK, len(stalled.frames)
            await stalled.ws.close()
            await stalled_reader
            for client, _ in full:
                await client.ws.close()
            for _ in range(200):  # the engine thread closes the streams after the chunk in progress
                if not hub.active and hub.stats.streams_ended == hub.stats.streams_started:
                    break
                await asyncio.sleep(0.05)
            stats = dict(vars(hub.stats))
            sampler.cancel()
            for _ in range(100):  # a stream is released once the engine thread has run its close
                gc.collect()
                if not engine._streams:
                    break
                await asyncio.sleep(0.05)
            holders = [repr(r)[:120] for st in engine._streams for r in gc.get_referrers(st)]
            reference = [jpeg for _, _, jpeg in fast.frames]
            return {
                "clients": {"fast": fast, "slow": slow, "short": short, "midway": midway, "stalled": stalled},
                "reference": reference,
                "busy_updates": busy_updates,
                "stats": stats,
                "active": len(hub.active),
                "waiting": len(hub.waiting),
                "engine_streams": (len(engine._streams), holders),
                "rss": (rss[0], warm.result(), max(rss[: len(rss) // 2]), max(rss[len(rss) // 2 :]), rss_bytes()),
                "elapsed": elapsed,
                "stats_probe": stats_probe,
                "chunk_bytes": max(m["bytes"] for m in fast.messages if m["type"] == "chunk"),
            }

    result = asyncio.run(asyncio.wait_for(run(), 600))  # a hang guard: ~7 chunks take seconds each on a CPU
    reference, stats = result["reference"], result["stats"]
    clients = result["clients"]
    assert len(reference) == 66 and len(set(reference)) > 60  # a video that changes, frame by frame
    lengths = {"fast": 66, "slow": 66, "short": 33, "stalled": 33, "midway": 10}
    for name, client in clients.items():
        got = client.frames[: lengths[name]] if name == "midway" else client.frames
        assert len(got) == lengths[name], (name, len(got))
        assert [(c, f) for c, f, _ in got] == [(f // FRAMES_PER_CHUNK, f) for f in range(len(got))], name
        assert [jpeg for _, _, jpeg in got] == reference[: len(got)], f"{name}'s frames differ from the reference"
    # queue positions only move forward: short went 3 -> 2 when the leaver left, then got its turn
    _, slow_busy, short_busy = result["busy_updates"]
    assert [b["position"] for b in short_busy] == [2, 1], short_busy
    assert stats["streams_started"] == 5 == stats["streams_ended"] and stats["queue_full"] == 3
    assert result["active"] == 0 and result["waiting"] == 0
    assert result["engine_streams"][0] == 0, result["engine_streams"]  # every stream's buffers were freed
    assert stats["peak_unacked_chunks"] == 1  # chunks_ahead: never more generated than the client took
    assert stats["peak_buffered_bytes"] <= 2 * result["chunk_bytes"]  # two turns x one chunk ahead
    # RSS swings by ~100 MiB within each chunk (the engine's working memory, one chunk at a time on one
    # thread); what must not happen is growth with the chunks and sessions served
    before, warm, first_half, second_half, end = (x / 2**20 for x in result["rss"])
    print(f"\nload: {result['elapsed']:.1f} s, chunk {result['chunk_bytes']} B, peak buffered "
          f"{stats['peak_buffered_bytes']} B, RSS MiB: before {before:.1f}, after two chunks {warm:.1f}, "
          f"peak in the first half {first_half:.1f}, in the second {second_half:.1f}, end {end:.1f}")  # fmt: skip
    # /stats was answered while the engine thread was busy: the event loop never waits for the engine
    probe = result["stats_probe"]
    assert probe["status"] == 200 and probe["engine_busy"], probe
    assert probe["body"]["sessions"] >= 1 and probe["body"]["streams_started"] >= 1, probe
    assert second_half - first_half < 48, "the peak RSS grew while serving"
    assert end - warm < 48, "RSS after every session ended is well above its level after two chunks"
