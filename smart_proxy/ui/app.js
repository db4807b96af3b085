// smart-proxy's dashboard: the models and their state, live, from GET events (SSE), a log
// view per model, load / unload / pull buttons and a chat playground that streams.
//
// Every URL here is relative to the proxy's root, which is the page's parent ("../" from
// ".../ui/"), so the page works at any sub-path a reverse proxy serves it under. The
// streams are read with fetch() rather than EventSource, which cannot send the API key.
// A call answered 401 asks for the key, keeps it (sessionStorage, or localStorage when
// "remember" is ticked) and is tried again.
"use strict";

const ROOT = new URL("../", location.href);
const KEY_NAME = "smart-proxy-api-key";
const ACTIVITY_ROWS = 50;
const LOG_LINES = 1000;

const state = {
  phase: null,
  pool: null,
  models: new Map(), // name -> the snapshot's entry, kept current by the events
  memory: new Map(), // name -> /v1/models' memory estimate (bytes)
  role: "node", // "router": no pool of its own, every model is a peer's
  peers: [], // the [peer:NAME] servers as /health reports them
};

// ---- small helpers --------------------------------------------------------------------------

function api(path) {
  return new URL(path, ROOT).toString();
}

function $(id) {
  return document.getElementById(id);
}

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props || {})) {
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function bytes(size) {
  if (size === null || size === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (size >= 1024 && i < units.length - 1) {
    size /= 1024;
    i += 1;
  }
  return i === 0 ? `${size} B` : `${size.toFixed(1)} ${units[i]}`;
}

function clock(seconds) {
  return new Date(seconds * 1000).toLocaleTimeString();
}

function number(value, digits) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// ---- the API key ----------------------------------------------------------------------------

function getKey() {
  return sessionStorage.getItem(KEY_NAME) || localStorage.getItem(KEY_NAME) || "";
}

function setKey(key, remember) {
  sessionStorage.removeItem(KEY_NAME);
  localStorage.removeItem(KEY_NAME);
  if (key) (remember ? localStorage : sessionStorage).setItem(KEY_NAME, key);
}

let keyWaiters = [];

function askKey(message) {
  $("key-message").textContent = message;
  $("key-input").value = "";
  const dialog = $("key-dialog");
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
  return new Promise((resolve) => keyWaiters.push(resolve));
}

function keyEntered() {
  setKey($("key-input").value.trim(), $("key-remember").checked);
  const waiting = keyWaiters;
  keyWaiters = [];
  for (const resolve of waiting) resolve();
}

// fetch() with the key; a 401 asks for one and tries again.
async function call(path, options = {}) {
  for (;;) {
    const headers = new Headers(options.headers || {});
    const key = getKey();
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const response = await fetch(api(path), { ...options, headers });
    if (response.status !== 401) return response;
    await response.body?.cancel();
    await askKey(key ? "That key was refused: enter another." : "This proxy needs an API key.");
  }
}

async function errorText(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    const error = body.error;
    return (typeof error === "string" ? error : error?.message) || text;
  } catch {
    return text || `HTTP ${response.status}`;
  }
}

// ---- reading streams --------------------------------------------------------------------------

// Calls onEvent(kind, data) for each SSE message and onComment(text) for each comment line.
async function readSSE(response, onEvent, onComment) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let kind = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) onComment?.(line.slice(1).trim());
        else if (line.startsWith("event:")) kind = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(kind, data.join("\n"));
    }
  }
}

// Calls onObject(object) for each line of an NDJSON answer.
async function readNDJSON(response, onObject) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (value) buffer += value;
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 1);
      if (line) onObject(JSON.parse(line));
    }
    if (done) {
      if (buffer.trim()) onObject(JSON.parse(buffer));
      return;
    }
  }
}

// ---- the live state -----------------------------------------------------------------------------

function applySnapshot(snapshot) {
  state.phase = snapshot.phase;
  state.pool = snapshot.pool;
  state.models = new Map(snapshot.models.map((model) => [model.model, model]));
  state.role = snapshot.role || "node";
  state.peers = snapshot.peers || [];
  render();
  refreshMemory();
}

function setStatus(name, status, extra = {}) {
  const model = state.models.get(name);
  if (!model) return;
  Object.assign(model, { status }, extra);
  if (status !== "downloading") delete model.download;
  if (status !== "loading") delete model.loading_since;
  if (status !== "failed") delete model.error;
}

function onEvent(kind, text) {
  const data = JSON.parse(text);
  switch (kind) {
    case "snapshot":
      applySnapshot(data);
      return;
    case "download":
      if (data.state === "failed") setStatus(data.model, "failed", { error: data.error });
      else if (data.state === "done") setStatus(data.model, "unloaded");
      else setStatus(data.model, "downloading", { download: data });
      refreshSoon();
      break;
    case "loading":
      setStatus(data.model, "loading", { loading_since: data.time });
      break;
    case "loaded":
      setStatus(data.model, "loaded");
      refreshSoon();
      break;
    case "failed":
    case "crashed":
      setStatus(data.model, "failed", { error: data.error });
      refreshSoon();
      break;
    case "stopping":
      refreshSoon();
      break;
    case "stopped":
      refreshSoon();
      break;
    case "queue":
      for (const model of state.models.values()) model.queued = data.depths[model.model] || 0;
      refreshSoon();
      break;
    case "request":
      addActivity(data);
      refreshSoon();
      break;
    case "peer":
      refreshSoon(0);
      break;
    default:
      return;
  }
  render();
}

// A fresh snapshot (servers, slots in use, memory) shortly after a change: the first event
// of a new events stream, which is then closed. At most one is pending, so a busy proxy's
// stream of request events asks for a few a second, and never starves them.
let refreshTimer = null;

function refreshSoon(delay = 300) {
  if (refreshTimer !== null) return;
  refreshTimer = setTimeout(() => {
    refreshTimer = null;
    refreshSnapshot();
  }, delay);
}

async function refreshSnapshot() {
  const abort = new AbortController();
  try {
    const response = await call("events", { signal: abort.signal });
    if (!response.ok) return;
    await readSSE(response, (kind, text) => {
      if (kind === "snapshot") {
        applySnapshot(JSON.parse(text));
        abort.abort();
      }
    });
  } catch {
    // aborted once read, or the proxy went away: the main stream reconnects
  }
}

async function refreshMemory() {
  try {
    const response = await call("v1/models");
    if (!response.ok) return;
    const body = await response.json();
    for (const entry of body.data) state.memory.set(entry.id, entry.memory);
    render();
  } catch {
    // shown again at the next snapshot
  }
}

async function watchEvents() {
  for (;;) {
    try {
      const response = await call("events");
      if (!response.ok) throw new Error(await errorText(response));
      $("connection").textContent = "live";
      $("connection").className = "ok";
      await readSSE(response, onEvent);
      $("connection").textContent = "stream ended; reconnecting";
    } catch (error) {
      $("connection").textContent = `disconnected (${error.message}); reconnecting`;
    }
    $("connection").className = "warn";
    await sleep(2000);
  }
}

// ---- drawing --------------------------------------------------------------------------------

function progressCell(model) {
  if (model.status === "downloading" && model.download) {
    const percent = model.download.percent;
    const bar = el("progress", { max: "100", class: "download" });
    if (percent !== null && percent !== undefined) bar.value = percent;
    const label = percent === null || percent === undefined ? model.download.state : `${percent.toFixed(0)}%`;
    return el("td", { class: "progress" }, bar, " ", el("span", { class: "muted" }, label));
  }
  if (model.status === "loading") {
    const since = model.loading_since || Date.now() / 1000 - (model.loading_for || 0);
    const seconds = Math.max(0, Date.now() / 1000 - since);
    return el("td", { class: "progress" }, el("progress", { class: "loading" }), " ",
      el("span", { class: "muted" }, `loading ${seconds.toFixed(0)} s`));
  }
  if (model.status === "failed" && model.error) {
    return el("td", { class: "progress error", title: model.error }, model.error.split("\n")[0].slice(0, 120));
  }
  return el("td", { class: "progress" });
}

function slotsCell(model) {
  const servers = (model.servers || []).filter((server) => server.state !== "stopping");
  if (!servers.length) return "–";
  return servers.map((server) => `${server.in_flight}/${server.slots}`).join(", ");
}

function memoryCell(model) {
  const live = (model.servers || []).reduce((total, server) => total + (server.memory || 0), 0);
  if (live) return `${bytes(live)} in use`;
  const estimate = state.memory.get(model.model);
  return estimate ? `${bytes(estimate)} est.` : "–";
}

function modelRow(model) {
  const name = model.model;
  const local = model.backend === "llama";
  const button = (label, cls, handler, title) =>
    el("button", { type: "button", class: cls, title, onclick: () => handler(name) }, label);
  return el(
    "tr",
    { dataset: { model: name, status: model.status } },
    el("td", { class: "name" }, name, model.pinned ? el("span", { class: "muted" }, " pinned") : null),
    el("td", {}, el("span", { class: `status badge ${model.status}` }, model.status)),
    progressCell(model),
    el("td", { class: "memory" }, memoryCell(model)),
    el("td", { class: "slots" }, slotsCell(model)),
    el("td", { class: "queued" }, String(model.queued || 0)),
    el(
      "td",
      { class: "actions" },
      button("load", "load", loadModel, "start a llama-server for it"),
      button("unload", "unload", unloadModel, "stop its idle llama-servers"),
      button("pull", "pull", pullModel, "download its files"),
      local ? button("log", "log", showLog, "follow its llama-server output") : null,
    ),
  );
}

function render() {
  $("phase").textContent = state.phase || "…";
  $("phase").className = `badge ${state.phase || ""}`;
  if (state.pool) {
    const pool = state.pool;
    const budget = pool.memory_budget ? ` of ${bytes(pool.memory_budget)}` : "";
    $("pool-summary").textContent =
      `memory ${bytes(pool.memory_used)}${budget} · ${pool.capacity} server(s) at most · ${pool.queued} waiting`;
  }
  const body = $("models").tBodies[0];
  body.replaceChildren(...[...state.models.values()].map(modelRow));
  renderPeers();
  const select = $("chat-model");
  const chosen = select.value;
  const names = [...state.models.keys()];
  for (const peer of state.peers) {
    if (peer.status !== "ok") continue;
    for (const name of peer.models) if (!names.includes(name)) names.push(name);
  }
  if (names.join("\n") !== [...select.options].map((option) => option.value).join("\n")) {
    select.replaceChildren(...names.map((name) => el("option", { value: name }, name)));
    if (names.includes(chosen)) select.value = chosen;
  }
}

function renderPeers() {
  const section = $("peers-section");
  section.hidden = !state.peers.length;
  $("role").textContent = state.role === "router" ? "router: every model is a peer's" : "";
  $("peers").tBodies[0].replaceChildren(
    ...state.peers.map((peer) => {
      const models = peer.models.map((name) =>
        el("span", { class: peer.loaded.includes(name) ? "peer-model loaded" : "peer-model" }, name));
      const why = peer.status === "ok" ? "" : peer.error || "";
      return el(
        "tr",
        { dataset: { peer: peer.name, status: peer.status } },
        el("td", { class: "name", title: peer.url }, peer.name),
        el("td", {}, peer.kind),
        el("td", {}, el("span", { class: `status badge ${peer.status === "ok" ? "loaded" : "failed"}` }, peer.status)),
        el("td", { class: "error muted", title: why }, why.slice(0, 120)),
        el("td", { class: "peer-models" }, ...models),
        el("td", { class: "in-flight" }, String(peer.in_flight)),
        el("td", { class: "served" }, String(peer.served)),
      );
    }),
  );
}

// The loading seconds count up between events.
setInterval(() => {
  if ([...state.models.values()].some((model) => model.status === "loading")) render();
}, 1000);

function addActivity(request) {
  const tokens = `${request.prompt_tokens ?? "–"} / ${request.completion_tokens ?? "–"}`;
  const row = el(
    "tr",
    { class: request.status >= 400 ? "error" : "", dataset: { id: request.id || "" } },
    el("td", {}, clock(request.time)),
    el("td", {}, `${request.method} ${request.path}${request.streamed ? " (stream)" : ""}`),
    el("td", {}, request.model || "–"),
    el("td", {}, String(request.status)),
    el("td", {}, number(request.seconds, 2)),
    el("td", {}, number(request.ttft, 2)),
    el("td", {}, tokens),
    el("td", {}, number(request.tokens_per_second, 1)),
  );
  const body = $("activity").tBodies[0];
  body.prepend(row);
  while (body.rows.length > ACTIVITY_ROWS) body.deleteRow(-1);
}

// ---- actions: load, unload, pull --------------------------------------------------------------

function say(text, cls = "") {
  $("action-status").textContent = text;
  $("action-status").className = cls || "muted";
}

async function post(path, body, signal) {
  const headers = { "Content-Type": "application/json" };
  return call(path, { method: "POST", headers, body: JSON.stringify(body), signal });
}

async function loadModel(name) {
  say(`loading ${name}…`);
  try {
    const response = await post("api/generate", { model: name, stream: false });
    if (!response.ok) return say(`load ${name}: ${await errorText(response)}`, "error");
    await response.json();
    say(`${name} is loaded`, "ok");
  } catch (error) {
    say(`load ${name}: ${error.message}`, "error");
  }
}

async function unloadModel(name) {
  say(`unloading ${name}…`);
  try {
    const response = await post("api/generate", { model: name, keep_alive: 0, stream: false });
    if (!response.ok) return say(`unload ${name}: ${await errorText(response)}`, "error");
    await response.json();
    say(`${name}: unload asked (a busy or pinned server stays)`, "ok");
    refreshSoon();
  } catch (error) {
    say(`unload ${name}: ${error.message}`, "error");
  }
}

async function pullModel(name) {
  say(`pulling ${name}…`);
  try {
    const response = await post("api/pull", { model: name, stream: true });
    if (!response.ok) return say(`pull ${name}: ${await errorText(response)}`, "error");
    let last = null;
    await readNDJSON(response, (object) => {
      last = object;
      if (object.error) return;
      const percent = object.total ? ` ${((100 * (object.completed || 0)) / object.total).toFixed(0)}%` : "";
      say(`pull ${name}: ${object.status}${percent}`);
    });
    if (last?.error) say(`pull ${name}: ${last.error}`, "error");
    else say(`pull ${name}: ${last?.status || "done"}`, "ok");
  } catch (error) {
    say(`pull ${name}: ${error.message}`, "error");
  }
}

// ---- the log view -------------------------------------------------------------------------------

let logAbort = null;

async function showLog(name) {
  logAbort?.abort();
  const abort = new AbortController();
  logAbort = abort;
  const view = $("log");
  view.replaceChildren();
  view.dataset.model = name;
  $("log-model").textContent = name;
  try {
    const response = await call(`logs/${encodeURIComponent(name)}?follow=1`, { signal: abort.signal });
    if (!response.ok) {
      view.textContent = await errorText(response);
      return;
    }
    await readSSE(response, (kind, text) => {
      if (kind === "lost") {
        view.append(`… ${JSON.parse(text).count} lines lost …\n`);
        return;
      }
      if (kind !== "line") return;
      const line = JSON.parse(text);
      const atBottom = view.scrollTop + view.clientHeight >= view.scrollHeight - 4;
      view.append(el("span", { class: "line", title: clock(line.time) }, `${line.text}\n`));
      while (view.childNodes.length > LOG_LINES) view.firstChild.remove();
      if (atBottom) view.scrollTop = view.scrollHeight;
    });
  } catch (error) {
    if (!abort.signal.aborted) view.append(`\n[log stream ended: ${error.message}]\n`);
  }
}

// ---- the playground ------------------------------------------------------------------------------

let chat = [];
let chatAbort = null;

function chatBubble(role, text) {
  const node = el("div", { class: `message ${role}` }, el("span", { class: "role" }, role), el("span", { class: "text" }, text));
  $("chat-log").append(node);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return node;
}

async function sendChat(event) {
  event.preventDefault();
  const input = $("chat-input");
  const content = input.value.trim();
  const model = $("chat-model").value;
  if (!content || !model || chatAbort) return;
  input.value = "";
  chat.push({ role: "user", content });
  chatBubble("user", content);
  const answer = chatBubble("assistant", "");
  const text = answer.querySelector(".text");
  answer.dataset.streaming = "true";
  answer.dataset.chunks = "0";
  const status = $("chat-status");
  status.textContent = "waiting…";
  const abort = new AbortController();
  chatAbort = abort;
  $("chat-send").disabled = true;
  $("chat-stop").disabled = false;
  let reply = "";
  try {
    const body = { model, messages: chat, stream: true };
    const limit = Number($("chat-max-tokens").value);
    if (limit > 0) body.max_tokens = limit;
    const temperature = $("chat-temperature").value;
    if (temperature !== "") body.temperature = Number(temperature);
    setTimeout(() => refreshSoon(0), 1000); // its slot in use, once it has one
    const response = await post("v1/chat/completions", body, abort.signal);
    if (!response.ok) throw new Error(await errorText(response));
    await readSSE(
      response,
      (kind, data) => {
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || String(chunk.error));
        const piece = chunk.choices?.[0]?.delta?.content || "";
        if (!piece) return;
        reply += piece;
        text.textContent = reply;
        answer.dataset.chunks = String(Number(answer.dataset.chunks) + 1);
        status.textContent = "streaming…";
        $("chat-log").scrollTop = $("chat-log").scrollHeight;
      },
      (comment) => {
        if (comment && comment !== "heartbeat") status.textContent = comment;
      },
    );
    chat.push({ role: "assistant", content: reply });
    status.textContent = "";
  } catch (error) {
    if (abort.signal.aborted) status.textContent = "stopped";
    else {
      answer.classList.add("error");
      status.textContent = `error: ${error.message}`;
    }
    if (reply) chat.push({ role: "assistant", content: reply });
  } finally {
    answer.dataset.streaming = "false";
    chatAbort = null;
    $("chat-send").disabled = false;
    $("chat-stop").disabled = true;
  }
}

function bindPage() {
  // the dialog is a form of method "dialog"; its submit closes it
  $("key-form").addEventListener("submit", keyEntered);
  $("key-forget").addEventListener("click", () => {
    setKey("", false);
    $("key-dialog").close();
  });
  $("key-button").addEventListener("click", () => {
    askKey(getKey() ? "A key is set; enter another to replace it." : "Enter the proxy's API key.");
  });
  $("playground").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("playground").requestSubmit();
    }
  });
  $("chat-stop").addEventListener("click", () => chatAbort?.abort());
  $("chat-clear").addEventListener("click", () => {
    chat = [];
    $("chat-log").replaceChildren();
  });
}

bindPage();
watchEvents();
