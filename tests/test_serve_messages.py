"""`helios-rt serve`: message validation, limits, token and origin checks, frame codec.

Every refused client message must come back as one {"type": "error"} naming the problem, with the
server still serving the same connection afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import struct
import threading
import zlib

import aiohttp
import av
import numpy as np
import pytest
from aiohttp import web
from support.serve_checks import FAST_DEMO, assert_served_from, by_chunk, engine_frames, recording_server
from support.serve_harness import Client, running_server, small_demo_engine
from support.untrained import untrained_engine

from helios_rt.cli import main
from helios_rt.serve import ServeConfig, create_app, frames
from helios_rt.serve.frames import JpegEncoder, decode_image, decode_jpeg
from helios_rt.serve.protocol import Ack, ProtocolError, SetPrompt, Start, Stop, parse_message

CONFIG = ServeConfig(max_prompt_chars=200, max_image_bytes=64 * 1024)


def png_bytes(image: np.ndarray) -> bytes:
    ctx = av.CodecContext.create("png", "w")
    ctx.width, ctx.height, ctx.pix_fmt = image.shape[1], image.shape[0], "rgb24"
    packets = ctx.encode(av.VideoFrame.from_ndarray(image, format="rgb24")) + ctx.encode(None)
    return b"".join(bytes(p) for p in packets)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


_ROWS, _COLS = np.meshgrid(np.arange(64) * 4, np.arange(64) * 2, indexing="ij")
GRADIENT = np.stack([_ROWS, _COLS, np.full((64, 64), 90)], -1).astype(np.uint8)

# (message, words the error must contain)
BAD_MESSAGES = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"prompt": "a"}', "unknown message type"),
    ('{"type": "play"}', "unknown message type"),
    ('{"type": "start", "prompt": "a", "volume": 3}', "unknown fields ['volume']"),
    (json.dumps({"type": "start", "prompt": "x" * 5000}), "at most 200"),
    ('{"type": "start", "prompt": 5}', "'prompt' must be a string, got int"),
    ('{"type": "start", "prompt": "   "}', "'prompt' is empty"),
    ('{"type": "start", "prompt": "\\ud800"}', "lone surrogate"),
    ('{"type": "start", "prompt": "a", "seed": "1"}', "'seed' must be an integer"),
    ('{"type": "start", "prompt": "a", "seed": true}', "'seed' must be an integer"),
    ('{"type": "start", "prompt": "a", "seed": -1}', "'seed' must be in"),
    ('{"type": "start", "prompt": "a", "num_frames": 0}', "'num_frames' must be in"),
    ('{"type": "start", "prompt": "a", "num_frames": 1.5}', "'num_frames' must be an integer"),
    ('{"type": "start", "prompt": "a", "image": 7}', "'image' must be a base64 string"),
    ('{"type": "start", "prompt": "a", "image": "!!not base64"}', "not valid base64"),
    (json.dumps({"type": "start", "prompt": "a", "image": b64(bytes(70_000))}), "at most 65536"),
    ('{"type": "ack", "chunk": "0"}', "'chunk' must be an integer"),
    ('{"type": []}', "unknown message type []"),  # unhashable: once a TypeError
    ('{"type": {"a": 1}}', "unknown message type"),
    ('{"type": "ack", "chunk": ' + "1" * 5000 + "}", "not valid JSON"),  # over int's 4300-digit limit
]


@pytest.mark.parametrize(("text", "words"), BAD_MESSAGES, ids=lambda value: value[:40])
def test_each_bad_message_is_refused_with_a_reason(text: str, words: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_message(text, CONFIG)
    assert words in str(info.value), str(info.value)


def test_good_messages_parse() -> None:
    start = parse_message(json.dumps({"type": "start", "prompt": "fish", "seed": 3, "num_frames": None}), CONFIG)
    assert start == Start("fish", 3, None, None)
    image = parse_message(json.dumps({"type": "start", "prompt": "f", "image": "data:image/png;base64,AAEC"}), CONFIG)
    assert image.image == b"\x00\x01\x02"
    assert parse_message('{"type": "prompt", "prompt": "bird"}', CONFIG) == SetPrompt("bird")
    assert parse_message('{"type": "ack", "chunk": 4}', CONFIG) == Ack(4)
    assert parse_message('{"type": "stop"}', CONFIG) == Stop()


def test_config_names_the_bad_limit() -> None:
    with pytest.raises(ValueError, match="max_sessions must be a positive integer"):
        ServeConfig(max_sessions=0)
    with pytest.raises(ValueError, match="token must be a string of at least 8"):
        ServeConfig(token="abc")
    assert ServeConfig().is_local and not ServeConfig(host="0.0.0.0").is_local


@pytest.mark.parametrize("chroma", ["444", "420"])
def test_jpeg_frames_round_trip(chroma: str) -> None:
    frames = np.stack([np.roll(GRADIENT, 5 * i, axis=1) for i in range(3)])
    jpegs = JpegEncoder(64, 64, qscale=2, chroma=chroma).encode(frames)
    assert len(jpegs) == 3 and all(j.startswith(b"\xff\xd8") for j in jpegs)
    for jpeg, frame in zip(jpegs, frames, strict=True):
        err = np.abs(decode_jpeg(jpeg).astype(int) - frame).mean()
        # the colour conversion alone costs `floor` (the same frame through YUV and back, no JPEG; with
        # 4:2:0 it includes the chroma subsampling); the quantiser at qscale 2 may add half a level
        yuv = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format=f"yuvj{chroma}p")
        floor = np.abs(yuv.to_ndarray(format="rgb24").astype(int) - frame).mean()
        assert err < floor + 0.5, (err, floor)


def test_uploaded_images_are_checked() -> None:
    assert np.array_equal(decode_image(png_bytes(GRADIENT), 64, 64), GRADIENT)  # PNG is lossless
    with pytest.raises(ProtocolError, match="is 64x64 but the model runs at 128x64"):
        decode_image(png_bytes(GRADIENT), 64, 128)
    with pytest.raises(ProtocolError, match="neither a PNG nor a JPEG"):
        decode_image(b"GIF89a" + bytes(100), 64, 64)
    with pytest.raises(ProtocolError, match="could not be decoded as PNG"):
        decode_image(png_bytes(GRADIENT)[:40] + bytes(60), 64, 64)
    with pytest.raises(ProtocolError, match="could not be decoded as PNG: no image size"):
        decode_image(png_bytes(GRADIENT)[:8] + bytes(60), 64, 64)
    jpeg = JpegEncoder(64, 64).encode(GRADIENT[None])[0]
    assert decode_image(jpeg, 64, 64).shape == (64, 64, 3)
    with pytest.raises(ProtocolError, match="is 64x64 but the model runs at 128x64"):
        decode_image(jpeg, 64, 128)


def big_png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk claiming a huge picture, then junk: a decode would allocate it all."""
    ihdr = struct.pack(">II5B", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + bytes(400)


def big_jpeg_header(width: int, height: int) -> bytes:
    """A real 64x64 JPEG whose frame header (SOF0) is rewritten to claim `width` x `height`."""
    jpeg = bytearray(JpegEncoder(64, 64).encode(GRADIENT[None])[0])
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(jpeg)


def test_image_size_is_read_from_the_header_before_decoding(monkeypatch) -> None:
    """A small upload that claims 12000x12000 pixels is refused by its header; the decoder never runs."""

    def no_decode(data: bytes, codec: str) -> np.ndarray:
        raise AssertionError(f"the {codec} decoder ran on an image of the wrong size")

    monkeypatch.setattr(frames, "_decode", no_decode)
    for data in (big_png_header(12000, 12000), big_jpeg_header(12000, 12000)):
        assert len(data) < 2000
        with pytest.raises(ProtocolError, match="is 12000x12000 but the model runs at 64x64"):
            decode_image(data, 64, 64)
    with pytest.raises(ProtocolError, match="is 64x12000 but the model runs at 64x64"):
        decode_image(big_png_header(64, 12000), 64, 64)


def test_serve_options_are_checked_before_the_model_loads(capsys, monkeypatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "HELIOS_RT_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    assert main(["serve", "--model", "/nonexistent/checkpoint", "--max-sessions", "0"]) == 2
    assert "max_sessions must be a positive integer" in capsys.readouterr().err


def test_serve_refuses_a_public_host_without_a_token(capsys, monkeypatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "HELIOS_RT_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for host in ("0.0.0.0", "192.168.1.5", "::"):
        assert main(["serve", "--model", "/nonexistent/checkpoint", "--host", host]) == 2
        err = capsys.readouterr().err
        assert f"--host {host} is reachable from other machines: set a token in HELIOS_RT_TOKEN" in err, err
        assert len(err.strip().splitlines()) == 1, err
    # with a token the options pass, and the missing checkpoint is what fails
    monkeypatch.setenv("HELIOS_RT_TOKEN", "s3cret-token")
    assert main(["serve", "--model", "/nonexistent/checkpoint", "--host", "0.0.0.0"]) != 0
    assert "reachable from other machines" not in capsys.readouterr().err


@pytest.mark.parametrize("env", [{"RANK": "1", "WORLD_SIZE": "2"}, {"RANK": "0", "WORLD_SIZE": "4"}])
def test_serve_refuses_to_run_under_torchrun(capsys, monkeypatch, env: dict) -> None:
    monkeypatch.delenv("HELIOS_RT_TOKEN", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", "--model", "/nonexistent/checkpoint"]) == 2
    err = capsys.readouterr().err
    assert "serve does not run under torchrun" in err and len(err.strip().splitlines()) == 1, err


def test_bad_messages_get_errors_and_the_server_keeps_serving() -> None:
    """Every kind of bad message on one connection, then an I2V start on it that streams a chunk."""

    async def run() -> None:
        engine = small_demo_engine()
        async with running_server(engine, CONFIG) as (url, hub), aiohttp.ClientSession() as http:
            client = Client(await http.ws_connect(f"{url}/ws"))
            assert (await client.until("hello"))["width"] == 64
            more = [
                '{"type": "prompt", "prompt": "bird"}',  # no stream playing
                '{"type": "ack", "chunk": 3}',  # nothing sent
                json.dumps({"type": "start", "prompt": "a", "image": b64(b"not an image at all")}),
                json.dumps({"type": "start", "prompt": "a", "image": b64(png_bytes(GRADIENT[:32]))}),
            ]
            bad = [text for text, _ in BAD_MESSAGES] + more
            for text in bad:
                await client.send(text)
                error = await client.until("error", "started")
                assert error["type"] == "error" and error["message"], (text, error)
            await client.ws.send_bytes(b"\x00" * 10)
            assert "binary messages are not accepted" in (await client.until("error"))["message"]
            i2v = {"type": "start", "prompt": "a fish", "num_frames": 33, "image": b64(png_bytes(GRADIENT))}
            await client.send(i2v)
            assert (await client.until("started", "error"))["image"] is True
            chunk = await client.until("chunk")
            await client.until("end")
            assert chunk["frames"] == 33 and len(client.frames) == 33
            assert hub.stats.streams_started == 1 == hub.stats.streams_ended

    asyncio.run(asyncio.wait_for(run(), 60))


def test_the_app_mounts_under_a_prefix() -> None:
    """An application embeds the server with add_subapp: the page, its script and the socket follow."""

    async def run() -> None:
        outer = web.Application()
        outer.add_subapp("/video/", create_app(small_demo_engine()))
        runner = web.AppRunner(outer)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/video"
        try:
            async with aiohttp.ClientSession() as http:
                assert '<script src="player.js">' in await (await http.get(f"{url}/")).text()
                assert "createImageBitmap" in await (await http.get(f"{url}/player.js")).text()
                client = Client(await http.ws_connect(f"{url}/ws", origin="http://" + url.split("/")[2]))
                assert (await client.until("hello"))["frames_per_chunk"] == 33
                await client.ws.close()
        finally:
            await runner.cleanup()

    asyncio.run(asyncio.wait_for(run(), 30))


def test_token_origin_and_oversized_messages() -> None:
    """No stream is started: each check answers before any generation."""

    async def run() -> None:
        config = ServeConfig(token="s3cret-token", max_prompt_chars=100, max_image_bytes=1000)
        async with running_server(small_demo_engine(), config) as (url, _), aiohttp.ClientSession() as http:
            for headers, query in (({}, ""), ({"Authorization": "Bearer wrong-token"}, "")):
                with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                    await http.ws_connect(f"{url}/ws{query}", headers=headers)
                assert info.value.status == 401
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await http.ws_connect(f"{url}/ws?token=s3cret-token", origin="http://evil.example")
            assert info.value.status == 403
            assert (await http.get(f"{url}/stats")).status == 401
            client = Client(await http.ws_connect(f"{url}/ws", headers={"Authorization": "Bearer s3cret-token"}))
            await client.until("hello")
            await client.send("x" * 20_000)  # over the WebSocket's message size limit
            assert await client.receive() is None and client.ws.close_code == 1009
            page = Client(await http.ws_connect(f"{url}/ws?token=s3cret-token", origin=url))  # the page's own origin
            assert (await page.until("hello"))["type"] == "hello"
            await page.ws.close()
            assert "player.js" in await (await http.get(f"{url}/")).text()
            # a header that is not UTF-8 is a wrong token (401), not a server error
            port = int(url.rsplit(":", 1)[1])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xff\xfe\r\n"
                         b"Connection: close\r\n\r\n")  # fmt: skip
            status = await reader.readline()
            writer.close()
            assert status.split()[1] == b"401", status

    asyncio.run(asyncio.wait_for(run(), 30))


def test_without_a_token_only_loopback_host_names_are_answered() -> None:
    """DNS rebinding: a page whose name resolves to 127.0.0.1 sends its own name as Host, and is refused."""

    async def run() -> None:
        engine = small_demo_engine()
        async with running_server(engine) as (url, _), aiohttp.ClientSession() as http:
            port = url.rsplit(":", 1)[1]
            for host in ("evil.example", "127.0.0.1.evil.example", "192.168.1.5", "localhost.evil.example"):
                for path in ("/", "/player.js", "/stats", "/ws"):
                    response = await http.get(f"{url}{path}", headers={"Host": f"{host}:{port}"})
                    assert response.status == 403, (host, path, response.status)
                    assert f"host '{host}:{port}' is not this server's address" in await response.text()
                with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                    await http.ws_connect(f"{url}/ws", headers={"Host": f"{host}:{port}"}, origin=f"http://{host}")
                assert info.value.status == 403
            for host in (f"localhost:{port}", f"LOCALHOST:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost"):
                assert (await http.get(f"{url}/stats", headers={"Host": host})).status == 200, host
            client = Client(await http.ws_connect(f"{url}/ws", headers={"Host": f"localhost:{port}"}))
            assert (await client.until("hello"))["type"] == "hello"
            await client.ws.close()
        # with a token, the token is the check: any host name may reach the server
        config = ServeConfig(host="0.0.0.0", token="s3cret-token")
        async with running_server(engine, config) as (url, _), aiohttp.ClientSession() as http:
            headers = {"Host": "myserver.example", "Authorization": "Bearer s3cret-token"}
            assert (await http.get(f"{url}/stats", headers=headers)).status == 200

    asyncio.run(asyncio.wait_for(run(), 60))


def test_websocket_connections_are_capped() -> None:
    """max_sessions + max_queue + spare_connections sockets; the next gets HTTP 503 saying so."""

    async def run() -> None:
        config = ServeConfig(max_sessions=1, max_queue=1, spare_connections=1)
        async with running_server(small_demo_engine(), config) as (url, _), aiohttp.ClientSession() as http:
            clients = [Client(await http.ws_connect(f"{url}/ws")) for _ in range(3)]
            for client in clients:
                await client.until("hello")
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await http.ws_connect(f"{url}/ws")
            assert info.value.status == 503
            response = await http.get(f"{url}/ws")
            assert response.status == 503
            assert "too many connections: this server accepts 3 WebSockets at once" in await response.text()
            await clients[0].ws.close()
            while (await (await http.get(f"{url}/stats")).json())["sessions"] > 2:
                await asyncio.sleep(0.05)
            again = Client(await http.ws_connect(f"{url}/ws"))  # a closed socket frees its place
            assert (await again.until("hello"))["type"] == "hello"

    asyncio.run(asyncio.wait_for(run(), 60))


def test_a_client_that_never_acknowledges_loses_its_turn() -> None:
    """One turn: a stalled client's stream stops after ack_timeout_s and the queued client gets the turn.

    The queued client's stream is one chunk, within `chunks_ahead`: its stream never waits for an
    acknowledgement, so the short ack_timeout_s is a deadline for the stalled client only.
    """

    async def run() -> None:
        config = ServeConfig(max_sessions=1, chunks_ahead=2, ack_timeout_s=0.5)
        engine = untrained_engine(FAST_DEMO)
        frames_per_chunk = engine.vae.config.num_frames(FAST_DEMO.latent_frames_per_chunk)
        held = threading.Event()
        async with running_server(engine, config) as (url, hub), aiohttp.ClientSession() as http:
            hub.on_engine_later(held.wait)  # the stalled stream holds the turn, not started, until the other queues
            try:
                stalled = Client(await http.ws_connect(f"{url}/ws"))
                await stalled.until("hello")
                await stalled.send({"type": "start", "prompt": "a fish"})  # endless, never acknowledged
                while not hub.active:
                    await asyncio.sleep(0.02)
                waiting = Client(await http.ws_connect(f"{url}/ws"))
                await waiting.until("hello")
                await waiting.send({"type": "start", "prompt": "a bird", "num_frames": frames_per_chunk})
                assert (await waiting.until("started", "busy"))["position"] == 1
            finally:
                held.set()
            assert (await stalled.until("started", "error"))["type"] == "started"
            error = await stalled.until("error")
            assert error["message"] == "no acknowledgement for 0.5 s; the stream was stopped", error
            assert len(stalled.frames) == 2 * frames_per_chunk  # chunks_ahead chunks, then it waited and was stopped
            assert (await waiting.until("started", "error"))["type"] == "started"
            assert (await waiting.until("end", "error"))["type"] == "end"  # played to its end, never acknowledging
            assert len(waiting.frames) == frames_per_chunk
            await stalled.send({"type": "stop"})
            assert (await stalled.until("stopped"))["reason"] == "nothing was playing"
            assert hub.stats.streams_started == 2

    asyncio.run(asyncio.wait_for(run(), 300))


def test_a_prompt_switch_changes_the_frames_from_its_announced_chunk() -> None:
    """The frames the server sends after a switch are the engine's own stream (same seed) with `set_prompt`
    at the chunk the server announced, compared before JPEG encoding; they differ from the unswitched stream.
    """
    start = {"type": "start", "prompt": "a tropical fish among corals", "seed": 11}
    new_prompt = "a red bird over the sea"

    engine = untrained_engine(FAST_DEMO)
    # the engine's own streams, before the server runs: switched at chunk 1 (asserted below), and not
    switched = engine_frames(engine, start["prompt"], start["seed"], 2, switch=(1, new_prompt))
    plain = engine_frames(engine, start["prompt"], start["seed"], 2)

    async def run() -> tuple[Client, dict, object]:
        frames_per_chunk = engine.vae.config.num_frames(FAST_DEMO.latent_frames_per_chunk)
        # one chunk ahead: when chunk 0 has arrived the engine thread waits for its acknowledgement
        config = ServeConfig(chunks_ahead=1)
        async with recording_server(engine, config) as (url, _, encoder), aiohttp.ClientSession() as http:
            client = Client(await http.ws_connect(f"{url}/ws"))
            await client.until("hello")
            await client.send({**start, "num_frames": 2 * frames_per_chunk})
            answer = None
            while (message := await client.until("frame", "end", "error"))["type"] == "frame":
                chunk = message["chunk"]
                if sum(c == chunk for c, _, _ in client.frames) < frames_per_chunk:
                    continue
                if answer is None:  # all of chunk 0 is in, and not acknowledged: switch now
                    await client.send({"type": "prompt", "prompt": new_prompt})
                    answer = await client.until("prompt", "error")
                await client.send({"type": "ack", "chunk": chunk})
            assert message["type"] == "end", message
            return client, answer, encoder

    client, answer, encoder = asyncio.run(asyncio.wait_for(run(), 300))
    # the engine thread was waiting for chunk 0's acknowledgement, so chunk 1 is the first not started
    assert answer == {"type": "prompt", "prompt": new_prompt, "chunk": 1}, answer
    served = by_chunk(client.frames)
    assert sorted(served) == [0, 1], sorted(served)
    assert_served_from(encoder, served, switched, "the client")
    assert np.array_equal(switched[0], plain[0])  # before the switch, the stream is the unswitched one
    for got in encoder.frames_behind(served[1]):
        assert not np.array_equal(got, plain[1]), "chunk 1 is the unswitched stream's: the switch was not applied"


def test_one_prompt_switch_at_a_time() -> None:
    """A switch sent while one waits for the engine thread is refused; once answered, the next is accepted."""

    async def run() -> None:
        held = threading.Event()
        engine = untrained_engine(FAST_DEMO)
        async with running_server(engine) as (url, hub), aiohttp.ClientSession() as http:
            try:
                client = Client(await http.ws_connect(f"{url}/ws"))
                await client.until("hello")
                await client.send({"type": "start", "prompt": "a fish", "num_frames": 99})
                await client.until("started")
                hub.on_engine_later(held.wait)  # the engine thread is busy: switches queue behind this
                await client.send({"type": "prompt", "prompt": "a bird"})
                await client.send({"type": "prompt", "prompt": "a cat"})
                error = await client.until("error", "prompt")
                assert error["type"] == "error" and "a prompt switch is already pending" in error["message"], error
                held.set()
                assert (await client.until("prompt", "error"))["prompt"] == "a bird"
                await client.send({"type": "prompt", "prompt": "a dog"})
                assert (await client.until("prompt", "error"))["prompt"] == "a dog"
                await client.send({"type": "stop"})
                await client.until("stopped")
            finally:
                held.set()

    asyncio.run(asyncio.wait_for(run(), 300))


def test_a_stream_created_after_a_stop_is_closed() -> None:
    """Stop while the engine thread creates the stream: the stream it then returns is closed, not leaked."""

    async def run() -> None:
        engine = small_demo_engine()
        entered, release = threading.Event(), threading.Event()
        created = []
        generate_stream = engine.generate_stream

        def slow_generate_stream(*args, **kwargs):
            entered.set()
            release.wait()
            created.append(generate_stream(*args, **kwargs))
            return created[-1]

        engine.generate_stream = slow_generate_stream
        async with running_server(engine) as (url, _), aiohttp.ClientSession() as http:
            try:
                client = Client(await http.ws_connect(f"{url}/ws"))
                await client.until("hello")
                await client.send({"type": "start", "prompt": "a fish"})
                while not entered.is_set():
                    await asyncio.sleep(0.02)
                await client.send({"type": "stop"})
                assert (await client.until("stopped"))["reason"] == "stop"
            finally:
                release.set()
            while not created or not created[0]._closed:  # closed on the engine thread once it exists
                await asyncio.sleep(0.05)
            assert not any(m["type"] == "started" for m in client.messages), client.messages

    asyncio.run(asyncio.wait_for(run(), 120))


def test_a_switch_past_the_end_is_refused() -> None:
    """A one-chunk stream whose chunk has been made: a switch would land on a chunk that never comes.

    One chunk ahead and no acknowledgement: the stream waits for room after its only chunk, so it is
    still playing when the switch arrives.
    """

    async def run() -> None:
        engine = untrained_engine(FAST_DEMO)
        frames_per_chunk = engine.vae.config.num_frames(FAST_DEMO.latent_frames_per_chunk)
        async with running_server(engine, ServeConfig(chunks_ahead=1)) as (url, _), aiohttp.ClientSession() as http:
            client = Client(await http.ws_connect(f"{url}/ws"))
            await client.until("hello")
            await client.send({"type": "start", "prompt": "a fish", "num_frames": frames_per_chunk})
            assert (await client.until("started"))["chunks_total"] == 1
            while len(client.frames) < frames_per_chunk:
                await client.until("frame")
            await client.send({"type": "prompt", "prompt": "a bird"})
            answer = await client.until("prompt", "error")
            assert answer["type"] == "error" and answer["about"] == "prompt" and not answer["fatal"], answer
            assert "past the end of this stream (it has one chunk, chunk 0)" in answer["message"], answer
            await client.send({"type": "ack", "chunk": 0})
            assert (await client.until("end", "error"))["chunks"] == 1

    asyncio.run(asyncio.wait_for(run(), 120))


def test_a_paused_stream_waits_past_the_ack_deadline_and_resumes() -> None:
    """A hidden page pauses: nothing more is generated, the acknowledgement deadline does not run, and
    after resume the stream goes on from the next chunk, nothing lost."""

    async def run() -> None:
        engine = untrained_engine(FAST_DEMO)
        config = ServeConfig(chunks_ahead=1, ack_timeout_s=0.3)
        async with running_server(engine, config) as (url, hub), aiohttp.ClientSession() as http:
            client = Client(await http.ws_connect(f"{url}/ws"))
            await client.until("hello")
            await client.send({"type": "pause"})
            assert "no stream is playing to pause" in (await client.until("error"))["message"]
            await client.send({"type": "start", "prompt": "a fish", "num_frames": 27})
            await client.until("chunk")
            await client.send({"type": "pause"})
            assert (await client.until("paused"))["type"] == "paused"
            await client.send({"type": "ack", "chunk": 0})  # room for one more, but paused: nothing is made
            await asyncio.sleep(3 * config.ack_timeout_s)  # past the deadline of a client that went silent
            assert [m["index"] for m in client.messages if m["type"] == "chunk"] == [0]
            assert not [m for m in client.messages if m["type"] == "error" and "acknowledgement" in m["message"]]
            await client.send({"type": "resume"})
            await client.until("resumed")
            for index in (1, 2):
                assert (await client.until("chunk", "error"))["index"] == index
                while sum(c == index for c, _, _ in client.frames) < 9:
                    await client.until("frame")
                await client.send({"type": "ack", "chunk": index})
            assert (await client.until("end", "error"))["chunks"] == 3
            assert [f for _, f, _ in client.frames] == list(range(27))
            assert hub.stats.streams_ended == 1

    asyncio.run(asyncio.wait_for(run(), 120))


def test_the_page_is_served_with_a_csp_that_forbids_framing_and_a_favicon() -> None:
    async def run() -> None:
        async with running_server(small_demo_engine()) as (url, _), aiohttp.ClientSession() as http:
            page = await http.get(f"{url}/")
            csp = page.headers["Content-Security-Policy"]
            for rule in ("frame-ancestors 'none'", "default-src 'self'", "script-src 'self'",
                         "img-src 'self' blob: data:", f"connect-src 'self' ws://{url[7:]}"):  # fmt: skip
                assert rule in csp, (rule, csp)
            assert "unsafe-inline" not in csp and page.headers["X-Frame-Options"] == "DENY"
            html = await page.text()
            assert '<link rel="icon" href="favicon.svg"' in html and "<style" not in html and "style=" not in html
            assert "<script>" not in html  # the only script is player.js, allowed by script-src 'self'
            icon = await http.get(f"{url}/favicon.svg")
            assert icon.status == 200 and icon.content_type == "image/svg+xml"
            assert (await icon.text()).startswith("<svg")
            assert (await http.get(f"{url}/player.css")).headers["X-Frame-Options"] == "DENY"

    asyncio.run(asyncio.wait_for(run(), 30))


def test_serve_fails_in_one_line_on_a_port_in_use_before_the_model_loads(capsys, monkeypatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "HELIOS_RT_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # a checkpoint that does not exist: the port is what fails, before any load is tried
        assert main(["serve", "--model", "/nonexistent/checkpoint", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is in use" in err and "--port" in err, err
    assert len(err.strip().splitlines()) == 1 and "checkpoint" not in err, err


def test_serve_names_the_token_variable_and_documents_itself(capsys, monkeypatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("HELIOS_RT_TOKEN", "short")
    assert main(["serve", "--model", "/nonexistent/checkpoint"]) == 2
    err = capsys.readouterr().err
    assert "HELIOS_RT_TOKEN holds a token of 5 characters; use at least 8" in err and "ServeConfig" not in err, err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    serving, engine = text.index("serving options:"), text.index("engine options:")
    assert serving < text.index("\n  --port") < engine < text.index("\n  --kernels"), text
    assert "(default: 8765)" in text and "example:" in text and "\n  helios-rt serve --model demo " in text, text
