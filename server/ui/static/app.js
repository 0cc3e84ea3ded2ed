// loraplex console: plain JS, no build step. Talks to the server's own HTTP API
// (/v1/*, /metrics) and the console's /ui/api/*; the API key (when the server needs one)
// is sent as "Authorization: Bearer" and kept in sessionStorage (this tab only).
"use strict";

const $ = (sel) => document.querySelector(sel);
const KEY_STORE = "loraplex.key";
const state = { key: sessionStorage.getItem(KEY_STORE) || "", session: null, adapters: [], liveTimer: null, trainTimer: null, mix: new Map() };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c.nodeType ? c : String(c));
  return node;
}

function headers(extra = {}) {
  const h = { ...extra };
  if (state.key) h["Authorization"] = "Bearer " + state.key;
  return h;
}

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function errorOf(resp) {
  try { const body = await resp.json(); return new HttpError(resp.status, (body.error && body.error.message) || resp.statusText); }
  catch (_) { return new HttpError(resp.status, resp.status + " " + resp.statusText); }
}

// fetch + JSON; a 401 opens the key dialog
async function api(path, options = {}) {
  const resp = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  if (resp.status === 401) { const err = await errorOf(resp); askKey(err.message); throw err; }
  if (!resp.ok) throw await errorOf(resp);
  return resp;
}
const getJSON = async (path) => (await api(path)).json();
const postJSON = async (path, body) => (await api(path, { method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" } })).json();

function banner(message) {
  const b = $("#banner");
  b.textContent = message || "";
  b.hidden = !message;
}

// numbers for people: 3 significant digits, small values in exponent form (eval loss 1.4e-4)
function fmt(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(Number(x))) return "–";
  const v = Number(x);
  if (v !== 0 && Math.abs(v) < 0.01) return v.toExponential(1);
  return String(Number(v.toPrecision(digits)));
}
const fmtScore = (x) => (x === null || x === undefined ? "–" : Number(x).toFixed(3));

// ------------------------------------------------------------------ key
function askKey(message) {
  const dialog = $("#key-dialog");
  $("#key-error").textContent = state.key ? message || "" : "";
  $("#key-input").value = "";
  if (!dialog.open) dialog.showModal();
}

$("#key-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  state.key = $("#key-input").value.trim();
  const resp = await fetch("/v1/models", { headers: headers() });
  if (resp.status === 401) {
    $("#key-error").textContent = (await errorOf(resp)).message;
    return;
  }
  sessionStorage.setItem(KEY_STORE, state.key);
  $("#key-dialog").close();
  await start();
});
$("#change-key").addEventListener("click", () => askKey(""));

// ------------------------------------------------------------------ tabs
function showTab(name) {
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === name);
  for (const s of document.querySelectorAll("section.tab")) s.hidden = s.id !== "tab-" + name;
  clearInterval(state.liveTimer);
  state.liveTimer = null;
  if (name === "live") { pollLive(); state.liveTimer = setInterval(pollLive, 1500); }
  if (name === "train") loadTrain();
}
for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => showTab(b.dataset.tab));

// ------------------------------------------------------------------ adapters
async function loadAdapters() {
  const body = await getJSON("/ui/api/adapters");
  state.adapters = body.data;
  renderAdapters();
  renderModelChips();
}

function scoreCell(m) {
  if (!m || !m.metric) return "–";
  if (m.base_score === null && m.adapter_score === null) return m.metric;
  return `${m.metric}: ${fmtScore(m.base_score)} → ${fmtScore(m.adapter_score)}`;
}

function renderAdapters() {
  const tbody = $("#adapter-table tbody");
  tbody.replaceChildren();
  const admin = state.session && state.session.admin;
  for (const a of state.adapters) {
    const m = a.manifest || {};
    const stateCell = el("td", {}, el("span", { class: "state " + a.state, text: a.state }), a.last_error ? el("div", { class: "reason", text: a.last_error }) : null);
    const actions = el("td", { class: "actions" });
    if (admin) {
      if (a.state === "resident") actions.append(el("button", { "data-action": "unload", onclick: () => adminAction("unload", a.name), text: "Unload" }));
      else actions.append(el("button", { "data-action": "load", onclick: () => adminAction("load", a.name), text: a.state === "failed" ? "Retry load" : "Load" }));
    }
    actions.append(el("button", { "data-action": "details", class: "link", onclick: () => showDetail(a.name), text: "details" }));
    tbody.append(el("tr", { "data-adapter": a.name },
      el("td", { class: "name", text: a.name }),
      stateCell,
      el("td", { text: a.rank ?? m.rank ?? "–" }),
      el("td", { class: "targets", text: (a.target_modules || m.target_modules || []).join(", ") || "–" }),
      el("td", { text: a.task || m.task || "–" }),
      el("td", { class: "score", text: scoreCell(m) }),
      el("td", { class: "served", text: a.requests_served }),
      el("td", { text: a.load_ms !== null && a.load_ms !== undefined ? a.load_ms + " ms" : "–" }),
      actions));
  }
  $("#adapter-count").textContent = `${state.adapters.length} adapter(s) in the store`;
}

async function adminAction(kind, name) {
  banner("");
  try {
    await postJSON(kind === "load" ? "/v1/load_lora_adapter" : "/v1/unload_lora_adapter", { lora_name: name });
  } catch (err) {
    banner(`${kind} ${name}: ${err.message}`);
  }
  await loadAdapters();
}

// an <img> cannot send the Authorization header: fetch the PNG as a blob
async function authorizedImage(path, alt) {
  const blob = await (await api(path)).blob();
  return el("img", { src: URL.createObjectURL(blob), alt, class: "loss-png" });
}

async function showDetail(name) {
  const a = state.adapters.find((x) => x.name === name) || { name };
  const box = $("#adapter-detail");
  box.hidden = false;
  $("#detail-title").textContent = name;
  const summary = $("#detail-summary"), loss = $("#detail-loss"), samples = $("#detail-samples");
  summary.replaceChildren(); loss.replaceChildren(); samples.replaceChildren();
  const m = a.manifest || {};
  const card = (label, value) => el("div", { class: "card" }, el("span", { text: label }), el("b", { text: value }));
  summary.append(card("state", a.state), card("method", m.method || "–"), card("rank / alpha", m.rank ? `${m.rank} / ${m.alpha}` : "–"), card("base → adapter", scoreCell(m)));
  if (!a.has_report) {
    samples.append(el("p", { class: "note", text: "No training_report.json in this adapter's folder." }));
  } else {
    try {
      const report = await getJSON(`/ui/api/adapters/${encodeURIComponent(name)}/report`);
      summary.append(card("train loss", fmt(report.train_loss)), card("eval loss (base)", `${fmt(report.eval_loss)} (${fmt(report.base_eval_loss)})`),
        card("steps", report.global_step ?? "–"), card("examples train / eval", `${report.train_examples ?? "–"} / ${report.eval_examples ?? "–"}`),
        card("training time", report.seconds ? `${Math.round(report.seconds)} s` : "–"));
      if (!a.has_loss_png) loss.append(lossChart(report.log_history || []));
      renderSamples(samples, report);
    } catch (err) { samples.append(el("p", { class: "error", text: err.message })); }
  }
  if (a.has_loss_png) {
    try { loss.append(await authorizedImage(`/ui/api/adapters/${encodeURIComponent(name)}/loss.png`, `loss curve of ${name}`)); }
    catch (err) { loss.append(el("p", { class: "error", text: err.message })); }
  } else if (!a.has_report) loss.append(el("p", { class: "note", text: "No loss curve." }));
  box.scrollIntoView({ behavior: "smooth", block: "start" });
}

function lastTurn(prompt) {
  // the chat-templated prompt: show the last user turn, not the system preamble
  const parts = String(prompt).split(/<\|im_start\|>user\n/);
  return parts[parts.length - 1].replace(/<\|im_end\|>[\s\S]*$/, "").trim();
}

function renderSamples(box, report) {
  const rows = report.eval_samples || [];
  if (!rows.length) { box.append(el("p", { class: "note", text: "No held-out predictions in the report (metric 'loss')." })); return; }
  const table = el("table", { class: "samples" }, el("thead", {}, el("tr", {}, el("th", { text: "prompt" }), el("th", { text: "reference" }), el("th", { text: "prediction" }))));
  const tbody = el("tbody");
  for (const s of rows) {
    const ok = String(s.prediction).trim() === String(s.reference).trim();
    tbody.append(el("tr", { class: ok ? "ok" : "miss" }, el("td", { text: lastTurn(s.prompt) }), el("td", { text: s.reference }), el("td", { text: s.prediction })));
  }
  table.append(tbody);
  box.append(el("p", { class: "note", text: `${rows.length} of ${report.eval_samples_total} held-out examples` }), table);
}

// ------------------------------------------------------------------ small SVG charts
const SVG = "http://www.w3.org/2000/svg";
function svgEl(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

// points [[x, y]] -> "x,y ..." in a w x h box; bounds default to the points' own (y from 0)
function polyline(points, w, h, pad = 4, bounds = null) {
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const b = bounds || { x0: Math.min(...xs), x1: Math.max(...xs), y0: Math.min(0, ...ys), y1: Math.max(...ys, 1e-9) };
  const sx = (x) => pad + ((x - b.x0) / (b.x1 - b.x0 || 1)) * (w - 2 * pad);
  const sy = (y) => h - pad - ((y - b.y0) / (b.y1 - b.y0 || 1)) * (h - 2 * pad);
  return points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
}

// the loss curve drawn from training_report.json's log_history (when the trainer wrote no PNG)
function lossChart(history) {
  const train = history.filter((r) => typeof r.loss === "number").map((r) => [r.step, r.loss]);
  const evals = history.filter((r) => typeof r.eval_loss === "number").map((r) => [r.step, r.eval_loss]);
  if (!train.length) return el("p", { class: "note", text: "No loss history in the report." });
  const all = train.concat(evals);
  const bounds = { x0: Math.min(...all.map((p) => p[0])), x1: Math.max(...all.map((p) => p[0])), y0: 0, y1: Math.max(...all.map((p) => p[1])) };
  const svg = svgEl("svg", { viewBox: "0 0 400 200", class: "loss-svg" });
  svg.append(svgEl("polyline", { points: polyline(train, 400, 200, 20, bounds), class: "train" }));
  if (evals.length) svg.append(svgEl("polyline", { points: polyline(evals, 400, 200, 20, bounds), class: "eval" }));
  const label = svgEl("text", { x: 20, y: 14, class: "axis" });
  label.textContent = `loss (0 to ${fmt(bounds.y1)}), steps ${bounds.x0} to ${bounds.x1}` + (evals.length ? "; dashed: eval" : "");
  svg.append(label);
  return svg;
}

function sparkline(svg, values) {
  svg.replaceChildren();
  if (values.length < 2) return;
  const pts = values.map((v, i) => [i, v]);
  svg.append(svgEl("polyline", { points: polyline(pts, 240, 60), class: "spark" }));
}

// ------------------------------------------------------------------ playground
function renderModelChips() {
  const box = $("#play-models");
  const checked = new Set([...box.querySelectorAll("input:checked")].map((i) => i.value));
  const fresh = box.children.length === 0;
  box.replaceChildren();
  const names = [];
  if (state.session && state.session.base_visible) names.push({ name: state.session.base, label: state.session.base + " (base)" });
  for (const a of state.adapters) if (a.state !== "failed") names.push({ name: a.name, label: a.name });
  names.forEach((n, i) => {
    const on = fresh ? i < 4 : checked.has(n.name);
    box.append(el("label", { class: "chip" }, el("input", { type: "checkbox", value: n.name, checked: on }), n.label));
  });
  renderMixMembers();
}

// ------------------------------------------------------------------ playground: the mix column
// One row per adapter the key may use: a tick, a slider and a number box for its weight, both
// kept inside the server's limits (|weight| <= max_mix_weight, server/mixes.py). The column
// sends {"model": <base>, "adapters": [{"name", "weight"}, ...]}: the server checks the rest.
const MIX_STEP = 0.05;
const mixLimit = () => (state.session && state.session.max_mix_weight) || 8;

function mixMembers() {
  const out = [];
  for (const [name, m] of state.mix) if (m.on && state.adapters.some((a) => a.name === name)) out.push({ name, weight: m.weight });
  return out;
}

function mixLabel(members) {
  return members.map((m) => `${m.name}:${m.weight}`).join("+");
}

function updateMixLabel() {
  const members = mixMembers();
  $("#play-mix-label").textContent = members.length ? "· " + mixLabel(members) : "";
}

function renderMixMembers() {
  const box = $("#play-mix-members");
  box.replaceChildren();
  const limit = mixLimit();
  const most = state.session ? state.session.max_mix_adapters : null;
  $("#play-mix-limits").textContent = `Weights from -${limit} to ${limit} (0 is refused: untick the adapter instead)` +
    (most ? `; at most ${most} adapters per mix (--max-mix-adapters).` : ".") + " The column is the base plus the weighted sum of the adapters' LoRA updates.";
  for (const a of state.adapters) {
    if (a.state === "failed") continue;
    if (!state.mix.has(a.name)) state.mix.set(a.name, { on: false, weight: 1 });
    const m = state.mix.get(a.name);
    const row = el("div", { class: "mix-member" + (m.on ? " on" : ""), "data-adapter": a.name });
    const tick = el("input", { type: "checkbox", class: "mix-on", checked: m.on });
    const slider = el("input", { type: "range", class: "mix-slider", min: -limit, max: limit, step: MIX_STEP, value: m.weight, "aria-label": `weight of ${a.name}` });
    const number = el("input", { type: "number", class: "mix-weight", min: -limit, max: limit, step: "any", value: m.weight, "aria-label": `weight of ${a.name}` });
    tick.addEventListener("change", () => { m.on = tick.checked; row.classList.toggle("on", m.on); updateMixLabel(); });
    // moving either control ticks the adapter: setting a weight means you want it in the mix
    slider.addEventListener("input", () => { m.weight = parseFloat(slider.value); number.value = slider.value; m.on = tick.checked = true; row.classList.add("on"); updateMixLabel(); });
    number.addEventListener("input", () => {
      if (number.value === "" || Number.isNaN(parseFloat(number.value))) return;
      m.weight = parseFloat(number.value); slider.value = number.value; m.on = tick.checked = true; row.classList.add("on"); updateMixLabel();
    });
    row.append(el("label", { class: "mix-name" }, tick, a.name), slider, number);
    box.append(row);
  }
  updateMixLabel();
}

function playBody(model, adapters) {
  const prompt = $("#play-prompt").value;
  const body = { model, stream: true, stream_options: { include_usage: true } };
  if (adapters) body.adapters = adapters;
  const num = (id, parse) => { const v = $(id).value; return v === "" ? undefined : parse(v); };
  body.temperature = num("#play-temperature", parseFloat);
  body.max_tokens = num("#play-max-tokens", (v) => parseInt(v, 10));
  body.top_p = num("#play-top-p", parseFloat);
  body.seed = num("#play-seed", (v) => parseInt(v, 10));
  if ($("#play-mode").value === "chat") body.messages = [{ role: "user", content: prompt }];
  else body.prompt = prompt;
  for (const k of Object.keys(body)) if (body[k] === undefined) delete body[k];
  return body;
}

// target: {model} for one adapter or the base; {model: <base>, adapters: [...]} for the mix column
async function runColumn(target, column, signal) {
  const out = column.querySelector(".output"), stats = column.querySelector(".stats");
  const chat = $("#play-mode").value === "chat";
  const started = performance.now();
  let first = null, usage = null, finish = null, chunks = 0;
  column.dataset.state = "running";
  try {
    const resp = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(playBody(target.model, target.adapters)), signal,
    });
    if (!resp.ok) throw await errorOf(resp);
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const msg = JSON.parse(data);
          if (msg.error) throw new Error(msg.error.message);
          if (msg.usage) usage = msg.usage;
          for (const choice of msg.choices || []) {
            const piece = chat ? (choice.delta && choice.delta.content) || "" : choice.text || "";
            if (piece) { if (first === null) first = performance.now(); out.textContent += piece; chunks++; }
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
      }
      const ms = performance.now() - started;
      stats.textContent = `${chunks} chunks · ${Math.round(ms)} ms`;
    }
    const total = performance.now() - started;
    const tokens = usage ? usage.completion_tokens : chunks;
    const decode = first !== null && tokens > 1 ? (tokens - 1) / ((performance.now() - first) / 1000) : null;
    stats.replaceChildren(
      el("span", { class: "tokens", text: `${tokens} tokens` }), " · ",
      el("span", { text: usage ? `prompt ${usage.prompt_tokens}` : "" }), " · ",
      el("span", { class: "latency", text: `${Math.round(total)} ms` }), " · ",
      el("span", { text: first !== null ? `first token ${Math.round(first - started)} ms` : "no tokens" }), " · ",
      el("span", { text: decode ? `${decode.toFixed(1)} tok/s` : "" }), " · ",
      el("span", { class: "finish", text: finish || "" }));
    column.dataset.state = "done";
  } catch (err) {
    if (err.name === "AbortError") { column.dataset.state = "stopped"; stats.append(" · stopped"); return; }
    column.dataset.state = "error";
    if (err.status) stats.replaceChildren(el("span", { class: "refused", text: `refused by the server: HTTP ${err.status}` }));
    if (err.status === 401) askKey(err.message);
    out.append(el("div", { class: "error", text: err.message }));
  }
}

$("#play-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const models = [...document.querySelectorAll("#play-models input:checked")].map((i) => i.value);
  const mix = mixMembers();
  const box = $("#play-columns");
  box.replaceChildren();
  delete box.dataset.done;
  if (!models.length && !mix.length) { box.append(el("p", { class: "error", text: "Choose at least one model or a mix." })); return; }
  if (!$("#play-prompt").value) { box.append(el("p", { class: "error", text: "Write a prompt." })); return; }
  if (mix.length === 1) { box.append(el("p", { class: "error", id: "play-mix-error", text: `A mix needs at least 2 adapters; only ${mix[0].name} is ticked (or untick it and choose it as a column).` })); return; }
  const column = (title, extra = {}) => {
    const col = el("div", { class: "column", ...extra }, el("h3", { text: title }), el("pre", { class: "output" }), el("div", { class: "stats" }));
    box.append(col);
    return col;
  };
  const columns = models.map((m) => [{ model: m }, column(m, { "data-model": m })]);
  if (mix.length) {
    // the weights as they are now: moving a slider during the run does not touch this request
    const adapters = mix.map((m) => ({ name: m.name, weight: m.weight }));
    columns.push([{ model: state.session.base, adapters }, column("mix " + mixLabel(adapters), { class: "column mix", "data-model": "mix", "data-mix": mixLabel(adapters) })]);
  }
  // closing a stream cancels its request on the server (it frees the batch row at the next step)
  const stop = new AbortController();
  $("#play-stop").onclick = () => stop.abort();
  $("#play-run").disabled = true;
  $("#play-stop").hidden = false;
  await Promise.all(columns.map(([m, col]) => runColumn(m, col, stop.signal)));
  $("#play-run").disabled = false;
  $("#play-stop").hidden = true;
  box.dataset.done = "1";
  if ($("#tab-adapters").hidden === false) loadAdapters();
});

// ------------------------------------------------------------------ live
// Prometheus text exposition -> [{name, labels, value}]
function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    if (m[3]) for (const l of m[3].matchAll(/([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2].replace(/\\(.)/g, "$1");
    out.push({ name: m[1], labels, value: parseFloat(m[4]) });
  }
  return out;
}

const live = { history: [], series: { running: [], waiting: [], batch: [], toks: [] } };
const sumOf = (samples, name) => samples.filter((s) => s.name === name).reduce((a, s) => a + s.value, 0);

async function pollLive() {
  let text;
  try { text = await (await api("/metrics")).text(); } catch (err) { banner("metrics: " + err.message); return; }
  const samples = parseMetrics(text);
  const now = performance.now() / 1000;
  const cur = {
    t: now,
    running: sumOf(samples, "loraplex_num_requests_running"),
    waiting: sumOf(samples, "loraplex_num_requests_waiting"),
    resident: sumOf(samples, "loraplex_adapters_resident"),
    batchSum: sumOf(samples, "loraplex_batch_size_sum"),
    batchCount: sumOf(samples, "loraplex_batch_size_count"),
    tokens: sumOf(samples, "loraplex_generation_tokens_total"),
  };
  // rates over the last few polls (a decode step can take longer than one poll on a busy CPU)
  live.history.push(cur);
  if (live.history.length > 5) live.history.shift();
  const old = live.history[0];
  const dt = cur.t - old.t, steps = cur.batchCount - old.batchCount;
  const batch = steps > 0 ? (cur.batchSum - old.batchSum) / steps : 0;
  const toks = dt > 0 ? (cur.tokens - old.tokens) / dt : 0;
  const push = (k, v) => { const s = live.series[k]; s.push(v); if (s.length > 80) s.shift(); sparkline($("#chart-" + k), s); };
  push("running", cur.running); push("waiting", cur.waiting); push("batch", batch); push("toks", toks);
  $("#live-running").textContent = cur.running;
  $("#live-waiting").textContent = cur.waiting;
  $("#live-batch").textContent = batch.toFixed(1);
  $("#live-toks").textContent = toks.toFixed(1);
  $("#live-resident").textContent = cur.resident;
  const per = {};
  for (const s of samples) {
    const a = s.labels.adapter;
    if (a === undefined) continue;
    per[a] = per[a] || { requests: 0, tokens: 0 };
    if (s.name === "loraplex_requests_total") per[a].requests += s.value;
    if (s.name === "loraplex_generation_tokens_total") per[a].tokens += s.value;
  }
  const max = Math.max(1, ...Object.values(per).map((p) => p.tokens));
  const tbody = $("#live-adapters tbody");
  tbody.replaceChildren(...Object.entries(per).sort().map(([name, p]) => el("tr", { "data-adapter": name },
    el("td", { text: name }), el("td", { class: "requests", text: p.requests }), el("td", { text: p.tokens }),
    el("td", {}, el("div", { class: "bar", style: `width:${(100 * p.tokens) / max}%` })))));
}

// ------------------------------------------------------------------ train-to-serve
async function loadTrain() {
  const s = state.session;
  const on = s && s.training_allowed && s.admin;
  $("#train-on").hidden = !on;
  $("#train-off").hidden = on;
  if (!on) {
    $("#train-off").textContent = !s || !s.training_allowed
      ? "Training from the console is off. Start the server with --ui-allow-training to train adapters here (admin keys only)."
      : "Training from the console needs an admin key.";
    return;
  }
  const files = await getJSON("/ui/api/train/files");
  const select = $("#train-file"), keep = select.value;
  select.replaceChildren(...files.data.map((f) => el("option", { value: f.id, text: `${f.label} (${Math.ceil(f.bytes / 1024)} KiB)` })));
  if (keep) select.value = keep;
  await pollJobs();
}

$("#train-upload").addEventListener("change", async (ev) => {
  const file = ev.target.files[0];
  if (!file) return;
  const status = $("#train-upload-status");
  status.textContent = "uploading…";
  try {
    const resp = await api(`/ui/api/train/upload?filename=${encodeURIComponent(file.name)}`, { method: "POST", body: file, headers: { "Content-Type": "application/octet-stream" } });
    const info = await resp.json();
    status.textContent = `${info.records} records, fields: ${info.fields.join(", ")}`;
    await loadTrain();
    $("#train-file").value = info.id;
  } catch (err) { status.textContent = ""; $("#train-error").textContent = err.message; }
});

$("#train-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("#train-error").textContent = "";
  const form = {
    name: $("#train-name").value.trim(), data_file: $("#train-file").value, method: $("#train-method").value,
    max_steps: parseInt($("#train-steps").value, 10), learning_rate: parseFloat($("#train-lr").value),
    lora_r: parseInt($("#train-rank").value, 10), metric: $("#train-metric").value,
    input_field: $("#train-input-field").value.trim(), output_field: $("#train-output-field").value.trim(),
  };
  try { await postJSON("/ui/api/train", form); } catch (err) { $("#train-error").textContent = err.message; }
  await pollJobs();
});

async function stopJob(id) {
  $("#train-error").textContent = "";
  try { await postJSON(`/ui/api/train/jobs/${encodeURIComponent(id)}/stop`, {}); } catch (err) { $("#train-error").textContent = err.message; }
  await pollJobs();
}

const fmtTime = (s) => (s === null || s === undefined ? "–" : s >= 60 ? `${Math.floor(s / 60)} min ${Math.round(s % 60)} s` : `${Math.round(s)} s`);

async function pollJobs() {
  const jobs = (await getJSON("/ui/api/train/jobs")).data;
  const box = $("#train-jobs");
  box.replaceChildren(...jobs.map((j) => {
    const pct = j.total ? (100 * j.step) / j.total : 0;
    const svg = svgEl("svg", { viewBox: "0 0 240 60", preserveAspectRatio: "none", class: "job-loss" });
    sparkline(svg, j.losses.map((p) => p[1]));
    return el("div", { class: "job " + j.state, "data-job": j.id, "data-state": j.state },
      el("h3", {}, `${j.name} `, el("span", { class: "state " + j.state, text: j.state })),
      el("div", { class: "progress" }, el("div", { style: `width:${pct}%` })),
      el("p", { text: `step ${j.step}/${j.total || j.form.max_steps} · loss ${fmt(j.loss, 4)} · eval loss ${fmt(j.eval_loss, 4)} · elapsed ${fmtTime(j.elapsed_seconds)} · ETA ${fmtTime(j.eta_seconds)}` }),
      svg,
      j.error ? el("p", { class: "error", text: j.error }) : null,
      !j.finished ? el("button", { type: "button", class: "job-stop", disabled: j.state === "stopping", onclick: () => stopJob(j.id), text: j.state === "stopping" ? "Stopping…" : "Stop" }) : null,
      j.state === "stopped" ? el("p", { class: "note", text: "Stopped: the trainer was ended before it published; nothing was written to the store." }) : null,
      j.state === "succeeded" ? el("p", { class: "note", text: "Published into the store: it is in the Adapters table and the Playground now." }) : null);
  }));
  const running = jobs.some((j) => !j.finished);
  clearTimeout(state.trainTimer);
  if (running) state.trainTimer = setTimeout(() => pollJobs().catch((e) => banner(e.message)), 2000);
  else if (jobs.length) await loadAdapters();
}

// ------------------------------------------------------------------ start
async function start() {
  banner("");
  const models = await fetch("/v1/models", { headers: headers() });
  if (models.status === 401) { askKey((await errorOf(models)).message); return; }
  if (!models.ok) { banner((await errorOf(models)).message + " — retrying"); setTimeout(start, 2000); return; }
  const visible = (await models.json()).data.map((m) => m.id);
  state.session = await getJSON("/ui/api/session");
  state.session.base_visible = visible.includes(state.session.base);
  $("#base-name").textContent = `base ${state.session.base} · ${state.session.backend}`;
  $("#key-label").textContent = state.session.auth ? `· key ${state.session.key_name} (${state.session.admin ? "admin" : "user"})` : "";
  $("#change-key").hidden = !state.session.auth;
  document.body.dataset.ready = "1";
  await loadAdapters();
}

$("#refresh-adapters").addEventListener("click", () => loadAdapters().catch((e) => banner(e.message)));
start().catch((err) => banner(err.message));
