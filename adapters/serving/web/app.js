// The adapters web page: a playground over the server's models (/v1) and the training runs
// under its folder (/ui/api). Plain JS, no library, nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  key: sessionStorage.getItem("adapters-api-key") || "",
  info: null,
  models: [],          // ids from /v1/models, the base first
  checked: null,       // Set of model ids picked (null: not yet chosen: all adapters)
  chats: {},           // model id -> [{role, content}] in chat mode
  run: null,           // the run shown in Runs
  rows: [], offset: 0, fileId: null, pollTimer: null,
  prompting: {},       // model id -> {mode: template | chat | raw, template} (/ui/api/models)
  inflight: [],        // AbortControllers of the answers streaming now
  round: 0,            // bumped by each Send and Clear: late answers of an old round are dropped
};

// ---- talking to the server -------------------------------------------------------------

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.key) h.Authorization = "Bearer " + state.key;
  return h;
}

async function api(path, opts) {
  opts = opts || {};
  const r = await fetch(path, Object.assign({}, opts, { headers: headers(opts.headers) }));
  const body = await r.json().catch(() => ({}));
  if (r.status === 401) askKey();
  if (!r.ok) throw new Error((body.error && body.error.message) || r.statusText);
  return body;
}

function say(text) { $("status").textContent = text; }

function askKey() {
  const form = $("key-form");
  if (form.hidden) {
    form.hidden = false;
    $("api-key").focus();
    say("This server needs an API key.");
  }
}

$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.key = $("api-key").value;
  sessionStorage.setItem("adapters-api-key", state.key);
  $("key-form").hidden = true;
  start();
});

// ---- tabs (WAI-ARIA tabs: arrows, Home and End move between them) ---------------------

function tabs() { return Array.from(document.querySelectorAll('[role="tab"]')).filter((t) => !t.hidden); }

function showTab(tab, focus) {
  for (const t of tabs()) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on));
    t.tabIndex = on ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !on;
  }
  if (focus) tab.focus();
  if (tab.id === "tab-runs") refreshRuns();
  if (tab.id === "tab-train") refreshTrain();
}

for (const t of document.querySelectorAll('[role="tab"]')) {
  t.addEventListener("click", () => showTab(t, false));
  t.addEventListener("keydown", (ev) => {
    const all = tabs(), i = all.indexOf(t);
    const to = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: all.length - 1 }[ev.key];
    if (to === undefined) return;
    ev.preventDefault();
    showTab(all[(to + all.length) % all.length], true);
  });
}

// ---- playground: models ------------------------------------------------------------------

async function refreshModels() {
  const [body, extra] = await Promise.all([api("/v1/models"), api("/ui/api/models")]);
  const ids = body.data.map((m) => m.id);
  state.prompting = Object.fromEntries(extra.models.map((m) => [m.id, m]));
  const base = state.info.base;
  if (state.checked === null) state.checked = new Set(ids.filter((m) => m !== base));
  for (const id of Array.from(state.checked)) if (!ids.includes(id)) state.checked.delete(id);
  const sig = JSON.stringify(ids);
  state.models = ids;
  if (sig === state.modelsSig) return;  // unchanged: keep the boxes (and the focus) as they are
  state.modelsSig = sig;
  const list = $("model-list");
  list.textContent = "";
  ids.forEach((id, i) => {
    const li = document.createElement("li");
    const box = Object.assign(document.createElement("input"),
                              { type: "checkbox", id: "model-" + i, value: id,
                                checked: state.checked.has(id) });
    box.addEventListener("change", () => {
      if (box.checked) state.checked.add(id); else state.checked.delete(id);
    });
    const label = Object.assign(document.createElement("label"), { htmlFor: box.id });
    label.textContent = id === base ? id + " (no adapter)" : id;
    li.append(box, label);
    if (id !== base) {
      li.append(button("Card", "Model card of " + id, () => showCard(id)),
                button("Unload", "Unload " + id, () => unload(id)));
    }
    list.append(li);
  });
}

function button(text, label, onClick) {
  const b = Object.assign(document.createElement("button"), { type: "button", textContent: text });
  b.setAttribute("aria-label", label);
  b.className = "small";
  b.addEventListener("click", onClick);
  return b;
}

async function showCard(id) {
  try {
    const body = await api("/ui/api/card?model=" + encodeURIComponent(id));
    $("card-title").textContent = "Model card: " + id;
    state.cardText = body.card || "";
    renderMarkdown($("card-text"), body.card || "(this adapter has no README.md)");
    $("card-dialog").showModal();
  } catch (e) { say(e.message); }
}

$("card-copy").addEventListener("click", () => copy(state.cardText || "", $("card-copy")));

async function copy(text, btn) {
  try {
    await navigator.clipboard.writeText(text);
    btn.textContent = "Copied";
  } catch (e) { btn.textContent = "Copy failed"; }
  setTimeout(() => { btn.textContent = "Copy"; }, 1500);
}

async function unload(id) {
  try {
    await api("/v1/adapters/" + encodeURIComponent(id), { method: "DELETE" });
    state.checked.delete(id);
    say("Unloaded " + id + ".");
    await refreshModels();
  } catch (e) { say("Unload failed: " + e.message); }
}

async function refreshLoadable() {
  const select = $("load-path");
  if (!state.info.runs) {
    $("load-off").hidden = false;
    for (const el of $("load-form").elements) el.disabled = true;
    return;
  }
  const body = await api("/ui/api/runs");
  const paths = body.runs.filter((r) => r.adapter).map((r) => r.path);
  const sig = JSON.stringify(paths);
  if (sig === state.loadableSig) return;  // keep the user's pick while nothing changed
  state.loadableSig = sig;
  const keep = select.value;
  select.textContent = "";
  for (const p of paths) select.append(new Option(p, p, false, p === keep));
  if (select.value !== keep) suggestName();
}

// The folder's last part, made a valid name that no loaded model has yet.
function suggestName() {
  const path = $("load-path").value || "";
  const last = (path.split("/").filter(Boolean).pop() || "adapter")
    .replace(/[^A-Za-z0-9._-]/g, "-").slice(0, 60);
  let name = last, n = 2;
  while (state.models.includes(name)) name = last + "-" + n++;
  $("load-name").value = name;
}

$("load-path").addEventListener("change", suggestName);
$("load-name").addEventListener("input", () => {
  const el = $("load-name");
  el.setCustomValidity(el.validity.patternMismatch
    ? "Use letters, digits, '.', '_' or '-' (at most 64 characters)." : "");
});
$("load-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const name = $("load-name").value, path = $("load-path").value;
  if (state.models.includes(name)) {  // the server would replace it: say so instead
    say("An adapter named " + name + " is loaded already: unload it first, or pick another name.");
    return;
  }
  say("Loading " + name + "...");
  try {
    await api("/v1/adapters", { method: "POST", headers: { "Content-Type": "application/json" },
                                body: JSON.stringify({ name, path }) });
    state.checked.add(name);
    say("Loaded " + name + ".");
    await refreshModels();
    suggestName();
  } catch (e) { say("Load failed: " + e.message); }
});

// ---- playground: asking and streaming ---------------------------------------------------

function sampling() {
  const s = { max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value),
              top_p: Number($("top-p").value), stream: true,
              stream_options: { include_usage: true } };
  if ($("seed").value !== "") s.seed = Number($("seed").value);
  if ($("stop").value !== "") s.stop = $("stop").value;
  return s;
}

// What the model is sent in prompt mode: an adapter trained on prompts gets its own template
// around the text (as in training), unless the box is unticked; the base gets the text.
function promptFor(id, text) {
  const p = state.prompting[id];
  if (!$("use-template").checked || !p || p.mode !== "template") return text;
  return p.template.split("{prompt}").join(text);
}

function column(id, ctrl) {
  const col = document.createElement("article");
  col.className = "answer";
  col.dataset.model = id;
  col.setAttribute("aria-busy", "true");
  const head = document.createElement("div");
  head.className = "head";
  const h = document.createElement("h3");
  h.textContent = id;
  const stop = button("Stop", "Stop the answer of " + id, () => ctrl.abort());
  stop.classList.add("stop");
  const copyBtn = button("Copy", "Copy the answer of " + id,
                         () => copy(col.querySelector(".text").textContent, copyBtn));
  head.append(h, stop, copyBtn);
  const out = document.createElement("pre");
  out.className = "text";
  const foot = document.createElement("p");
  foot.className = "finish";
  const numbers = document.createElement("p");
  numbers.className = "numbers";
  col.append(head, out, foot, numbers);
  return col;
}

function transcript(col, id, prompt, chat, sent) {
  const out = col.querySelector(".text");
  if (!chat) {
    if (sent !== prompt) {
      const d = document.createElement("details");
      d.className = "sent";
      const sum = document.createElement("summary");
      sum.textContent = "sent with its prompt template";
      const pre = document.createElement("pre");
      pre.textContent = sent;
      d.append(sum, pre);
      col.insertBefore(d, out);
    }
    return out;
  }
  for (const turn of state.chats[id] || []) {
    const p = document.createElement("p");
    p.className = "turn " + turn.role;
    p.textContent = (turn.role === "user" ? "You: " : id + ": ") + turn.content;
    col.insertBefore(p, out);
  }
  const p = document.createElement("p");
  p.className = "turn user";
  p.textContent = "You: " + prompt;
  col.insertBefore(p, out);
  return out;
}

const FINISH = { stop: "finished: the model ended its answer",
                 length: "finished: reached max tokens" };

// One model's answer, streamed. The column's controller stops it (Stop, Stop all, Clear):
// closing the connection makes the server drop the request from its batch at once.
async function stream(id, prompt, chat, col, ctrl, round) {
  const sent = chat ? prompt : promptFor(id, prompt);
  const out = transcript(col, id, prompt, chat, sent);
  const history = state.chats[id] || [];
  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(
    history, [{ role: "user", content: prompt }]);
  const body = Object.assign({ model: id }, sampling(), chat ? { messages } : { prompt: sent });
  let text = "", finish = "", usage = null, first = null, pieces = 0;
  const t0 = performance.now();
  try {
    const r = await fetch(chat ? "/v1/chat/completions" : "/v1/completions",
                          { method: "POST", headers: headers({ "Content-Type": "application/json" }),
                            body: JSON.stringify(body), signal: ctrl.signal });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      if (r.status === 401) askKey();
      throw new Error((err.error && err.error.message) || r.statusText);
    }
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const msg = JSON.parse(line.slice(6));
          if (msg.error) throw new Error(msg.error.message);
          if (msg.usage) usage = msg.usage;
          const c = msg.choices[0];
          if (!c) continue;
          const piece = chat ? (c.delta.content || "") : (c.text || "");
          if (piece) { pieces += 1; if (first === null) first = performance.now(); }
          text += piece;
          if (c.finish_reason) finish = c.finish_reason;
          out.textContent = text;
        }
      }
    }
    col.dataset.state = "done";
    col.querySelector(".finish").textContent = FINISH[finish] || "finished: " + (finish || "?");
    if (chat && round === state.round) {  // a Clear since: the conversation is gone
      state.chats[id] = history.concat([{ role: "user", content: prompt },
                                        { role: "assistant", content: text }]);
    }
  } catch (e) {
    const stopped = ctrl.signal.aborted;
    col.dataset.state = stopped ? "stopped" : "error";
    col.querySelector(".finish").textContent = stopped ? "stopped" : "error: " + e.message;
  } finally {
    col.setAttribute("aria-busy", "false");
    col.querySelector(".stop").disabled = true;
    col.querySelector(".numbers").textContent = numbers(t0, first, performance.now(), usage, pieces);
  }
}

function numbers(t0, first, end, usage, pieces) {
  if (first === null) return "";
  const n = usage ? usage.completion_tokens : pieces;
  const rate = n > 1 && end > first ? (n - 1) / ((end - first) / 1000) : null;
  const parts = ["first token " + Math.round(first - t0) + " ms"];
  if (rate !== null) parts.push(rate.toFixed(1) + " tokens/s");
  if (usage) parts.push(usage.prompt_tokens + " prompt + " + usage.completion_tokens + " answer tokens");
  return parts.join(" · ");
}

async function ask(ev) {
  ev.preventDefault();
  const picked = state.models.filter((m) => state.checked.has(m));
  const prompt = $("prompt").value;
  if (!picked.length) { say("Pick at least one model."); return; }
  const chat = $("mode-chat").checked;
  stopAll();
  const round = ++state.round;
  const answers = $("answers");
  answers.textContent = "";
  const ctrls = picked.map(() => new AbortController());
  state.inflight = ctrls;
  const cols = picked.map((id, i) => { const c = column(id, ctrls[i]); answers.append(c); return c; });
  $("send").disabled = true;
  $("stop-all").disabled = false;
  $("answers-status").textContent = "Asking " + picked.join(", ") + "...";
  $("answers-title").scrollIntoView({ block: "start", behavior: "smooth" });
  await Promise.all(picked.map((id, i) => stream(id, prompt, chat, cols[i], ctrls[i], round)));
  if (round !== state.round) return;  // a newer round (or a Clear) owns the buttons now
  $("send").disabled = false;
  $("stop-all").disabled = true;
  state.inflight = [];
  const done = cols.filter((c) => c.dataset.state === "done").length;
  const stopped = cols.filter((c) => c.dataset.state === "stopped").length;
  $("answers-status").textContent = done === cols.length ? "Answers done."
    : done ? done + " of " + cols.length + " answered" + (stopped ? ", " + stopped + " stopped." : "; the others failed.")
    : stopped ? "Stopped." : "Every answer failed.";
}

function stopAll() {
  for (const c of state.inflight) c.abort();
}

$("ask").addEventListener("submit", ask);
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) $("ask").requestSubmit();
});
$("stop-all").addEventListener("click", stopAll);
$("clear").addEventListener("click", () => {
  stopAll();
  state.round += 1;  // answers still arriving belong to nothing now
  state.inflight = [];
  state.chats = {};
  $("answers").textContent = "";
  $("answers-status").textContent = "Cleared.";
  $("send").disabled = false;
  $("stop-all").disabled = true;
});
for (const id of ["mode-prompt", "mode-chat"]) {
  $(id).addEventListener("change", () => { $("system-box").hidden = !$("mode-chat").checked; });
}

// ---- runs ------------------------------------------------------------------------------

async function refreshRuns() {
  if (!state.info || !state.info.runs) return;
  try {
    const body = await api("/ui/api/runs");
    const list = $("run-list");
    const sig = JSON.stringify(body.runs.map((r) => [r.path, r.metrics, r.results, r.adapter,
                                                      r.status]));
    if (sig === state.runsSig) return;  // unchanged: keep the buttons (and the focus) as they are
    state.runsSig = sig;
    // Reconcile by path instead of rebuilding: a button the user is about to click (or has
    // focused) stays the same element while a run's files change under it.
    state.runsByPath = new Map(body.runs.map((r) => [r.path, r]));
    const have = new Map([...list.querySelectorAll("button.run")].map((b) => [b.dataset.path, b]));
    let prev = null;
    for (const r of body.runs) {
      let b = have.get(r.path);
      if (!b) {
        b = Object.assign(document.createElement("button"), { type: "button", className: "run" });
        b.textContent = r.path;
        b.dataset.path = r.path;
        b.addEventListener("click", () => openRun(state.runsByPath.get(b.dataset.path)));
        const li = document.createElement("li");
        const line = document.createElement("span");
        line.className = "run-line";
        li.append(b, line);
        if (r.metrics) {  // overlay this run's loss curve with the others ticked
          const box = Object.assign(document.createElement("input"), { type: "checkbox",
                                                                       className: "compare" });
          box.setAttribute("aria-label", "Compare the loss curve of " + r.path);
          box.dataset.path = r.path;
          box.addEventListener("change", drawCompare);
          li.prepend(box);
        }
      }
      have.delete(r.path);
      const kinds = ["metrics", "results", "adapter"].filter((k) => r[k]).join(", ");
      b.title = kinds;
      b.setAttribute("aria-label", r.path + " (" + kinds + ")");
      if (r.path === state.run) b.setAttribute("aria-current", "true");
      const li = b.parentElement;
      li.querySelector(".run-line").textContent = statusLine(r.status);
      if (prev ? prev.nextSibling !== li : list.firstChild !== li) {
        list.insertBefore(li, prev ? prev.nextSibling : list.firstChild);
      }
      prev = li;
    }
    for (const b of have.values()) b.parentElement.remove();
  } catch (e) { say(e.message); }
}

// A run's line on the board (ui.py run_status).
function statusLine(st) {
  if (!st) return "";
  const ev = st.final_eval !== null ? ", eval loss " + fmt(st.final_eval) +
    (st.best_eval !== null && st.best_eval !== st.final_eval ? " (best " + fmt(st.best_eval) + ")" : "") : "";
  if (st.state === "finished") return "finished" + ev;
  if (st.state === "training") {
    return "training: step " + st.step + (st.total ? " of " + st.total : "") +
      (st.eta_s !== null && st.eta_s !== undefined ? ", about " + duration(st.eta_s) + " left" : "") + ev;
  }
  if (st.state === "stopped") return "stopped at step " + st.step + ", resumable" + ev;
  return st.state + ev;
}

function duration(s) {
  return s < 90 ? s + " s" : s < 5400 ? Math.round(s / 60) + " min" : (s / 3600).toFixed(1) + " h";
}

// The ticked runs' training loss, one line each, on one chart.
async function drawCompare() {
  const paths = [...document.querySelectorAll("#run-list input.compare:checked")].map((b) => b.dataset.path);
  const fig = $("compare-figure");
  fig.hidden = paths.length < 2;
  fig.dataset.lines = String(paths.length);
  if (paths.length < 2) return;
  const lines = [];
  for (const [i, path] of paths.entries()) {
    const rows = [];
    let offset = 0, more = true;
    while (more) {
      const body = await api("/ui/api/metrics?run=" + encodeURIComponent(path) + "&offset=" + offset);
      rows.push(...body.rows);
      offset = body.offset;
      more = body.more;
    }
    const pts = rows.filter((r) => typeof r.loss === "number" && isFinite(r.loss)).map((r) => [r.step, r.loss]);
    lines.push({ name: path, color: PALETTE[i % PALETTE.length], points: pts });
  }
  $("compare-caption").textContent = "training loss of " + paths.join(", ");
  $("compare-chart").setAttribute("aria-label", "Training loss by step of " + paths.join(", "));
  lineChart($("compare-chart"), lines);
}

async function openRun(r) {
  clearTimeout(state.pollTimer);
  Object.assign(state, { run: r.path, rows: [], offset: 0, fileId: null, summaryShown: false });
  for (const b of document.querySelectorAll("button.run")) {
    if (b.dataset.path === r.path) b.setAttribute("aria-current", "true");
    else b.removeAttribute("aria-current");
  }
  $("run-title").textContent = r.path;
  for (const id of ["loss-figure", "reward-figure", "latest-box", "summary-box", "results-box", "recipe-box", "run-card-box", "run-state"]) {
    $(id).hidden = true;
  }
  await Promise.all([loadSummary(r.path), r.results ? loadResults(r.path) : null]);
  if (r.metrics) pollMetrics(r.path);
}

async function pollMetrics(path) {
  if (state.run !== path) return;
  try {
    let more = true;
    while (more && state.run === path) {
      const q = "/ui/api/metrics?run=" + encodeURIComponent(path) + "&offset=" + state.offset +
                (state.fileId ? "&file_id=" + encodeURIComponent(state.fileId) : "");
      const body = await api(q);
      if (state.run !== path) return;
      if (body.reset) state.rows = [];
      state.rows = state.rows.concat(body.rows);
      state.offset = body.offset;
      state.fileId = body.file_id;
      more = body.more;
      if (body.rows.length || body.reset) { drawLoss(); drawReward(); }
    }
  } catch (e) { say(e.message); }
  if (!$("runs").hidden && state.run === path) {
    state.pollTimer = setTimeout(() => pollMetrics(path), 1000);
  }
}

function series(key) {
  const by = new Map();
  for (const r of state.rows) {
    if (typeof r[key] === "number" && isFinite(r[key])) by.set(r.step, r[key]);
  }
  return Array.from(by.entries()).sort((a, b) => a[0] - b[0]);
}

function drawLoss() {
  const loss = series("loss"), evals = series("eval_loss");
  const fig = $("loss-figure");
  fig.hidden = false;
  fig.dataset.points = String(loss.length);
  fig.dataset.evalPoints = String(evals.length);
  const last = loss.length ? loss[loss.length - 1] : null;
  const lastEval = evals.length ? evals[evals.length - 1] : null;
  const caption = (last ? "step " + last[0] + ": loss " + last[1].toFixed(4) : "no step yet") +
                  (lastEval ? "; eval loss " + lastEval[1].toFixed(4) + " at step " + lastEval[0] : "") +
                  " (" + loss.length + " points)";
  $("loss-caption").textContent = caption;
  $("loss-chart").setAttribute("aria-label", "Training loss and eval loss by step; " + caption);
  lineChart($("loss-chart"), [{ name: "train loss", color: "#1f5fbf", points: loss },
                              { name: "eval loss", color: "#c2410c", points: evals, dots: true }]);
  const steps = state.rows.filter((r) => typeof r.loss === "number");
  const row = steps[steps.length - 1];
  if (row) {
    // one step's tokens/s is noisy: the median of the last ten steps
    const recent = steps.slice(-10).map((r) => r.tokens_per_s).filter((v) => typeof v === "number");
    pairs($("latest"), [["step", row.step], ["loss", fmt(row.loss)], ["learning rate", fmt(row.lr)],
                        ["grad norm", fmt(row.grad_norm)],
                        ["tokens/s (median of last " + recent.length + ")", fmt(Math.round(median(recent)))],
                        ["peak memory", gb(row.peak_memory_bytes)]]);
    $("latest-box").hidden = false;
  }
  if (!state.summaryShown && state.run && !state.summaryAsked) {  // finished since it was opened?
    state.summaryAsked = true;
    loadSummary(state.run).finally(() => { state.summaryAsked = false; });
  }
}

const REWARD_COLORS = ["#15803d", "#7c3aed", "#b45309", "#0e7490", "#be185d"];

// GRPO runs: the step's mean reward, each named reward, and the eval reward (dots).
function drawReward() {
  const total = series("reward"), evals = series("eval_reward");
  const fig = $("reward-figure");
  if (!total.length) { fig.hidden = true; return; }
  const names = Array.from(new Set(state.rows.flatMap((r) => Object.keys(r)))).filter(
    (k) => k.startsWith("reward_") && !k.endsWith("_std"));
  const lines = [{ name: "reward", color: "#1f5fbf", points: total }];
  if (names.length > 1) {
    names.forEach((k, i) => lines.push(
      { name: k.slice(7), color: REWARD_COLORS[i % REWARD_COLORS.length], points: series(k) }));
  }
  lines.push({ name: "eval reward", color: "#c2410c", points: evals, dots: true });
  fig.hidden = false;
  fig.dataset.points = String(total.length);
  fig.dataset.evalPoints = String(evals.length);
  const last = total[total.length - 1];
  const caption = "step " + last[0] + ": reward " + last[1].toFixed(4) +
                  (evals.length ? "; eval reward " + evals[evals.length - 1][1].toFixed(4) : "") +
                  " (" + total.length + " points)";
  $("reward-caption").textContent = caption;
  $("reward-chart").setAttribute("aria-label", "Mean reward by step; " + caption);
  lineChart($("reward-chart"), lines);
}

function fmt(v) {
  if (typeof v !== "number") return v === null || v === undefined ? "-" : String(v);
  if (v !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e5)) return v.toExponential(3);
  return String(Math.round(v * 1e4) / 1e4);
}

function median(xs) {
  if (!xs.length) return NaN;
  const s = xs.slice().sort((a, b) => a - b), m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

function gb(v) { return typeof v === "number" ? (v / 1e9).toFixed(2) + " GB" : "-"; }

function pairs(dl, items) {
  dl.textContent = "";
  for (const [k, v] of items) {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = k;
    dd.textContent = v;
    dl.append(dt, dd);
  }
}

async function loadSummary(path) {
  try {
    const s = await api("/ui/api/summary?run=" + encodeURIComponent(path));
    if (state.run !== path) return;
    if (s.training) {
      const t = s.training;
      pairs($("summary"), [["steps", t.steps], ["tokens", t.tokens], ["tokens/s", fmt(t.tokens_per_s)],
                           ["final train loss", fmt(t.final_train_loss)],
                           ["final eval loss", fmt(t.final_eval_loss)], ["seconds", t.seconds],
                           ["peak memory", gb(t.peak_memory_bytes)], ["dtype", t.dtype],
                           ["global batch", t.global_batch]]);
      $("summary-box").hidden = false;
      state.summaryShown = true;
    }
    const st = s.state || {};
    const run = (state.runsByPath || new Map()).get(path) || {};
    const line = st.finished ? "Finished." : st.resume
      ? "Stopped at step " + st.checkpoint_step + " (checkpoint kept); resume with: " + st.resume
      : "Training, or not started yet.";
    $("run-state").textContent = line;
    $("run-state").hidden = !run.metrics;  // a folder of eval results or an adapter alone
    if (st.finished && s.training) refreshRuns();  // its line on the board says so too
    if (s.recipe) { $("recipe").textContent = s.recipe; $("recipe-box").hidden = false; }
    if (s.card) { renderMarkdown($("run-card"), s.card); $("run-card-box").hidden = false; }
  } catch (e) { say(e.message); }
}

const NOT_METRICS = new Set(["model", "dataset", "samples"]);

async function loadResults(path) {
  try {
    const body = await api("/ui/api/results?run=" + encodeURIComponent(path));
    if (state.run !== path) return;
    const rows = body.rows;
    const metrics = Array.from(new Set(rows.flatMap((r) => Object.keys(r).filter(
      (k) => !NOT_METRICS.has(k) && typeof r[k] === "number"))));
    const models = Array.from(new Set(rows.map((r) => r.model)));
    const dsets = Array.from(new Set(rows.map((r) => r.dataset)));
    const box = $("results-tables");
    box.textContent = "";
    for (const m of metrics) {
      const wrap = document.createElement("div");
      wrap.className = "table-wrap";  // a wide table scrolls inside, not the page
      wrap.append(resultTable(rows, m, models, dsets));
      box.append(wrap);
    }
    const metric = metrics.includes("loss") ? "loss" : metrics[0];
    if (metric) {
      barChart($("results-chart"), rows, metric, models, dsets);
      $("results-caption").textContent = metric + " by dataset and model";
      $("results-chart").setAttribute("aria-label", metric + " by dataset and model (the tables above hold the numbers)");
    }
    const samples = $("results-samples");
    samples.textContent = "";
    for (const r of rows) {
      for (const smp of r.samples || []) {
        const li = document.createElement("li");
        li.className = "sample";
        li.textContent = r.model + " on " + r.dataset + ": " + JSON.stringify(smp.prompt || "") +
          " -> " + JSON.stringify(smp.answer || "") +
          (smp.reference ? " (reference " + JSON.stringify(smp.reference) + ")" : "");
        samples.append(li);
      }
    }
    $("results-samples-box").hidden = !samples.childElementCount;
    $("results-box").hidden = false;
  } catch (e) { say(e.message); }
}

function resultTable(rows, metric, models, dsets) {
  const t = document.createElement("table");
  const cap = t.createCaption();
  const better = state.info.higher_is_better || {};
  cap.textContent = metric + (metric in better ? (better[metric] ? " (higher is better)"
                                                                : " (lower is better)") : "");
  const head = t.createTHead().insertRow();
  for (const h of ["dataset"].concat(models)) {
    const th = document.createElement("th");
    th.scope = "col";
    th.textContent = h;
    head.append(th);
  }
  const body = t.createTBody();
  for (const d of dsets) {
    const tr = body.insertRow();
    const th = document.createElement("th");
    th.scope = "row";
    th.textContent = d;
    tr.append(th);
    const base = rows.find((r) => r.dataset === d && r.model === state.info.results_base);
    for (const m of models) {
      const r = rows.find((x) => x.dataset === d && x.model === m);
      const v = r ? r[metric] : undefined;
      let text = typeof v === "number" ? fmt(v) : "-";
      if (metric in better && base && m !== base.model && typeof v === "number" && base[metric]) {
        text += " (" + (v / base[metric] - 1 >= 0 ? "+" : "") + (100 * (v / base[metric] - 1)).toFixed(1) + "%)";
      }
      tr.insertCell().textContent = text;
    }
  }
  return t;
}

// ---- train from the page (one run at a time, a child `adapters train` on the server) -------

async function refreshTrain() {
  try {
    const o = await api("/ui/api/train");
    fillSelect($("train-recipe"), o.recipes, "(none: the fields here)");
    fillSelect($("train-data"), o.uploads, "(none)");
    fillSelect($("train-base"), o.bases, "this server's base (loadable here)");
    showTrain(o);
  } catch (e) { say(e.message); }
}

function fillSelect(select, values, none) {
  const keep = select.value;
  const sig = JSON.stringify(values);
  if (select.dataset.sig === sig) return;
  select.dataset.sig = sig;
  select.textContent = "";
  select.append(new Option(none, ""));
  for (const v of values) select.append(new Option(v, v, false, v === keep));
}

const TRAIN_STATES = { finished: "finished", stopped: "stopped (checkpoint kept): Resume goes on",
                       failed: "failed: see the console" };

function showTrain(o) {
  const last = o.last, busy = Boolean(o.training);
  state.trainLast = last;
  $("train-start").disabled = busy;
  $("train-stop").disabled = !busy;
  $("train-resume").disabled = busy || !last || last.state !== "stopped";
  $("train-load").disabled = busy || !last || last.state !== "finished" || !last.served_base;
  if (last) {
    $("train-status").textContent = busy ? "Training " + last.name + "... (its curve is in Runs)"
      : last.name + ": " + (TRAIN_STATES[last.state] || last.state) +
        (last.state === "finished" && !last.served_base
          ? " (trained on another base: serve that base to load it)" : "");
    $("train-log").textContent = last.log;
    $("train-log-box").hidden = false;
    $("train").dataset.state = busy ? "training" : last.state;
  }
  clearTimeout(state.trainTimer);
  if (busy) state.trainTimer = setTimeout(refreshTrain, 1000);
}

function trainBody() {
  return { name: $("train-name").value, base: $("train-base").value || null,
           recipe: $("train-recipe").value || null,
           data: $("train-data").value || null, format: $("train-format").value || null,
           r: Number($("train-r").value), steps: Number($("train-steps").value),
           lr: Number($("train-lr").value) };
}

$("train-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    const file = $("train-file").files[0];
    if (file) {
      $("train-status").textContent = "Uploading " + file.name + "...";
      const up = await api("/ui/api/upload?filename=" + encodeURIComponent(file.name),
                           { method: "POST", headers: { "Content-Type": "application/octet-stream" },
                             body: file });
      await refreshTrain();
      $("train-data").value = up.path;
      $("train-file").value = "";
    }
    $("train-status").textContent = "Starting " + $("train-name").value + "...";
    showTrain(await api("/ui/api/train", { method: "POST",
                                           headers: { "Content-Type": "application/json" },
                                           body: JSON.stringify(trainBody()) }));
  } catch (e) { $("train-status").textContent = "Could not start: " + e.message; }
});

$("train-stop").addEventListener("click", async () => {
  try { showTrain(await api("/ui/api/train/stop", { method: "POST" })); }
  catch (e) { $("train-status").textContent = "Stop failed: " + e.message; }
});

$("train-resume").addEventListener("click", async () => {
  try {
    const body = Object.assign(trainBody(), { name: state.trainLast.name });
    showTrain(await api("/ui/api/train/resume", { method: "POST",
                                                  headers: { "Content-Type": "application/json" },
                                                  body: JSON.stringify(body) }));
  } catch (e) { $("train-status").textContent = "Resume failed: " + e.message; }
});

$("train-load").addEventListener("click", async () => {
  const name = state.trainLast.name;
  try {
    if (!state.models.includes(name)) {
      await api("/v1/adapters", { method: "POST", headers: { "Content-Type": "application/json" },
                                  body: JSON.stringify({ name, path: name }) });
    }
    state.checked.add(name);
    await refreshModels();
    showTab($("tab-play"), true);
    say("Loaded " + name + ": it answers beside the others.");
  } catch (e) { $("train-status").textContent = "Load failed: " + e.message; }
});

// ---- model cards: markdown as text nodes (never innerHTML: a card is someone else's file) ----

function renderMarkdown(el, md) {
  el.textContent = "";
  const lines = md.replace(/^---\n[\s\S]*?\n---\n/, "").split("\n");  // YAML front matter out
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (/^```/.test(line)) {
      const pre = document.createElement("pre");
      const body = [];
      for (i++; i < lines.length && !/^```/.test(lines[i]); i++) body.push(lines[i]);
      pre.textContent = body.join("\n");
      el.append(pre);
      i++;
    } else if (/^#{1,6} /.test(line)) {
      const level = Math.min(line.match(/^#+/)[0].length + 2, 6);
      const h = document.createElement("h" + level);
      inline(h, line.replace(/^#+ /, ""));
      el.append(h);
      i++;
    } else if (/^\s*\|/.test(line)) {
      const rows = [];
      for (; i < lines.length && /^\s*\|/.test(lines[i]); i++) rows.push(lines[i]);
      el.append(mdTable(rows));
    } else if (/^\s*[-*] /.test(line)) {
      const ul = document.createElement("ul");
      for (; i < lines.length && /^\s*[-*] /.test(lines[i]); i++) {
        const li = document.createElement("li");
        inline(li, lines[i].replace(/^\s*[-*] /, ""));
        ul.append(li);
      }
      el.append(ul);
    } else if (line.trim()) {
      const p = document.createElement("p");
      const body = [];
      for (; i < lines.length && lines[i].trim() && !/^(```|#{1,6} |\s*\||\s*[-*] )/.test(lines[i]); i++) {
        body.push(lines[i]);
      }
      inline(p, body.join(" "));
      el.append(p);
    } else {
      i++;
    }
  }
}

function mdTable(rows) {
  const cells = (r) => r.trim().replace(/^\||\|$/g, "").split("|").map((c) => c.trim());
  const wrap = document.createElement("div");
  wrap.className = "table-wrap";
  const t = document.createElement("table");
  const head = t.createTHead().insertRow();
  for (const c of cells(rows[0])) {
    const th = document.createElement("th");
    inline(th, c);
    head.append(th);
  }
  const body = t.createTBody();
  for (const r of rows.slice(1).filter((r) => !/^\s*\|?\s*:?-{2,}/.test(r))) {
    const tr = body.insertRow();
    for (const c of cells(r)) inline(tr.insertCell(), c);
  }
  wrap.append(t);
  return wrap;
}

// `code` and **bold** as elements, the rest as text.
function inline(el, text) {
  for (const part of text.split(/(`[^`]+`|\*\*[^*]+\*\*)/)) {
    if (!part) continue;
    if (part.startsWith("`") && part.endsWith("`") && part.length > 1) {
      el.append(Object.assign(document.createElement("code"), { textContent: part.slice(1, -1) }));
    } else if (part.startsWith("**") && part.endsWith("**") && part.length > 3) {
      el.append(Object.assign(document.createElement("strong"), { textContent: part.slice(2, -2) }));
    } else {
      el.append(document.createTextNode(part));
    }
  }
}

// ---- charts (canvas, no library) -------------------------------------------------------

function setupCanvas(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
  canvas.width = Math.round(w * ratio);
  canvas.height = Math.round(h * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.font = "12px system-ui, sans-serif";
  return { ctx, w, h };
}

function ticks(lo, hi, n) {
  const step = Math.pow(10, Math.floor(Math.log10((hi - lo) / n || 1)));
  const nice = [1, 2, 5, 10].map((m) => m * step).find((s) => (hi - lo) / s <= n) || step * 10;
  const out = [];
  for (let v = Math.ceil(lo / nice) * nice; v <= hi + 1e-12; v += nice) out.push(v);
  return out;
}

function lineChart(canvas, lines) {
  const { ctx, w, h } = setupCanvas(canvas);
  const pad = { l: 56, r: 16, t: 28, b: 34 };
  const all = lines.flatMap((s) => s.points);
  if (!all.length) return;
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const padY = (y1 - y0) * 0.05;
  y0 -= padY; y1 += padY;
  const X = (v) => pad.l + (v - x0) / (x1 - x0) * (w - pad.l - pad.r);
  const Y = (v) => h - pad.b - (v - y0) / (y1 - y0) * (h - pad.t - pad.b);
  yGrid(ctx, y0, y1, Y, pad, w);
  ctx.textAlign = "center";
  for (const v of ticks(x0, x1, 8).filter((v) => Number.isInteger(v))) ctx.fillText(String(v), X(v), h - pad.b + 16);
  ctx.fillText("step", (pad.l + w - pad.r) / 2, h - 4);
  let lx = pad.l;
  for (const s of lines) {
    ctx.strokeStyle = ctx.fillStyle = s.color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    s.points.forEach((p, i) => (i ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1]))));
    ctx.stroke();
    if (s.dots || s.points.length === 1) {
      for (const p of s.points) { ctx.beginPath(); ctx.arc(X(p[0]), Y(p[1]), 3.5, 0, 7); ctx.fill(); }
    }
    ctx.fillRect(lx, 10, 14, 4);
    ctx.textAlign = "left";
    ctx.fillText(s.name, lx + 18, 16);
    lx += ctx.measureText(s.name).width + 40;
  }
  ctx.lineWidth = 1;
}

// Horizontal grid lines with their labels on the left, shared by both charts.
function yGrid(ctx, y0, y1, Y, pad, w) {
  ctx.strokeStyle = "#d0d4da";
  ctx.fillStyle = "#333";
  ctx.textAlign = "right";
  for (const v of ticks(y0, y1, 5)) {
    ctx.beginPath(); ctx.moveTo(pad.l, Y(v)); ctx.lineTo(w - pad.r, Y(v)); ctx.stroke();
    ctx.fillText(fmt(v), pad.l - 6, Y(v) + 4);
  }
}

const PALETTE = ["#1f5fbf", "#c2410c", "#15803d", "#7e22ce", "#b45309", "#0e7490", "#be123c"];

function barChart(canvas, rows, metric, models, dsets) {
  const { ctx, w, h } = setupCanvas(canvas);
  const pad = { l: 56, r: 16, t: 28, b: 34 };
  const vals = rows.map((r) => r[metric]).filter((v) => typeof v === "number");
  if (!vals.length) return;
  const y1 = Math.max(...vals, 0) * 1.05 || 1, y0 = Math.min(0, ...vals);
  const Y = (v) => h - pad.b - (v - y0) / (y1 - y0) * (h - pad.t - pad.b);
  yGrid(ctx, y0, y1, Y, pad, w);
  const group = (w - pad.l - pad.r) / dsets.length, bar = group * 0.8 / models.length;
  dsets.forEach((d, i) => {
    ctx.fillStyle = "#333";
    ctx.textAlign = "center";
    ctx.fillText(d, pad.l + group * (i + 0.5), h - pad.b + 16);
    models.forEach((m, j) => {
      const r = rows.find((x) => x.dataset === d && x.model === m);
      if (!r || typeof r[metric] !== "number") return;
      ctx.fillStyle = PALETTE[j % PALETTE.length];
      const x = pad.l + group * i + group * 0.1 + bar * j;
      ctx.fillRect(x, Y(Math.max(r[metric], 0)), bar - 2, Math.abs(Y(r[metric]) - Y(0)));
    });
  });
  let lx = pad.l;
  models.forEach((m, j) => {
    ctx.fillStyle = PALETTE[j % PALETTE.length];
    ctx.fillRect(lx, 8, 12, 10);
    ctx.textAlign = "left";
    ctx.fillText(m, lx + 16, 17);
    lx += ctx.measureText(m).width + 36;
  });
}

// ---- start -----------------------------------------------------------------------------

async function start() {
  try {
    state.info = await api("/ui/api/info");
    $("tab-play").hidden = !state.info.playground;
    $("tab-runs").hidden = !state.info.runs;
    $("tab-train").hidden = !state.info.train;
    if (!state.info.playground) showTab($("tab-runs"), false);
    const lim = state.info.limits;
    if (lim && lim.max_tokens) {
      $("max-tokens").max = String(lim.max_tokens);
      $("max-tokens").title = "this server allows 1 to " + lim.max_tokens +
        (lim.context ? "; prompt + answer at most " + lim.context + " tokens" : "");
      $("max-tokens").value = String(Math.min(Number($("max-tokens").value), lim.max_tokens));
    }
    if (state.info.playground) await Promise.all([refreshModels(), refreshLoadable()]);
    if (state.info.runs) await refreshRuns();
    document.body.dataset.ready = "true";
    say("");
  } catch (e) { say(e.message); }
}

// Models and folders change elsewhere (another tab, a run that finished): look again every 5 s.
setInterval(() => {
  if (!state.info || document.hidden) return;
  if (!$("runs").hidden) refreshRuns();
  if (!$("play").hidden && state.info.playground) {
    Promise.all([refreshModels(), refreshLoadable()]).catch((e) => say(e.message));
  }
}, 5000);
start();
