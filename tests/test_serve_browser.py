"""`helios-rt serve` in a real headless Chromium, driven over its DevTools protocol.

The page loads, starts a demo stream (image-to-video, from an image uploaded on the page), plays
frames that change over time, switches the prompt mid-stream and shows the chunk the switch takes
effect at. What the canvas shows is compared pixel by pixel with the JPEG frames the server sent, as
Chromium itself recorded them off the WebSocket; those JPEGs are the server encoder's output of
exactly the engine's own stream (same image, prompt and seed as the page sent) with `set_prompt` at
the chunk the server announced, compared before encoding, and the switched chunk is not the
unswitched stream's.

Chromium comes from the distribution (`apt-get install -y chromium`); without it the test fails in
CI (CI=true) and is skipped elsewhere, with the install line.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import aiohttp
import av
import numpy as np
import pytest
from support.serve_checks import FAST_DEMO, assert_served_from, by_chunk, engine_frames, recording_server
from support.serve_harness import ChunkGate

from helios_rt import Engine
from helios_rt.serve import ServeConfig
from helios_rt.serve.frames import decode_image, decode_jpeg
from helios_rt.serve.protocol import Start, parse_message, unpack_frame

# --disable-background-networking and friends: this machine's closed network refuses Chromium's own
# connections (updates, sync, QUIC probes), which otherwise stall start-up.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=800,600", "--remote-debugging-port=0"]  # fmt: skip
pytestmark = pytest.mark.slow  # a real Chromium and a served stream

FRAMES_PER_CHUNK = 9  # FAST_DEMO
CHUNKS = 6  # the page asks for six chunks: the switch, sent once frame 3 is shown, lands well before the end


@pytest.fixture
def chromium() -> str:
    path = os.environ.get("HELIOS_RT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        reason = "Chromium is not installed: apt-get install -y chromium (or set HELIOS_RT_CHROMIUM)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


class DevTools:
    """A minimal DevTools-protocol client for one page: calls, and the events it has seen."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[dict] = []
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self._pending:
                self._pending.pop(data["id"]).set_result(data)
            elif "method" in data:
                self.events.append(data)

    async def call(self, method: str, **params) -> dict:
        call_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        await self.ws.send_json({"id": call_id, "method": method, "params": params})
        reply = await asyncio.wait_for(future, 30)
        assert "error" not in reply, (method, reply["error"])
        return reply["result"]

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 60.0):
        """Poll `expression` until it is truthy (an exception, e.g. while the page loads, counts as false)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            value = await self.evaluate(f"(() => {{ try {{ return {expression}; }} catch (e) {{ return null; }} }})()")
            if value:
                return value
            assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {expression}"
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with suppress(asyncio.CancelledError):
            await self._reader


@asynccontextmanager
async def page_in_chromium(path: str, profile: Path) -> AsyncIterator[DevTools]:
    """Start Chromium with a fresh profile; a DevTools connection to its one page."""
    proc = await asyncio.create_subprocess_exec(
        path, *FLAGS, f"--user-data-dir={profile}", "about:blank",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        port_file = profile / "DevToolsActivePort"
        for _ in range(600):
            if port_file.exists() and port_file.read_text().strip():
                break
            assert proc.returncode is None, f"chromium exited with {proc.returncode}"
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as http:
            targets = await (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
            url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            devtools = DevTools(await http.ws_connect(url, max_msg_size=0))
            try:
                yield devtools
            finally:
                await devtools.close()
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


async def canvas_shot(devtools: DevTools) -> tuple[dict, np.ndarray]:
    """Freeze playback, screenshot the canvas at one device pixel per video pixel, resume."""
    shown = await devtools.evaluate("helios.freeze()")
    box = await devtools.evaluate(
        "(() => { const c = document.getElementById('screen'), r = c.getBoundingClientRect();"
        " return {x: r.left + c.clientLeft, y: r.top + c.clientTop, width: c.width, height: c.height, scale: 1}; })()"
    )
    shot = await devtools.call("Page.captureScreenshot", format="png", clip=box)
    counter = await devtools.evaluate("document.getElementById('frame').textContent")
    await devtools.evaluate("helios.resume()")
    assert counter == str(shown["frame"])  # the frame counter names the frame on the canvas
    return shown, decode_png(base64.b64decode(shot["data"]))


async def main_thread_seconds(devtools: DevTools) -> float:
    """Seconds the page's main thread has spent on tasks (Chromium's own counter): the page's CPU."""
    metrics = (await devtools.call("Performance.getMetrics"))["metrics"]
    return next(m["value"] for m in metrics if m["name"] == "TaskDuration")


def write_png(path: Path) -> Path:
    rows, cols = np.meshgrid(np.arange(80), np.arange(96), indexing="ij")
    image = np.stack([rows * 3, cols * 2, np.full_like(rows, 120)], -1).astype(np.uint8)
    ctx = av.CodecContext.create("png", "w")
    ctx.width, ctx.height, ctx.pix_fmt = 96, 80, "rgb24"
    packets = ctx.encode(av.VideoFrame.from_ndarray(image, format="rgb24")) + ctx.encode(None)
    path.write_bytes(b"".join(bytes(p) for p in packets))
    return path


def decode_png(data: bytes) -> np.ndarray:
    ctx = av.CodecContext.create("png", "r")
    return ctx.decode(av.Packet(data))[0].to_ndarray(format="rgb24")


def received_over_the_socket(events: list[dict]) -> tuple[list[tuple[int, int, bytes]], list[dict]]:
    """The frames (chunk, frame, JPEG) and JSON messages the server sent, as Chromium received them, in order."""
    frames, messages = [], []
    for event in events:
        if event["method"] != "Network.webSocketFrameReceived":
            continue
        response = event["params"]["response"]
        if response["opcode"] == 2:
            frames.append(unpack_frame(base64.b64decode(response["payloadData"])))
        else:
            messages.append(json.loads(response["payloadData"]))
    return frames, messages


def start_sent(events: list[dict]) -> Start:
    """The page's start message (prompt, seed, the image as it uploaded it), as Chromium sent it."""
    sent = [e["params"]["response"]["payloadData"] for e in events if e["method"] == "Network.webSocketFrameSent"]
    starts = [m for m in sent if json.loads(m)["type"] == "start"]
    assert len(starts) == 1, starts
    return parse_message(starts[0], ServeConfig())


def mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_page_plays_the_stream_and_switches_the_prompt(chromium: str, tmp_path: Path) -> None:
    engine = Engine.from_pretrained("demo", FAST_DEMO)

    async def run() -> tuple:
        async with recording_server(engine) as (url, _, encoder), page_in_chromium(chromium, tmp_path) as page:
            await page.call("Network.enable")
            await page.call("Performance.enable")
            await page.call("Page.navigate", url=f"{url}/?zoom=1")
            await page.wait_for("document.getElementById('status').textContent.startsWith('ready')", 30)
            await page.wait_for("document.getElementById('start').disabled === false")
            # image-to-video through the page's upload: a 96x80 PNG the page crops and scales to 64x64
            document = await page.call("DOM.getDocument")
            node = await page.call("DOM.querySelector", nodeId=document["root"]["nodeId"], selector="#image")
            await page.call(
                "DOM.setFileInputFiles", files=[str(write_png(tmp_path / "first.png"))], nodeId=node["nodeId"]
            )
            await page.evaluate(
                "document.getElementById('prompt').value = 'a red circle on a blue background';"
                f"document.getElementById('frames').value = '{CHUNKS * FRAMES_PER_CHUNK}';"
                "document.getElementById('start').click()"
            )
            await page.wait_for("helios.player.shown.frame >= 3")
            first = await canvas_shot(page)
            cpu_before = await main_thread_seconds(page)
            await page.evaluate(
                "document.getElementById('next-prompt').value = 'a yellow circle on a blue background';"
                "document.getElementById('switch-button').click()"
            )
            switch = await page.wait_for(
                "(document.getElementById('switch').textContent.match(/switch at chunk (\\d+)/) || [])[1]"
            )
            await page.wait_for(
                f"helios.player.shown.chunk >= {switch} && "
                "helios.player.shown.frame % helios.player.hello.frames_per_chunk >= 3"
            )
            second = await canvas_shot(page)
            drawn = second[0]["frame"] - first[0]["frame"]
            stats_cpu = (await main_thread_seconds(page) - cpu_before) / max(drawn, 1)
            label = await page.evaluate("document.getElementById('switch').textContent")
            stats = await page.evaluate(
                "({ttff: document.getElementById('ttff').textContent, error: document.getElementById('error')"
                ".textContent, decode: document.getElementById('decode').textContent})"
            )
            return first, second, int(switch), label, stats, page.events, stats_cpu, encoder

    first, second, switch, label, stats, events, cpu_per_frame, encoder = asyncio.run(asyncio.wait_for(run(), 100))
    received, messages = received_over_the_socket(events)
    frames = {frame: decode_jpeg(jpeg) for _, frame, jpeg in received}
    assert [m["chunk"] for m in messages if m["type"] == "prompt"] == [switch] and 1 <= switch < CHUNKS
    assert [m["image"] for m in messages if m["type"] == "started"] == [True]  # the upload reached the engine
    assert label == f"switched at chunk {switch} (shown)" and stats["error"] == ""
    assert stats["ttff"].endswith(" s"), stats
    diffs = []
    for shown, shot in (first, second):
        assert shot.shape == (64, 64, 3)
        distances = {index: mean_diff(shot, frame) for index, frame in frames.items()}
        best = min(distances, key=distances.get)
        diffs.append(distances[shown["frame"]])
        # The canvas shows the frame the page says it shows: Chromium's JPEG decoder and PyAV's differ
        # by a level or two (IDCT rounding, chroma upsampling), other frames by far more.
        assert best == shown["frame"], (shown, best, distances[best], distances[shown["frame"]])
        assert distances[shown["frame"]] < 3.0, distances[shown["frame"]]
    assert second[0]["chunk"] >= switch > first[0]["chunk"]
    assert mean_diff(first[1], second[1]) > 10 * max(diffs)  # the picture changed over time
    # what Chromium received is the engine's own stream, switched where the server said; the same image
    # (as the page uploaded it), prompt and seed, on the server's engine now that the server has stopped
    start = start_sent(events)
    image = decode_image(start.image, FAST_DEMO.height, FAST_DEMO.width)
    new_prompt = next(m["prompt"] for m in messages if m["type"] == "prompt")
    served = by_chunk(received)
    assert switch in served, sorted(served)  # the page showed a frame of the switched chunk
    switched = engine_frames(engine, start.prompt, start.seed, max(served) + 1, image, switch=(switch, new_prompt))
    assert_served_from(encoder, served, switched, "Chromium")
    plain = engine_frames(engine, start.prompt, start.seed, switch + 1, image)
    for got in encoder.frames_behind(served[switch]):
        assert not np.array_equal(got, plain[switch][: len(got)]), "the switched chunk is the unswitched stream's"
    print(f"\nbrowser: canvas vs sent frame {diffs}, switch at chunk {switch}, decode {stats['decode']} ms/frame "
          f"(latency), page main thread {cpu_per_frame * 1000:.2f} ms per frame shown")  # fmt: skip


TOKEN = "s3cret-token"
SHOTS = os.environ.get("HELIOS_RT_SCREENSHOTS")  # a folder: save the page at each state (docs/serve_screenshots.sh)


async def state(page: DevTools) -> dict:
    """The words on the page: the status (and its state), the error, the switch label, the buttons."""
    return await page.evaluate(
        "(() => { const t = (id) => document.getElementById(id).textContent;"
        " const off = (id) => document.getElementById(id).disabled;"
        " return {state: document.getElementById('status').dataset.state, status: t('status'), error: t('error'),"
        " switch: t('switch'), prompt: t('current-prompt'), fps: t('fps'), rtf: t('rtf'), gen: t('gen'),"
        " start: !off('start'), stop: !off('stop'), switchable: !off('switch-button'),"
        " reconnect: !document.getElementById('reconnect').hidden,"
        " preview: !document.getElementById('preview').hidden}; })()"
    )


async def reach(page: DevTools, name: str, timeout: float = 60.0) -> dict:
    await page.wait_for(f"document.getElementById('status').dataset.state === {json.dumps(name)}", timeout)
    return await state(page)


async def shoot(page: DevTools, name: str) -> None:
    if SHOTS:
        size = (await page.call("Page.getLayoutMetrics"))["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = await page.call("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)
        Path(SHOTS, f"serve_{name}.png").write_bytes(base64.b64decode(shot["data"]))


async def set_files(page: DevTools, files: list[str]) -> None:
    document = await page.call("DOM.getDocument")
    node = await page.call("DOM.querySelector", nodeId=document["root"]["nodeId"], selector="#image")
    await page.call("DOM.setFileInputFiles", files=files, nodeId=node["nodeId"])


async def press_enter(page: DevTools, element: str) -> None:
    await page.evaluate(f"document.getElementById('{element}').dispatchEvent("
                        "new KeyboardEvent('keydown', {key: 'Enter', bubbles: true}))")  # fmt: skip


def sent_types(events: list[dict]) -> list[str]:
    sent = [e["params"]["response"]["payloadData"] for e in events if e["method"] == "Network.webSocketFrameSent"]
    return [json.loads(m)["type"] for m in sent]


def test_the_page_says_what_happens(chromium: str, tmp_path: Path) -> None:
    """One browser session walks the page's states and reads its words: a missing and a wrong
    token, then the right one through the address's hash; a file that is not an image, then a good one
    (previewed); Start by Enter; a stall (the server's generation held) and its recovery; a hidden tab
    (a second tab in front) that pauses the stream on the server past its acknowledgement deadline and
    resumes; a switch past the end of a one-chunk stream, refused; finished; the server shutting down
    mid-stream, then Reconnect offered.
    """
    engine = Engine.from_pretrained("demo", FAST_DEMO)
    # a short acknowledgement deadline: a hidden tab that merely stopped acknowledging would lose its stream
    config = ServeConfig(token=TOKEN, ack_timeout_s=1.0)
    (tmp_path / "notes.txt").write_text("not an image")
    profile = tmp_path / "profile"
    profile.mkdir()

    async def run() -> dict:
        seen = {}
        server = recording_server(engine, config)
        url, hub, _ = await server.__aenter__()
        gate = ChunkGate(hub)
        try:
            async with page_in_chromium(chromium, profile) as page:
                await page.call("Network.enable")
                await page.call("Page.navigate", url=f"{url}/")
                await page.wait_for("document.getElementById('error').textContent")
                seen["no token"] = await reach(page, "disconnected")
                await page.evaluate("location.hash = 'token=wrong-token'")
                await page.wait_for("document.getElementById('error').textContent.includes('wrong')")
                seen["wrong token"] = await reach(page, "disconnected")
                await page.evaluate(f"location.hash = 'token={TOKEN}'")
                seen["token"] = await reach(page, "ready")
                await set_files(page, [str(tmp_path / "notes.txt")])
                await page.wait_for("document.getElementById('error').textContent.includes('not an image')")
                seen["bad image"] = await state(page)
                await set_files(page, [str(write_png(tmp_path / "first.png"))])
                await page.wait_for("!document.getElementById('preview').hidden")
                seen["good image"] = await state(page)
                await page.evaluate("document.getElementById('prompt').value = 'a yellow circle on a blue background'")
                await press_enter(page, "prompt")  # endless
                seen["playing"] = await reach(page, "playing")
                await page.wait_for("document.getElementById('rtf').textContent !== '-'")
                await shoot(page, "playing")
                gate.allow(0)  # generation stops: the page plays out its buffer, then stalls
                seen["stalled"] = await reach(page, "stalled")
                await page.wait_for("document.getElementById('fps').textContent === '0'")
                seen["stalled fps"] = await state(page)
                await shoot(page, "stalled")
                gate.allow(None)
                seen["recovered"] = await reach(page, "playing")
                other = await page.call("Target.createTarget", url="about:blank")  # this tab is hidden now
                seen["paused"] = await reach(page, "paused")
                await shoot(page, "paused")
                await asyncio.sleep(2 * config.ack_timeout_s)  # past the deadline of a silent client
                await page.call("Target.closeTarget", targetId=other["targetId"])
                await page.call("Page.bringToFront")
                await page.wait_for("helios.player.shown.frame > 0 && document.visibilityState === 'visible'")
                seen["resumed"] = await reach(page, "playing")
                count = await page.evaluate("helios.player.shown.frame")
                await page.wait_for(f"helios.player.shown.frame > {count} + 9")  # frames made after the pause
                await page.evaluate("document.getElementById('stop').click()")
                seen["stopped"] = await reach(page, "stopped")
                # a one-chunk stream whose end is held back: a switch now lands past its end
                gate.allow(1)
                await page.evaluate(f"document.getElementById('frames').value = '{FRAMES_PER_CHUNK}';"
                                    "document.getElementById('start').click()")  # fmt: skip
                await page.wait_for("helios.player.chunksGenerated === 1 && helios.player.shown.frame >= 0")
                await page.evaluate("document.getElementById('next-prompt').value = 'a red box'")
                await press_enter(page, "next-prompt")
                await page.wait_for("document.getElementById('switch').textContent.startsWith('switch refused')")
                seen["past the end"] = await state(page)
                gate.allow(None)
                seen["finished"] = await reach(page, "finished")
                await shoot(page, "finished")
                await page.evaluate("document.getElementById('frames').value = ''")
                await page.evaluate("document.getElementById('start').click()")
                await reach(page, "playing")
                await server.__aexit__(None, None, None)  # the server shuts down mid-stream
                server = None
                seen["shut down"] = await reach(page, "disconnected")
                seen["sent"] = sent_types(page.events)
        finally:
            if server is not None:
                await server.__aexit__(None, None, None)
        return seen

    seen = asyncio.run(asyncio.wait_for(run(), 150))
    assert "needs a token" in seen["no token"]["error"] and "#token=" in seen["no token"]["error"], seen["no token"]
    assert seen["no token"]["reconnect"] and not seen["no token"]["start"], seen["no token"]
    assert "HELIOS_RT_TOKEN" in seen["wrong token"]["error"], seen["wrong token"]
    assert seen["token"]["start"] and seen["token"]["error"] == "", seen["token"]
    assert "notes.txt is not an image" in seen["bad image"]["error"] and not seen["bad image"]["preview"]
    assert seen["good image"]["preview"] and seen["good image"]["error"] == "", seen["good image"]
    playing = seen["playing"]
    assert playing["status"].startswith("playing") and playing["stop"] and playing["switchable"], playing
    assert not playing["start"] and playing["prompt"] == "prompt: a yellow circle on a blue background", playing
    assert seen["stalled"]["status"].startswith("stalled") and seen["stalled fps"]["fps"] == "0", seen["stalled"]
    assert seen["recovered"]["status"].startswith("playing"), seen["recovered"]
    assert seen["paused"]["status"].startswith("paused") and not seen["paused"]["switchable"], seen["paused"]
    assert seen["resumed"]["error"] == "", seen["resumed"]  # not "no acknowledgement for 1 s"
    assert seen["stopped"]["start"] and not seen["stopped"]["stop"], seen["stopped"]
    past = seen["past the end"]
    assert "past the end of this stream (it has one chunk, chunk 0)" in past["switch"], past
    assert past["status"].startswith("playing") and past["error"] == "", past  # the stream plays on
    assert seen["finished"]["status"] == "finished: 1 chunk played" and seen["finished"]["start"], seen["finished"]
    gone = seen["shut down"]
    assert "1001" in gone["status"] and gone["reconnect"] and not gone["start"] and not gone["stop"], gone
    assert seen["sent"].count("pause") == 1 and seen["sent"].count("resume") == 1, seen["sent"]
