// helios-rt live player: JPEG frames from the WebSocket, drawn on a canvas at the video's frame rate.
// Protocol: helios_rt/serve/protocol.py. Frames wait in a small jitter buffer; a chunk is acknowledged
// once all its frames arrived and at most two chunks' frames wait to be shown, so the server never
// generates far ahead of what this page plays.
"use strict";

const $ = (id) => document.getElementById(id);
const HEADER_BYTES = 12; // "HRT1", chunk u32, frame u32 (little endian)
const params = new URLSearchParams(location.search);
const token = new URLSearchParams(location.hash.slice(1)).get("token");

const player = {
  hello: null, ws: null, state: "idle", playing: false, frozen: false, ended: false,
  buffer: [],            // {chunk, frame, bitmap|null} in arrival order
  chunkFrames: new Map(), // chunk -> frames announced / received
  toAck: [],             // chunks fully received, not yet acknowledged
  jitterFrames: 6, started: false, startClick: 0, ttff: null,
  shown: { frame: -1, chunk: -1 }, drawTimes: [], decodeMs: [], bytes: 0,
  switchChunk: null, nextDue: 0,
};

function connect() {
  const url = new URL("ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (token) url.searchParams.set("token", token);
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  ws.onmessage = (ev) => (typeof ev.data === "string" ? onMessage(JSON.parse(ev.data)) : onFrame(ev.data));
  ws.onclose = (ev) => {
    status(`disconnected (${ev.code}${ev.reason ? ": " + ev.reason : ""}); reload the page to reconnect`);
    setStreaming(false);
  };
  player.ws = ws;
}

function send(message) { player.ws.send(JSON.stringify(message)); }
function status(text) { $("status").textContent = text; }
function showError(text) { $("error").textContent = text; }

function onMessage(m) {
  if (m.type === "hello") {
    player.hello = m;
    const zoom = Number(params.get("zoom")) || Math.max(1, Math.floor(640 / m.width));
    const canvas = $("screen");
    canvas.width = m.width; canvas.height = m.height;
    canvas.style.width = `${m.width * zoom}px`; canvas.style.height = `${m.height * zoom}px`;
    player.jitterFrames = Math.max(2, Math.round(m.fps / 4));
    status(`ready: ${m.width}x${m.height} at ${m.fps} fps, ${m.frames_per_chunk} frames per chunk`);
  } else if (m.type === "busy") {
    status(m.queue_full ? m.message : `busy: you are number ${m.position} of ${m.waiting} in the queue`);
    if (m.queue_full) setStreaming(false);
    else player.state = "queued";
  } else if (m.type === "started") {
    player.state = "playing";
    status(`playing (seed ${m.seed}${m.chunks_total ? `, ${m.chunks_total} chunks` : ", endless"})`);
  } else if (m.type === "chunk") {
    player.chunkFrames.set(m.index, { expected: m.frames, received: 0 });
  } else if (m.type === "prompt") {
    player.switchChunk = m.chunk;
    $("switch").textContent = `switch at chunk ${m.chunk} (waiting)`;
  } else if (m.type === "end") {
    player.ended = true;
    setStreaming(false);
    status(`generated ${m.chunks} chunks; playing out the buffer`);
  } else if (m.type === "stopped") {
    status(`stopped (${m.reason})`); setStreaming(false); player.playing = false;
  } else if (m.type === "error") {
    showError(m.message);
    if (m.fatal || player.state === "starting") setStreaming(false); // a refused start, or a failed stream
  }
}

function onFrame(data) {
  const view = new DataView(data);
  const chunk = view.getUint32(4, true), frame = view.getUint32(8, true);
  const entry = { chunk, frame, bitmap: null };
  player.buffer.push(entry);
  player.bytes += data.byteLength;
  const began = performance.now();
  createImageBitmap(new Blob([data.slice(HEADER_BYTES)], { type: "image/jpeg" })).then((bitmap) => {
    entry.bitmap = bitmap;
    player.decodeMs.push(performance.now() - began);
    if (player.decodeMs.length > 100) player.decodeMs.shift();
  });
  const count = player.chunkFrames.get(chunk);
  if (count && ++count.received === count.expected) { player.toAck.push(chunk); player.chunkFrames.delete(chunk); }
  acknowledge();
}

function acknowledge() {
  // Acknowledge received chunks only while at most two chunks' frames wait to be shown.
  while (player.toAck.length && player.buffer.length <= 2 * player.hello.frames_per_chunk) {
    send({ type: "ack", chunk: player.toAck.shift() });
  }
}

function draw(now) {
  requestAnimationFrame(draw);
  if (!player.playing || player.frozen) return;
  const ready = player.buffer.length && player.buffer[0].bitmap;
  if (!player.started) { // fill the jitter buffer first (or play what there is once generation ended)
    if (!ready || (player.buffer.length < player.jitterFrames && !player.ended)) return;
    player.started = true; player.nextDue = now;
  }
  if (now < player.nextDue) return;
  if (!ready) {
    player.started = false;
    status(player.ended && !player.buffer.length ? "finished" : "buffering...");
    return;
  }
  const entry = player.buffer.shift();
  $("screen").getContext("2d").drawImage(entry.bitmap, 0, 0);
  entry.bitmap.close();
  player.shown = { frame: entry.frame, chunk: entry.chunk };
  player.nextDue = Math.max(player.nextDue + 1000 / player.hello.fps, now - 1000 / player.hello.fps);
  if (player.ttff === null) player.ttff = (now - player.startClick) / 1000;
  player.drawTimes.push(now);
  while (player.drawTimes.length && player.drawTimes[0] < now - 1000) player.drawTimes.shift();
  if (player.switchChunk !== null && entry.chunk >= player.switchChunk) {
    $("switch").textContent = `switched at chunk ${player.switchChunk} (shown)`;
  }
  updateStats();
  acknowledge();
}

function updateStats() {
  const decode = player.decodeMs.length ? player.decodeMs.reduce((a, b) => a + b) / player.decodeMs.length : null;
  $("frame").textContent = player.shown.frame;
  $("chunk").textContent = player.shown.chunk;
  $("ttff").textContent = player.ttff === null ? "-" : `${player.ttff.toFixed(2)} s`;
  $("fps").textContent = player.drawTimes.length;
  $("buffer").textContent = player.buffer.length;
  $("decode").textContent = decode === null ? "-" : decode.toFixed(2);
  $("kbytes").textContent = (player.bytes / 1024).toFixed(0);
}

function setStreaming(on) {
  // Buttons follow the stream on the server; drawing (player.playing) goes on until the buffer is shown.
  if (!on) player.state = "idle";
  $("start").disabled = on; $("stop").disabled = !on; $("switch-button").disabled = !on;
}

async function imageAsBase64(file) {
  // Crop to the video's aspect ratio and scale to its size, as the server requires.
  const bitmap = await createImageBitmap(file);
  const { width, height } = player.hello;
  const canvas = document.createElement("canvas");
  canvas.width = width; canvas.height = height;
  const scale = Math.max(width / bitmap.width, height / bitmap.height);
  const w = bitmap.width * scale, h = bitmap.height * scale;
  canvas.getContext("2d").drawImage(bitmap, (width - w) / 2, (height - h) / 2, w, h);
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  const bytes = new Uint8Array(await blob.arrayBuffer());
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

$("start").onclick = async () => {
  showError("");
  Object.assign(player, { buffer: [], toAck: [], chunkFrames: new Map(), started: false, ended: false,
    ttff: null, startClick: performance.now(), switchChunk: null, bytes: 0 });
  $("switch").textContent = "";
  const message = { type: "start", prompt: $("prompt").value, seed: Number($("seed").value) || 0 };
  if ($("frames").value) message.num_frames = Number($("frames").value);
  const file = $("image").files[0];
  if (file) message.image = await imageAsBase64(file);
  player.state = "starting"; player.playing = true;
  setStreaming(true);
  send(message);
};
$("stop").onclick = () => send({ type: "stop" });
$("switch-button").onclick = () => {
  if ($("next-prompt").value.trim()) send({ type: "prompt", prompt: $("next-prompt").value });
};

// Hooks for tests and embedding pages: stop drawing (the canvas keeps the frame shown) and resume.
window.helios = {
  player,
  freeze() { player.frozen = true; return { ...player.shown }; },
  resume() { player.frozen = false; },
};

connect();
requestAnimationFrame(draw);
