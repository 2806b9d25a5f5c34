// The musicsteer control surface: draws its controls from the parameter table the
// engine sends on connect ({"hello": ...}), sends every change as {"set": PATH, "value": V},
// and shows the frames it receives (meters, stats, level, spectrum, values) up to 50 times
// a second. The protocol is in docs/web.md.
"use strict";

const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.search).get("token");
const controls = new Map();   // path -> {input, show, held}
const meters = new Map();     // concept -> fill element
let ws = null, frames = 0, spectrumX = 0;

function send(msg) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(msg));
}

function connect() {
  const url = `ws://${location.host}/ws` + (token ? `?token=${encodeURIComponent(token)}` : "");
  ws = new WebSocket(url);
  ws.onopen = () => { $("status").textContent = "connected"; $("status").className = "status live"; };
  ws.onclose = () => {
    $("status").textContent = "disconnected, retrying…"; $("status").className = "status";
    setTimeout(connect, 1000);
  };
  ws.onmessage = (ev) => {
    let msg;
    try { msg = JSON.parse(ev.data); } catch (e) { return; }
    if (msg.hello) build(msg.hello);
    else if (msg.error) showError(msg.error);
    else if (msg.stored) { showScenes(msg.scenes); }
    else if (msg.meters || msg.stats) frame(msg);
  };
}

function showError(text) {
  $("error").textContent = text;
  clearTimeout(showError.timer);
  showError.timer = setTimeout(() => { $("error").textContent = ""; }, 4000);
}

function panelFor(p) {
  if (p.path.startsWith("concept/")) return "concept-controls";
  if (p.target === "sampling") return "sampling-controls";
  if (p.target === "prompt" || p.path.startsWith("prompt")) return "prompt-controls";
  $("other-panel").hidden = false;
  return "other-controls";
}

function fmt(v, type) { return type === "int" ? String(Math.round(v)) : Number(v).toFixed(3); }

function numberControl(p, value) {
  const box = document.createElement("div");
  box.className = "control";
  const label = document.createElement("label");
  const name = document.createElement("span");
  name.textContent = p.path.startsWith("concept/") ? p.path.split("/")[1] : p.path;
  const show = document.createElement("span");
  show.className = "value";
  label.append(name, show);
  const input = document.createElement("input");
  input.type = "range";
  input.min = p.knob[0]; input.max = p.knob[1];
  input.step = p.type === "int" ? 1 : (p.knob[1] - p.knob[0]) / 1000;
  input.dataset.path = p.path;
  input.setAttribute("aria-label", p.path);
  const c = { input, show, held: false, type: p.type, limits: p.limits };
  input.addEventListener("pointerdown", () => { c.held = true; });
  window.addEventListener("pointerup", () => { c.held = false; });
  input.addEventListener("input", () => {
    show.textContent = fmt(input.value, p.type);
    send({ set: p.path, value: p.type === "int" ? parseInt(input.value, 10) : parseFloat(input.value) });
  });
  box.append(label, input);
  const concept = p.path.match(/^concept\/(.+)\/strength$/);
  if (concept) {
    const meter = document.createElement("div");
    meter.className = "meter"; meter.dataset.concept = concept[1];
    const fill = document.createElement("div");
    fill.className = "fill";
    meter.append(fill);
    box.append(meter);
    meters.set(concept[1], fill);
  }
  controls.set(p.path, c);
  setValue(p.path, value);
  return box;
}

function textControl(p, value) {
  const box = document.createElement("div");
  box.className = "row";
  const input = document.createElement("input");
  input.placeholder = p.example || p.path;
  input.dataset.path = p.path;
  input.setAttribute("aria-label", p.path);
  if (!p.event && typeof value === "string") input.value = value;
  const button = document.createElement("button");
  button.textContent = p.event ? "Start " + p.path.split("/").slice(-2).join(" ") : "Send";
  const go = () => {
    const text = input.value.trim();
    if (!text) return;
    const n = p.path === "prompt" ? 1 : (p.path.match(/^prompt\/(\d+)$/) || [])[1];  // the table's slots count from 1
    send(n !== undefined ? { prompt: Number(n) - 1, text } : { set: p.path, value: text });
  };
  button.addEventListener("click", go);
  input.addEventListener("keydown", (e) => { if (e.key === "Enter") go(); });
  box.append(input, button);
  if (!p.event) controls.set(p.path, { input, text: true, held: false });
  return box;
}

function build(hello) {
  for (const id of ["prompt-controls", "concept-controls", "sampling-controls", "other-controls"]) $(id).replaceChildren();
  controls.clear(); meters.clear();
  for (const p of hello.params) {
    const el = p.type === "str" ? textControl(p, hello.values[p.path]) : numberControl(p, hello.values[p.path]);
    $(panelFor(p)).append(el);
  }
  if (!hello.concepts.length) $("concept-controls").textContent = "no concept pack loaded";
  showScenes(hello.scenes);
}

function setValue(path, value) {
  const c = controls.get(path);
  if (!c || value === undefined || c.held || document.activeElement === c.input) return;
  if (c.text) { c.input.value = value; return; }
  if (value > Number(c.input.max) && value <= c.limits[1]) c.input.max = value;  // set past the knob's range
  if (value < Number(c.input.min) && value >= c.limits[0]) c.input.min = value;
  c.input.value = value;
  c.show.textContent = fmt(value, c.type);
}

function showScenes(names) {
  const list = $("scene-list");
  list.replaceChildren();
  for (const name of names) {
    const b = document.createElement("button");
    b.textContent = name; b.dataset.scene = name;
    b.addEventListener("click", () => send({ scene: "recall", name, seconds: parseFloat($("scene-seconds").value) || 0 }));
    list.append(b);
  }
}

function frame(msg) {
  frames += 1;
  $("frames").textContent = String(frames);
  const st = msg.stats || {};
  if (st.step_ms !== undefined) {
    $("step-ms").textContent = st.step_ms.toFixed(1);
    $("step-max").textContent = st.step_ms_max.toFixed(1);
    $("buffer").textContent = Math.round(100 * st.buffer) + "%";
    $("underruns").textContent = st.underruns;
    $("rtf").textContent = st.rtf.toFixed(2);
    $("audio-s").textContent = st.audio_s.toFixed(1);
  }
  for (const [name, v] of Object.entries(msg.meters || {})) {
    const fill = meters.get(name);
    if (!fill) continue;
    const w = Math.min(50, Math.abs(v) * 25);  // a readout of 2 fills half the bar
    fill.style.left = v >= 0 ? "50%" : (50 - w) + "%";
    fill.style.width = w + "%";
    fill.dataset.value = v;
  }
  if (msg.values) for (const [path, v] of Object.entries(msg.values)) setValue(path, v);
  if (msg.scenes) showScenes(msg.scenes);
  if (msg.level) {
    const db = Math.max(-60, msg.level.db);
    $("level-bar").style.height = ((db + 60) / 60 * 100) + "%";
  }
  if (msg.spectrum) drawSpectrum(msg.spectrum);
}

function drawSpectrum(bands) {
  const canvas = $("spectrum"), g = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, n = bands.length;
  if (spectrumX >= w) {  // scroll left by one column
    g.drawImage(canvas, 1, 0, w - 1, h, 0, 0, w - 1, h);
    spectrumX = w - 1;
  }
  for (let i = 0; i < n; i++) {
    const t = Math.max(0, Math.min(1, (bands[i] + 90) / 80));  // -90..-10 dB
    g.fillStyle = `rgb(${Math.round(255 * t)}, ${Math.round(180 * t * t)}, ${Math.round(80 + 120 * (1 - t))})`;
    const y0 = h - Math.round((i + 1) * h / n), y1 = h - Math.round(i * h / n);
    g.fillRect(spectrumX, y0, 1, y1 - y0);
  }
  spectrumX += 1;
}

$("panic").addEventListener("click", () => send({ panic: true }));
$("scene-store").addEventListener("click", () => {
  const name = $("scene-name").value.trim();
  if (name) send({ scene: "store", name });
});
connect();
