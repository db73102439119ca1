// ggsteer chat page: sliders for the server's vectors, a conversation that streams from
// /v1/chat/completions with the "steering" field, and a switch that makes the sliders the
// server-wide default (/v1/steering) for every client. Plain JS, no build step.
"use strict";

const SLIDER_MIN = -2;
const SLIDER_MAX = 2;
const SLIDER_STEP = 0.05;

// serverDefault: the server-wide steering as GET /v1/steering reports it; pushing: the last change sent;
// locked: default entries a slider cannot show (an op, layers, ...), kept as they are in every change
const state = { history: [], strengths: {}, busy: false, serverDefault: {}, locked: {}, pushing: Promise.resolve() };
const $ = (id) => document.getElementById(id);

function authHeaders() {
  const key = $("api-key").value.trim();
  const headers = { "Content-Type": "application/json" };
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

function setStatus(text) {
  $("status").textContent = text;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : JSON.stringify(body);
  } catch (_) {
    return `HTTP ${response.status}`;
  }
}

// -- sliders -----------------------------------------------------------------------------

async function loadVectors() {
  const box = $("sliders");
  const response = await fetch("/v1/vectors", { headers: authHeaders() });
  if (!response.ok) {
    box.innerHTML = "";
    box.append(hint(`could not list vectors: ${await errorText(response)}`));
    return;
  }
  const vectors = (await response.json()).data;
  box.innerHTML = "";
  if (!vectors.length) box.append(hint("the server has no vectors"));
  for (const vector of vectors) box.append(buildSlider(vector));
}

function hint(text) {
  const p = document.createElement("p");
  p.className = "hint";
  p.textContent = text;
  return p;
}

function buildSlider(vector) {
  const name = vector.id;
  if (!(name in state.strengths)) state.strengths[name] = 0;
  const wrap = document.createElement("div");
  wrap.className = "slider";
  wrap.innerHTML = `
    <div class="slider-head"><span class="name"></span><span class="value"></span></div>
    <div class="track"><input type="range"><span class="recommended" hidden>▲</span></div>
    <div class="meta"></div>`;
  wrap.querySelector(".name").textContent = name;
  const input = wrap.querySelector("input");
  Object.assign(input, { id: `strength-${name}`, min: SLIDER_MIN, max: SLIDER_MAX, step: SLIDER_STEP });
  input.value = state.strengths[name];
  input.setAttribute("aria-label", `${name} strength`);
  input.dataset.vector = name;
  const value = wrap.querySelector(".value");
  const show = () => {
    const strength = Number(input.value);
    state.strengths[name] = strength;
    value.textContent = (strength > 0 ? "+" : "") + strength.toFixed(2);
    value.classList.toggle("active", strength !== 0);
  };
  input.addEventListener("input", () => {
    show();
    showNextSteering();
  });
  input.addEventListener("change", pushDefault);
  show();
  markRecommended(wrap, vector.recommended_strength);
  const unit = vector.unit === "raw" ? "raw coefficient" : "gap units";
  const layers = vector.recommended_layers || vector.layers;
  wrap.querySelector(".meta").textContent =
    `${vector.method || "?"}, layers ${layers[0]}–${layers[layers.length - 1]}, ${unit}` +
    (vector.recommended_strength != null ? `, recommended ${vector.recommended_strength}` : "");
  return wrap;
}

function markRecommended(wrap, recommended) {
  if (recommended == null || recommended < SLIDER_MIN || recommended > SLIDER_MAX) return;
  const mark = wrap.querySelector(".recommended");
  // approximate: the thumb's travel is slightly narrower than the track
  mark.style.left = `${((recommended - SLIDER_MIN) / (SLIDER_MAX - SLIDER_MIN)) * 100}%`;
  mark.title = `recommended ${recommended}`;
  mark.hidden = false;
}

function activeSteering() {
  const steering = {};
  for (const [name, strength] of Object.entries(state.strengths)) {
    if (strength !== 0 && !(name in state.locked)) steering[name] = strength;
  }
  return steering;
}

// What the page sends as the default: its sliders plus the entries it cannot show, unchanged.
function defaultToSend() {
  return { ...state.locked, ...activeSteering() };
}

// A plain strength (a number, or {"strength": s} with op "add") is a slider's; anything else is not.
function sliderStrength(setting) {
  if (typeof setting === "number") return setting;
  if (setting === null || typeof setting !== "object") return null;
  const keys = Object.keys(setting).filter((key) => !(key === "op" && setting.op === "add"));
  if (keys.length === 1 && keys[0] === "strength" && typeof setting.strength === "number") return setting.strength;
  return null;
}

function lockSlider(name, setting) {
  const input = $(`strength-${name}`);
  if (!input) return;
  input.disabled = true;
  const wrap = input.closest(".slider");
  wrap.classList.add("locked");
  wrap.querySelector(".value").textContent = "server default";
  const note = wrap.querySelector(".locked-note") || wrap.appendChild(document.createElement("div"));
  note.className = "locked-note";
  note.textContent = `server default: ${describeSetting(setting)} (set through the API; this page keeps it as it is)`;
}

// -- the server-wide default -------------------------------------------------------------

function isDefaultOn() {
  return $("make-default").checked;
}

async function steeringRequest(method, body) {
  const options = { method, headers: authHeaders() };
  if (body !== undefined) options.body = JSON.stringify(body);
  const response = await fetch("/v1/steering", options);
  if (!response.ok) throw new Error(await errorText(response));
  state.serverDefault = (await response.json()).steering;
  showNextSteering();
}

// On load (and after "Reload vectors"): the server's default shows on the sliders, with the switch
// on; entries a slider cannot show lock their slider and are kept in every change the page sends.
async function loadDefault() {
  try {
    await steeringRequest("GET");
  } catch (error) {
    setStatus(`could not read the default steering: ${error.message}`);
    return;
  }
  state.locked = {};
  const editable = {};
  for (const [name, setting] of Object.entries(state.serverDefault)) {
    const strength = sliderStrength(setting);
    if (strength === null) state.locked[name] = setting;
    else editable[name] = strength;
  }
  $("make-default").checked = Object.keys(editable).length > 0;
  if ($("make-default").checked) {
    for (const input of document.querySelectorAll("#sliders input[type=range]")) {
      input.value = editable[input.dataset.vector] || 0;
      input.dispatchEvent(new Event("input"));
    }
  }
  for (const [name, setting] of Object.entries(state.locked)) lockSlider(name, setting);
  showNextSteering();
}

function pushDefault() {
  if (!isDefaultOn()) return state.pushing;
  const steering = defaultToSend();
  state.pushing = state.pushing
    .then(() => steeringRequest("POST", { steering }))
    .catch((error) => setStatus(`could not set the default: ${error.message}`));
  return state.pushing;
}

// Off takes the sliders out of the default; entries the page cannot show stay.
function toggleDefault() {
  const locked = Object.keys(state.locked).length > 0;
  state.pushing = state.pushing
    .then(() => (isDefaultOn() || locked ? steeringRequest("POST", { steering: isDefaultOn() ? defaultToSend() : state.locked })
      : steeringRequest("DELETE")))
    .catch((error) => setStatus(`could not change the default: ${error.message}`));
}

function signed(value) {
  return `${value > 0 ? "+" : ""}${value.toFixed(2)}`;
}

// One default entry in words: "+0.50", or "ablate, layers 3-14, strength 1".
function describeSetting(setting) {
  if (typeof setting === "number") return signed(setting);
  const parts = [setting.op || "add"];
  if (setting.strength != null) parts.push(`strength ${setting.strength}`);
  if (setting.layers != null) parts.push(`layers ${Array.isArray(setting.layers) ? setting.layers.join(",") : setting.layers}`);
  for (const key of Object.keys(setting)) {
    if (!["op", "strength", "layers"].includes(key)) parts.push(`${key} ${JSON.stringify(setting[key])}`);
  }
  return parts.join(", ");
}

function describeDefault(steering) {
  const parts = Object.entries(steering).map(([name, setting]) => `${name} ${describeSetting(setting)}`);
  return parts.join("; ");
}

// What the next message will be steered with, and by whom.
function showNextSteering() {
  const line = $("next-steering");
  const locked = describeDefault(state.locked);
  if (isDefaultOn()) {
    const text = describeDefault(defaultToSend());
    line.textContent = `next message: ${text || "no steering"} (default for every client)`;
  } else {
    const text = describeDefault(activeSteering());
    const others = describeDefault(state.serverDefault);
    line.textContent = `next message: ${text || "no steering"} (this page only)` +
      (others ? `; server default for other clients: ${others}` : "");
  }
  $("locked-default").textContent = locked ? `kept in the server default (not editable here): ${locked}` : "";
}

function describeSteering(steering) {
  const parts = Object.entries(steering).map(([n, s]) => `${n} ${s > 0 ? "+" : ""}${s.toFixed(2)}`);
  return parts.length ? `steering: ${parts.join(", ")}` : "steering: off";
}

// -- conversation ------------------------------------------------------------------------

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.append(body);
  $("conversation").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function send(text) {
  const steering = activeSteering();
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  const note = document.createElement("span");
  note.className = "steering";
  note.textContent = describeSteering(steering) + (isDefaultOn() ? " (server default)" : "");
  reply.append(note);
  await state.pushing; // a default just changed applies to this message
  const request = {
    messages: state.history,
    stream: true,
    max_tokens: Number($("max-tokens").value) || 128,
    temperature: Number($("temperature").value),
  };
  // with the switch on the page relies on the server-wide default, as any chat app would
  if (!isDefaultOn()) request.steering = steering;
  setStatus("generating…");
  try {
    const content = await streamChat(request, reply.querySelector(".text"));
    state.history.push({ role: "assistant", content });
    setStatus("");
  } catch (error) {
    state.history.pop(); // the failed turn is not part of the conversation
    reply.classList.add("error");
    reply.querySelector(".text").textContent = String(error.message || error);
    setStatus("");
  }
  reply.dataset.done = "true";
}

// Reads the SSE stream ("data: {...}\n\n" ... "data: [DONE]") into `target`; returns the full reply.
async function streamChat(request, target) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: authHeaders(), body: JSON.stringify(request),
  });
  if (!response.ok) throw new Error(await errorText(response));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  let content = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffered.indexOf("\n\n")) >= 0) {
      const event = buffered.slice(0, end);
      buffered = buffered.slice(end + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") return content;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      content += chunk.choices[0].delta.content || "";
      target.textContent = content;
    }
  }
  return content;
}

// -- wiring ------------------------------------------------------------------------------

$("composer").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("message").value.trim();
  if (!text || state.busy) return;
  $("message").value = "";
  state.busy = true;
  $("send").disabled = true;
  try {
    await send(text);
  } finally {
    state.busy = false;
    $("send").disabled = false;
  }
});

$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

$("reset-steering").addEventListener("click", () => {
  for (const input of document.querySelectorAll("#sliders input[type=range]:not(:disabled)")) {
    input.value = 0;
    input.dispatchEvent(new Event("input"));
  }
  pushDefault();
});

$("new-chat").addEventListener("click", () => {
  state.history = [];
  $("conversation").innerHTML = "";
});

$("make-default").addEventListener("change", toggleDefault);
// after an API key is typed, the vectors and the default are read again with it (one reload at a time)
function reloadAll() {
  state.reloading = (state.reloading || Promise.resolve())
    .then(() => state.pushing)
    .then(loadVectors)
    .then(loadDefault);
  return state.reloading;
}

$("reload-vectors").addEventListener("click", reloadAll);
$("api-key").addEventListener("change", reloadAll);
loadVectors().then(loadDefault);
