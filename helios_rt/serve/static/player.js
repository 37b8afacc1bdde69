// helios-rt live player: JPEG frames from the WebSocket, drawn on a canvas at the video's frame rate.
// Protocol: helios_rt/serve/protocol.py. Frames wait in a small jitter buffer; a chunk is acknowledged
// once all its frames arrived and at most two chunks' frames wait to be shown, so the server never
// generates far ahead of what this page plays.
//
// One source of truth: `player.state` (one of STATES), set only by setState(), which writes its words
// into #status and enables the buttons from the same table; nothing else writes #status.
"use strict";

const $ = (id) => document.getElementById(id);
const HEADER_BYTES = 12; // "HRT1", chunk u32, frame u32 (little endian)
const params = new URLSearchParams(location.search);
const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

// state -> its words, and which buttons it allows (a closed socket allows none but Reconnect)
const STATES = {
  connecting: { words: "connecting...", start: false, stop: false, sw: false },
  ready: { words: "ready", start: true, stop: false, sw: false },
  queued: { words: "queued", start: false, stop: true, sw: false },
  starting: { words: "generating the first chunk...", start: false, stop: true, sw: false },
  playing: { words: "playing", start: false, stop: true, sw: true },
  stalled: { words: "stalled: waiting for the next chunk", start: false, stop: true, sw: true },
  paused: { words: "paused", start: false, stop: true, sw: false },
  finished: { words: "finished", start: true, stop: false, sw: false },
  stopped: { words: "stopped", start: true, stop: false, sw: false },
  disconnected: { words: "disconnected", start: false, stop: false, sw: false },
  error: { words: "error", start: true, stop: false, sw: false },
};

const player = {
  hello: null, ws: null, state: "connecting", playing: false, frozen: false, ended: false, generating: false,
  buffer: [],             // {chunk, frame, bitmap|null} in arrival order
  chunkFrames: new Map(), // chunk -> frames announced / received
  toAck: [],              // chunks fully received, not yet acknowledged
  jitterFrames: 6, started: false, startClick: 0, ttff: null, chunksTotal: null, chunksGenerated: 0,
  shown: { frame: -1, chunk: -1 }, drawTimes: [], decodeMs: [], bytes: 0, generation: [],
  switchChunk: null, switchPending: false, nextPrompt: null, prompt: null, nextDue: 0,
  image: null, // the chosen first frame, cropped and scaled, as base64 PNG
  pausedFrom: null, decoding: Promise.resolve(), imageLoading: Promise.resolve(),
};

function token() { return new URLSearchParams(location.hash.slice(1)).get("token"); }

function setState(name, detail) {
  player.state = name;
  const words = STATES[name].words;
  $("status").textContent = detail ? `${words.replace(/\.\.\.$/, "")}: ${detail}` : words;
  $("status").dataset.state = name;
  updateButtons();
  renderStats(); // the stats at a change of state are the stats of that moment, not of the last second's tick
}

function updateButtons() {
  const s = STATES[player.state], open = player.ws !== null && player.ws.readyState === WebSocket.OPEN;
  $("start").disabled = !(s.start && open && player.hello);
  $("stop").disabled = !(s.stop && open);
  $("switch-button").disabled = !(s.sw && open && player.generating && !player.switchPending);
  $("reconnect").hidden = player.state !== "disconnected";
}

function connect() {
  if (player.ws) { player.ws.onclose = null; player.ws.close(); }
  player.hello = null;
  showError("");
  setState("connecting");
  const url = new URL("ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (token()) url.searchParams.set("token", token());
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  ws.onmessage = (ev) => (typeof ev.data === "string" ? onMessage(JSON.parse(ev.data)) : onFrame(ev.data));
  ws.onclose = (ev) => onClose(ev, ws);
  player.ws = ws;
}

async function onClose(ev, ws) {
  if (ws !== player.ws) return;
  const hadHello = player.hello !== null;
  Object.assign(player, { playing: false, generating: false, buffer: [], toAck: [] });
  const why = `${ev.code}${ev.reason ? ": " + ev.reason : ""}`;
  setState("disconnected", `${why}; press Reconnect`);
  if (!hadHello) showError(await whyRefused());
}

async function whyRefused() {
  // A refused WebSocket handshake reads 1006 in every browser; the stats URL answers the same checks in HTTP.
  const url = new URL("stats", location.href);
  if (token()) url.searchParams.set("token", token());
  let answer;
  try { answer = await fetch(url, { cache: "no-store" }); } catch (e) { return "the server is not reachable"; }
  if (answer.status !== 401) return answer.ok ? "" : `the server refused the connection (HTTP ${answer.status})`;
  const here = `${location.origin}${location.pathname}#token=YOUR_TOKEN`;
  return token()
    ? "the token in the address (#token=...) is wrong: use the value of HELIOS_RT_TOKEN on the server"
    : `this server needs a token: open ${here} (the value of HELIOS_RT_TOKEN on the server)`;
}

function send(message) {
  if (player.ws && player.ws.readyState === WebSocket.OPEN) player.ws.send(JSON.stringify(message));
}
function showError(text) { $("error").textContent = text; }

function onMessage(m) {
  const handler = HANDLERS[m.type];
  if (handler) handler(m);
}

const HANDLERS = {
  hello(m) {
    player.hello = m;
    // the largest whole zoom that keeps the video within 640x360 CSS pixels (the stats stay in view)
    const fit = Math.floor(Math.min(640 / m.width, 360 / m.height));
    const zoom = Number(params.get("zoom")) || Math.max(1, fit);
    const canvas = $("screen");
    canvas.width = m.width; canvas.height = m.height;
    canvas.style.width = `${m.width * zoom}px`; canvas.style.height = `${m.height * zoom}px`;
    player.jitterFrames = Math.max(2, Math.round(m.fps / 4));
    setState("ready", `${m.width}x${m.height} at ${m.fps} fps, ${plural(m.frames_per_chunk, "frame")} per chunk`);
  },
  busy(m) {
    if (m.queue_full) { player.playing = false; setState("error", m.message); }
    else setState("queued", `number ${m.position} of ${m.waiting} waiting for a turn`);
  },
  started(m) {
    Object.assign(player, { generating: true, chunksTotal: m.chunks_total });
    setState("starting", `seed ${m.seed}, ${m.chunks_total ? plural(m.chunks_total, "chunk") : "endless"}`);
  },
  chunk(m) {
    player.chunkFrames.set(m.index, { expected: m.frames, received: 0 });
    player.chunksGenerated = m.index + 1;
    player.generation.push({ frames: m.frames, seconds: m.generate_s, transformer: m.transformer_s,
      decode: m.decode_s });
    if (player.generation.length > 4) player.generation.shift();
  },
  prompt(m) {
    Object.assign(player, { switchChunk: m.chunk, switchPending: false, nextPrompt: m.prompt });
    $("switch").textContent = `switch at chunk ${m.chunk} (waiting)`;
    showPrompt();
    updateButtons();
  },
  paused() {},
  resumed() {},
  end(m) {
    player.ended = true; player.generating = false;
    if (["playing", "stalled", "starting"].includes(player.state)) {
      setState(player.state, `all ${plural(m.chunks, "chunk")} generated, playing out the buffer`);
    }
    updateButtons();
  },
  stopped() {
    Object.assign(player, { playing: false, generating: false, buffer: [], toAck: [], switchPending: false });
    setState("stopped", `${plural(Math.max(player.shown.chunk + 1, 0), "chunk")} shown`);
  },
  error(m) {
    if (m.about === "prompt") { // a switch the server refused: the stream goes on
      player.switchPending = false;
      $("switch").textContent = `switch refused: ${m.message}`;
      updateButtons();
      return;
    }
    showError(m.message);
    if (m.fatal || ["starting", "queued"].includes(player.state)) { // a refused start, or a failed stream
      Object.assign(player, { playing: false, generating: false, buffer: [] });
      setState("error", m.message);
    }
  },
};

function onFrame(data) {
  const view = new DataView(data);
  const chunk = view.getUint32(4, true), frame = view.getUint32(8, true);
  const entry = { chunk, frame, bitmap: null };
  player.buffer.push(entry);
  player.bytes += data.byteLength;
  const blob = new Blob([data.slice(HEADER_BYTES)], { type: "image/jpeg" });
  // One decode at a time, each timed from its own start: the time is the decode, not a wait in a queue.
  player.decoding = player.decoding.then(async () => {
    const began = performance.now();
    try { entry.bitmap = await createImageBitmap(blob); } catch (e) { entry.bitmap = null; return; }
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
  if (!player.playing || player.frozen || player.state === "paused") return;
  const waiting = player.buffer.length === 0;
  if (waiting && player.ended) { finish(); return; }
  const ready = !waiting && player.buffer[0].bitmap;
  if (!player.started) { // fill the jitter buffer first (or play what there is once generation ended)
    if (!ready || (player.buffer.length < player.jitterFrames && !player.ended)) return;
    player.started = true; player.nextDue = now;
  }
  if (now < player.nextDue) return;
  if (!ready) {
    if (waiting) { // nothing to show when a frame is due: generation is behind playback
      player.started = false;
      if (player.state === "playing") setState("stalled", "generation is slower than playback");
    }
    return;
  }
  showFrame(player.buffer.shift(), now);
}

function showFrame(entry, now) {
  $("screen").getContext("2d").drawImage(entry.bitmap, 0, 0);
  entry.bitmap.close();
  player.shown = { frame: entry.frame, chunk: entry.chunk };
  player.nextDue = Math.max(player.nextDue + 1000 / player.hello.fps, now - 1000 / player.hello.fps);
  if (player.ttff === null) player.ttff = (now - player.startClick) / 1000;
  player.drawTimes.push(now);
  if (player.state !== "playing") setState("playing", playingDetail());
  if (player.switchChunk !== null && entry.chunk >= player.switchChunk) {
    $("switch").textContent = `switched at chunk ${player.switchChunk} (shown)`;
    Object.assign(player, { prompt: player.nextPrompt, switchChunk: null, switchShown: player.switchChunk });
    showPrompt();
  }
  $("frame").textContent = entry.frame; // the counter names the frame on the canvas at every draw
  $("chunk").textContent = entry.chunk;
  acknowledge();
}

function playingDetail() {
  if (player.ended) return `all ${plural(player.chunksGenerated, "chunk")} generated, playing out the buffer`;
  return player.chunksTotal ? `${plural(player.chunksTotal, "chunk")} in all` : "endless";
}

function finish() {
  player.playing = false;
  setState("finished", `${plural(player.chunksGenerated, "chunk")} played`);
}

function showPrompt() {
  const now = player.prompt === null ? "" : `prompt: ${player.prompt}`;
  const next = player.switchChunk === null ? "" : `; from chunk ${player.switchChunk}: ${player.nextPrompt}`;
  $("current-prompt").textContent = now + next;
}

function renderStats() {
  // Once a second: fps counts the frames actually drawn in the last second (0 while the picture is stuck).
  const now = performance.now();
  while (player.drawTimes.length && player.drawTimes[0] < now - 1000) player.drawTimes.shift();
  const mean = (xs) => xs.reduce((a, b) => a + b, 0) / xs.length;
  const gen = player.generation, fps = player.hello ? player.hello.fps : 24;
  $("ttff").textContent = player.ttff === null ? "-" : `${player.ttff.toFixed(2)} s`;
  $("fps").textContent = player.shown.frame < 0 ? "-" : player.drawTimes.length;
  $("buffer").textContent = player.buffer.length;
  $("decode").textContent = player.decodeMs.length ? mean(player.decodeMs).toFixed(2) : "-";
  $("kbytes").textContent = (player.bytes / 1024).toFixed(0);
  if (!gen.length) { $("gen").textContent = $("rtf").textContent = "-"; $("gen-parts").textContent = ""; return; }
  const seconds = gen.reduce((a, g) => a + g.seconds, 0), frames = gen.reduce((a, g) => a + g.frames, 0);
  $("gen").textContent = (seconds / gen.length).toFixed(2);
  $("gen-parts").textContent = `(transformer ${mean(gen.map((g) => g.transformer)).toFixed(2)}, ` +
    `decode ${mean(gen.map((g) => g.decode)).toFixed(2)})`;
  // video seconds generated per wall second of the engine: 1 or more keeps up with playback
  $("rtf").textContent = `${(frames / fps / seconds).toFixed(2)}x`;
}

function resetStats() {
  Object.assign(player, { buffer: [], toAck: [], chunkFrames: new Map(), started: false, ended: false,
    ttff: null, startClick: performance.now(), switchChunk: null, switchPending: false, bytes: 0,
    shown: { frame: -1, chunk: -1 }, drawTimes: [], decodeMs: [], generation: [], chunksGenerated: 0 });
  const canvas = $("screen");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  $("frame").textContent = $("chunk").textContent = "-";
  $("switch").textContent = "";
  renderStats();
}

async function imageAsBase64(file) {
  // Crop to the video's aspect ratio and scale to its size, as the server requires; null if not an image.
  let bitmap;
  try { bitmap = await createImageBitmap(file); } catch (e) { return null; }
  const { width, height } = player.hello;
  const canvas = document.createElement("canvas");
  canvas.width = width; canvas.height = height;
  const scale = Math.max(width / bitmap.width, height / bitmap.height);
  const w = bitmap.width * scale, h = bitmap.height * scale;
  canvas.getContext("2d").drawImage(bitmap, (width - w) / 2, (height - h) / 2, w, h);
  bitmap.close();
  return canvas.toDataURL("image/png").split(",")[1];
}

$("image").onchange = () => { player.imageLoading = chooseImage(); };

async function chooseImage() {
  const file = $("image").files[0];
  player.image = null;
  $("preview").hidden = true;
  if (!file) return;
  const image = player.hello ? await imageAsBase64(file) : null;
  if (image === null) {
    $("image").value = "";
    showError(`${file.name} is not an image this browser can read; pick a PNG or JPEG file`);
    return;
  }
  showError("");
  player.image = image;
  $("preview").src = `data:image/png;base64,${image}`;
  $("preview").hidden = false;
}

$("start").onclick = async () => {
  if ($("start").disabled) return;
  $("start").disabled = true;
  await player.imageLoading; // a file chosen just before Start is read first
  showError("");
  resetStats();
  const message = { type: "start", prompt: $("prompt").value, seed: Number($("seed").value) || 0 };
  if ($("frames").value) message.num_frames = Number($("frames").value);
  if (player.image) message.image = player.image;
  Object.assign(player, { playing: true, generating: false, chunksTotal: null, prompt: message.prompt });
  showPrompt();
  setState("starting");
  send(message);
};
$("stop").onclick = () => send({ type: "stop" });
$("switch-button").onclick = () => {
  const prompt = $("next-prompt").value;
  if ($("switch-button").disabled || !prompt.trim()) return;
  player.switchPending = true;
  $("switch").textContent = "switch sent (waiting for the server)";
  updateButtons();
  send({ type: "prompt", prompt });
};
$("reconnect").onclick = connect;
const onEnter = (button) => (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $(button).click(); }
};
$("prompt").onkeydown = onEnter("start");
$("next-prompt").onkeydown = onEnter("switch-button");
window.onhashchange = connect; // a token typed into the address (#token=...) is used at once

// A hidden tab pauses its stream on the server rather than acknowledging frames nobody sees (the GPU
// would make video to be thrown away) or going silent (the server ends a stream that acknowledges
// nothing for ack_timeout_s). The stream resumes where it was when the tab is shown again.
document.addEventListener("visibilitychange", () => {
  if (document.hidden && ["starting", "playing", "stalled"].includes(player.state)) {
    player.pausedFrom = player.state;
    if (player.generating) send({ type: "pause" });
    setState("paused", "the tab is hidden; the stream waits on the server and resumes when you come back");
  } else if (!document.hidden && player.state === "paused") {
    if (player.generating) send({ type: "resume" });
    player.started = false; // refill the jitter buffer before drawing again
    const back = player.pausedFrom === "starting" && player.shown.frame < 0 ? "starting" : "playing";
    setState(back, back === "playing" ? playingDetail() : "");
  }
});

// Hooks for tests and embedding pages: stop drawing (the canvas keeps the frame shown) and resume.
window.helios = {
  player,
  freeze() { player.frozen = true; return { ...player.shown }; },
  resume() { player.frozen = false; },
};

connect();
setInterval(renderStats, 1000);
requestAnimationFrame(draw);
