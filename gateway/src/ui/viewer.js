// sand's execution viewer: lists recent executions and draws one as a timeline of its calls.
//
// Everything an execution holds (grain names, inputs, outputs, what grains printed) is written
// by apps, so it reaches the page only through textContent and attributes, never as markup.
// The API token comes from the URL fragment (`#token=...`, which browsers never send) or a
// form, stays in this tab's sessionStorage, and goes to this gateway's /v1 only.
"use strict";

(function () {
  const TOKEN_KEY = "sand.token";
  const POLL_MS = 500;
  // Workers trace runs in batches after the fact: after an execution ends, its page polls
  // this many more times at most, until every call it knows of has an ended attempt.
  const SETTLE_POLLS = 10;
  const PAGE = 20;

  const $ = (id) => document.getElementById(id);
  let poll = null; // The timer of the next redraw of a running execution.
  let shown = null; // The execution on screen, if one is.
  const open = new Set(); // The rows whose details are open, by "call/attempt".
  let focus = null; // A call whose details the fragment asks to open (`&call=ID`), until drawn.

  // An element with a class and text; children may follow.
  function el(tag, cls, text, ...children) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    for (const c of children) if (c) e.append(c);
    return e;
  }

  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  // The fragment's parameters; a token there is kept and taken out of the address bar.
  function fragment() {
    const params = new URLSearchParams(location.hash.slice(1));
    const given = params.get("token");
    if (given) {
      sessionStorage.setItem(TOKEN_KEY, given);
      params.delete("token");
      const rest = params.toString();
      history.replaceState(null, "", location.pathname + (rest ? "#" + rest : ""));
    }
    return params;
  }

  class Unauthorized extends Error {}

  async function api(path) {
    const headers = { Accept: "application/json" };
    if (token()) headers.Authorization = "Bearer " + token();
    const response = await fetch(path, { headers, cache: "no-store", credentials: "omit" });
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      throw new Error(`${path}: HTTP ${response.status}, not JSON`);
    }
    if (response.status === 401) throw new Unauthorized();
    if (!response.ok) {
      const message = body && body.error ? body.error.message : "";
      throw new Error(`HTTP ${response.status}: ${message}`);
    }
    return body;
  }

  function problem(text) {
    const p = $("problem");
    p.textContent = text || "";
    p.hidden = !text;
  }

  function ready() {
    document.body.dataset.ready = "1";
  }

  function stopPolling() {
    if (poll !== null) clearTimeout(poll);
    poll = null;
    $("live").hidden = true;
  }

  function fail(e) {
    stopPolling();
    if (e instanceof Unauthorized) {
      const refused = Boolean(token());
      sessionStorage.removeItem(TOKEN_KEY);
      $("list-view").hidden = true;
      $("exec-view").hidden = true;
      $("forget").hidden = true;
      $("login").hidden = false;
      problem(refused ? "The gateway refused that token." : "");
      $("token-input").focus();
    } else {
      problem(String(e.message || e));
    }
    ready();
  }

  // Route by the fragment: `#exec=REF` shows one execution (`&call=ID` opens that call's
  // details), anything else the list.
  function route() {
    stopPolling();
    delete document.body.dataset.ready;
    problem("");
    const params = fragment();
    const exec = params.get("exec");
    $("login").hidden = true;
    $("forget").hidden = !token();
    if (exec) {
      $("list-view").hidden = true;
      $("exec-view").hidden = false;
      if (shown !== exec) {
        open.clear();
        for (const id of ["exec-head", "axis", "timeline"]) $(id).replaceChildren();
      }
      shown = exec;
      focus = params.get("call");
      loadExecution(exec);
    } else {
      shown = null;
      $("exec-view").hidden = true;
      $("list-view").hidden = false;
      loadList(null);
    }
  }

  // ---- Times ----

  function ms(n) {
    if (n < 1000) return `${Math.round(n)} ms`;
    if (n < 60000) return `${(n / 1000).toFixed(n < 10000 ? 2 : 1)} s`;
    return `${Math.floor(n / 60000)} min ${Math.round((n % 60000) / 1000)} s`;
  }

  function clock(epochMs) {
    const d = new Date(epochMs);
    const pad = (n, w) => String(n).padStart(w, "0");
    return `${d.toLocaleDateString()} ${pad(d.getHours(), 2)}:${pad(d.getMinutes(), 2)}:` +
      `${pad(d.getSeconds(), 2)}.${pad(d.getMilliseconds(), 3)}`;
  }

  // ---- The list ----

  let older = null; // The `before` of the next page.

  async function loadList(before) {
    const query = new URLSearchParams({ limit: String(PAGE) });
    if (before) query.set("before", before);
    try {
      const page = await api("/v1/executions?" + query);
      const body = $("executions").tBodies[0];
      if (!before) body.replaceChildren();
      for (const e of page.executions) body.append(listRow(e));
      older = page.next;
      $("older").hidden = !older;
      $("no-executions").hidden = body.rows.length > 0;
      $("forget").hidden = !token();
      ready();
    } catch (e) {
      fail(e);
    }
  }

  function statusBadge(status) {
    return el("span", "status " + status, status);
  }

  function listRow(e) {
    const link = el("a", "ref", e.execution);
    link.href = "#exec=" + encodeURIComponent(e.execution);
    const took = e.ended_ms ? ms(e.ended_ms - e.accepted_ms) : "";
    const row = el("tr", "execution");
    row.dataset.execution = e.execution;
    row.append(
      el("td", "", null, link),
      el("td", "app", e.app),
      el("td", "", null, statusBadge(e.status)),
      el("td", "when", clock(e.accepted_ms)),
      el("td", "num", took),
      el("td", "num", e.calls),
    );
    return row;
  }

  // ---- One execution ----

  // Whether every call the trace names (as traced, or as emitted) has an ended attempt.
  function settled(calls) {
    const ended = new Set(calls.filter((c) => typeof c.ended_ms === "number").map((c) => c.call));
    return calls.every((c) => ended.has(c.call) && (c.emitted || []).every((e) => ended.has(e)));
  }

  async function loadExecution(ref, settlePolls = 0) {
    try {
      const exec = await api("/v1/executions/" + encodeURIComponent(ref));
      if (shown !== ref) return; // The reader moved on meanwhile.
      drawExecution(exec);
      const running = exec.status === "running";
      const calls = Array.isArray(exec.calls) ? exec.calls : [];
      $("live").hidden = !running;
      if (running) {
        poll = setTimeout(() => loadExecution(ref), POLL_MS);
      } else if (!settled(calls) && settlePolls < SETTLE_POLLS) {
        poll = setTimeout(() => loadExecution(ref, settlePolls + 1), POLL_MS);
      } else {
        stopPolling();
      }
      ready();
    } catch (e) {
      if (shown === ref) fail(e);
    }
  }

  // A value as a reader wants it: JSON pretty-printed when it parses whole.
  function pretty(text, cut) {
    if (cut) return text;
    try {
      return JSON.stringify(JSON.parse(text), null, 2);
    } catch (_) {
      return text;
    }
  }

  function drawExecution(exec) {
    const head = $("exec-head");
    const title = el("h1", "", null, el("span", "app", exec.app), " ", statusBadge(exec.status));
    const ref = el("p", "ref", exec.execution);
    head.replaceChildren(title, ref);
    if (exec.status === "succeeded") {
      head.append(el("h2", "", "Output"),
        el("pre", "value exec-output", pretty(JSON.stringify(exec.output), false)));
    } else if (exec.status === "failed" && exec.error) {
      head.append(el("h2", "", "Error"),
        el("pre", "value exec-error", `${exec.error.kind}: ${exec.error.message}`));
    }
    const calls = Array.isArray(exec.calls) ? exec.calls : [];
    head.append(el("p", "quiet", `${calls.length} call attempt${calls.length === 1 ? "" : "s"}`));
    drawTimeline(calls, exec.status === "running");
  }

  // The rows in tree order: each call under the one that emitted it, in emission order, its
  // attempts together; calls whose parent is not traced (yet) start trees of their own.
  function order(calls) {
    const parent = new Map();
    const attempts = new Map();
    for (const c of calls) {
      for (const child of c.emitted || []) parent.set(child, c.call);
      if (!attempts.has(c.call)) attempts.set(c.call, []);
      attempts.get(c.call).push(c);
    }
    const start = (c) => c.dispatched_ms ?? c.started_ms ?? Infinity;
    for (const list of attempts.values()) {
      list.sort((a, b) => a.attempt - b.attempt || start(a) - start(b));
    }
    const children = (id) => {
      const seen = new Set();
      const out = [];
      for (const c of attempts.get(id) || []) {
        for (const child of c.emitted || []) {
          if (!seen.has(child) && attempts.has(child)) {
            seen.add(child);
            out.push(child);
          }
        }
      }
      return out;
    };
    const roots = [...attempts.keys()].filter((id) => !attempts.has(parent.get(id)));
    roots.sort((a, b) => start(attempts.get(a)[0]) - start(attempts.get(b)[0]));
    const rows = [];
    const placed = new Set();
    const visit = (id, depth) => {
      if (placed.has(id)) return;
      placed.add(id);
      for (const c of attempts.get(id)) rows.push({ call: c, depth });
      for (const child of children(id)) visit(child, depth + 1);
    };
    for (const id of roots) visit(id, 0);
    // A cycle cannot happen (ids derive from parents), but nothing is left out if one did.
    for (const id of attempts.keys()) visit(id, 0);
    return { rows, attempts };
  }

  function drawTimeline(calls, running) {
    const { rows, attempts } = order(calls);
    if (focus && attempts.has(focus)) {
      for (const c of attempts.get(focus)) open.add(`${c.call}/${c.attempt}`);
      focus = null;
    }
    // A loop, not Math.min(...times): an execution may have more calls than a call has
    // arguments.
    let t0 = Infinity;
    let t1 = -Infinity;
    for (const c of calls) {
      for (const t of [c.dispatched_ms, c.started_ms, c.ended_ms]) {
        if (typeof t === "number") {
          t0 = Math.min(t0, t);
          t1 = Math.max(t1, t);
        }
      }
    }
    if (t0 === Infinity) [t0, t1] = [0, 1];
    if (running) t1 = Math.max(t1, Date.now());
    const span = Math.max(t1 - t0, 1);
    const pct = (t) => `${(((t - t0) / span) * 100).toFixed(3)}%`;
    const width = (a, b) => `${((Math.max(b - a, 0) / span) * 100).toFixed(3)}%`;

    const axis = $("axis");
    axis.replaceChildren(el("div", "axis-label", ""));
    const ticks = el("div", "axis-track");
    for (let i = 0; i <= 4; i++) {
      const tick = el("span", "tick", i === 0 ? "0" : ms((span * i) / 4));
      tick.style.left = `${i * 25}%`;
      ticks.append(tick);
    }
    axis.append(ticks);

    const grainOf = (id) => {
      const list = attempts.get(id);
      return list ? list[0].grain : id;
    };
    const timeline = $("timeline");
    const list = [];
    for (const { call: c, depth } of rows) {
      list.push(callRow(c, depth, running, t1, { pct, width, grainOf }));
    }
    timeline.replaceChildren(...list);
    if (!rows.length) timeline.append(el("p", "quiet", "No call traced yet."));
  }

  function callRow(c, depth, running, now, draw) {
    const key = `${c.call}/${c.attempt}`;
    const failed = Boolean(c.error);
    const ended = typeof c.ended_ms === "number";
    const row = el("details", "call " + c.via + (failed ? " failed" : ""));
    row.dataset.call = c.call;
    row.dataset.grain = c.grain;
    row.dataset.via = c.via;
    row.dataset.reason = c.reason;
    row.open = open.has(key);
    row.addEventListener("toggle", () => {
      if (row.open) open.add(key);
      else open.delete(key);
    });

    const label = el("div", "label");
    label.style.paddingLeft = `${0.4 + depth * 1.1}em`;
    if (depth > 0) label.append(el("span", "edge", "└"));
    label.append(el("span", "grain", c.grain));
    const worker = el("span", "worker", `w${c.worker}`);
    worker.title = `ran on worker ${c.worker}`;
    label.append(worker);
    label.append(el("span", "badge via " + c.via, c.via));
    if (c.reason === "recovery" || c.recovery) label.append(el("span", "badge recovery", "recovery"));
    if (c.reason === "retry") label.append(el("span", "badge retry", "retry"));
    if (failed) label.append(el("span", "badge error", c.error.kind));
    if (!ended) {
      const state = typeof c.started_ms === "number" || running ? "running" : "no report";
      label.append(el("span", "badge pending", state));
    }
    const took = ended && typeof c.started_ms === "number" ? ms(c.ended_ms - c.started_ms) : "";
    label.append(el("span", "took", took));

    const track = el("div", "track");
    const start = c.started_ms;
    if (typeof c.dispatched_ms === "number") {
      const waitEnd = typeof start === "number" ? Math.max(start, c.dispatched_ms) : now;
      const wait = el("span", "wait");
      wait.style.left = draw.pct(c.dispatched_ms);
      wait.style.width = draw.width(c.dispatched_ms, waitEnd);
      wait.title = "dispatched by the gateway, not yet started";
      track.append(wait);
    }
    if (typeof start === "number") {
      const bar = el("span", "run");
      bar.style.left = draw.pct(start);
      bar.style.width = draw.width(start, ended ? c.ended_ms : now);
      track.append(bar);
    }
    const summary = el("summary", "", null, label, track);
    row.append(summary, details(c, draw.grainOf));
    return row;
  }

  function field(name, value) {
    return [el("dt", "", name), el("dd", "", value)];
  }

  function block(name, cls, text, note) {
    const wrap = el("div", "block " + cls, null, el("h3", "", name));
    if (note) wrap.firstChild.append(el("span", "note", note));
    wrap.append(text ? el("pre", "value", text) : el("pre", "value empty", "(nothing)"));
    return wrap;
  }

  function details(c, grainOf) {
    const box = el("div", "details");
    const facts = el("dl", "facts");
    const times = [];
    if (typeof c.dispatched_ms === "number") times.push(["dispatched", clock(c.dispatched_ms)]);
    if (typeof c.started_ms === "number") times.push(["started", clock(c.started_ms)]);
    if (typeof c.ended_ms === "number") times.push(["ended", clock(c.ended_ms)]);
    for (const [name, value] of [
      ["call", c.call],
      ["attempt", c.attempt],
      ["worker", c.worker],
      ["via", c.via],
      ["reason", c.reason],
      ...times,
    ]) {
      facts.append(...field(name, value));
    }
    box.append(facts);
    if (c.error) {
      box.append(block("error", "error", `${c.error.kind}: ${c.error.message}`));
    }
    const cut = "cut: only the start is kept";
    box.append(block("input", "input", pretty(c.input || "", c.input_cut), c.input_cut ? cut : ""));
    if (typeof c.output === "string") {
      box.append(block("output", "output", pretty(c.output, c.output_cut), c.output_cut ? cut : ""));
    } else if ((c.emitted || []).length) {
      const to = c.emitted.map(grainOf).join(", ");
      box.append(block("output", "output passed", `passed on to ${to}`));
    } else {
      box.append(block("output", "output none", c.error ? "none: it failed" : "none yet"));
    }
    box.append(block("stdout", "stdout", c.stdout || ""));
    box.append(block("stderr", "stderr", c.stderr || ""));
    return box;
  }

  // ---- Wiring ----

  document.addEventListener("DOMContentLoaded", () => {
    $("login").addEventListener("submit", (event) => {
      event.preventDefault();
      const given = $("token-input").value.trim();
      if (given) sessionStorage.setItem(TOKEN_KEY, given);
      $("token-input").value = "";
      route();
    });
    $("forget").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      route();
    });
    $("refresh").addEventListener("click", () => loadList(null));
    $("older").addEventListener("click", () => loadList(older));
    window.addEventListener("hashchange", route);
    route();
  });
})();
