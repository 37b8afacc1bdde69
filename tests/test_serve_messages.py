"""`helios-rt serve`: message validation, limits, token and origin checks, frame codec (issue 17).

Every refused client message must come back as one {"type": "error"} naming the problem, with the
server still serving the same connection afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import json

import aiohttp
import av
import numpy as np
import pytest
from aiohttp import web
from support.serve_harness import Client, running_server, small_demo_engine

from helios_rt.cli import main
from helios_rt.serve import ServeConfig, create_app
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


def test_serve_options_are_checked_before_the_model_loads(capsys) -> None:
    assert main(["serve", "--model", "/nonexistent/checkpoint", "--max-sessions", "0"]) == 2
    assert "max_sessions must be a positive integer" in capsys.readouterr().err


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

    asyncio.run(asyncio.wait_for(run(), 30))
