/* tokiwa dashboard: one page, hash routes (#/runs, #/runs/<id>, #/workers ...), polling the
   JSON under ./api/ every 1.5 s. Plain DOM building (textContent only: no data is ever parsed
   as HTML). Requeue and purge send the bearer token kept in sessionStorage. */
"use strict";
(function () {
  const POLL_MS = 1500;
  const TOKEN_KEY = "tokiwa.dashboard.token";
  const RUN_STATUSES = ["running", "succeeded", "failed", "cancelled"];
  const NODE_W = 184, NODE_H = 58, GAP_X = 64, GAP_Y = 20, PAD = 14;

  let session = { read_only: true, authorized: false };
  let generation = 0;
  let timer = null;
  let lastOk = 0;
  let lastRendered = null;  // the JSON last drawn: an unchanged answer is not redrawn
  const ui = { selectedNode: null, confirmPurge: false, openDead: {}, deadEvents: {} };

  // -- DOM helpers -----------------------------------------------------------------------------
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    append(el, children);
    return el;
  }
  function s(tag, attrs, ...children) {
    const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
    setAttrs(el, attrs);
    append(el, children);
    return el;
  }
  function setAttrs(el, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (k === "text") el.textContent = String(v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
  }
  function append(el, children) {
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    }
  }
  function fill(el, ...children) { el.replaceChildren(); append(el, children); return el; }
  const $ = (sel) => document.querySelector(sel);

  // -- formatting ------------------------------------------------------------------------------
  function fmtTime(epochS) {
    if (!epochS) return "-";
    const d = new Date(epochS * 1000);
    return d.toLocaleString(undefined, { hour12: false });
  }
  function fmtMs(ms) {
    if (ms === null || ms === undefined) return "-";
    if (ms < 1) return ms.toFixed(2) + " ms";
    if (ms < 1000) return Math.round(ms) + " ms";
    if (ms < 60000) return (ms / 1000).toFixed(2) + " s";
    return (ms / 60000).toFixed(1) + " min";
  }
  function fmtAge(s) {
    if (s === null || s === undefined) return "-";
    if (s < 60) return s.toFixed(1) + " s ago";
    if (s < 3600) return Math.round(s / 60) + " min ago";
    return (s / 3600).toFixed(1) + " h ago";
  }
  function fmtIn(s) {
    if (s === null || s === undefined) return "-";
    const a = Math.abs(s);
    const t = a < 60 ? a.toFixed(1) + " s" : a < 3600 ? Math.round(a / 60) + " min" : (a / 3600).toFixed(1) + " h";
    return s >= 0 ? "in " + t : t + " overdue";
  }
  function dash(v) { return v === null || v === undefined || v === "" ? "-" : v; }
  function errorText(err) {
    if (!err) return "";
    if (typeof err !== "object") return String(err);
    let text = (err.name ? err.name + ": " : "") + (err.message || "");
    if (err.traceback) text += "\n\n" + err.traceback;
    let cause = err.cause, depth = 0;
    while (cause && depth < 10) {
      text += "\n\ncaused by " + (cause.name ? cause.name + ": " : "") + (cause.message || "");
      if (cause.traceback) text += "\n" + cause.traceback;
      cause = cause.cause; depth++;
    }
    return text;
  }
  function statusPill(status) { return h("span", { class: "status " + (status || "pending"), text: status || "pending" }); }
  function chips(items, cls) { return h("span", { class: "chips " + (cls || "") }, (items || []).map((x) => h("span", { text: x }))); }
  function table(id, headers, rows, empty) {
    if (!rows.length) return h("p", { class: "muted empty", id: id + "-empty", text: empty });
    return h("table", { id },
      h("thead", {}, h("tr", {}, headers.map((x) => h("th", { class: x.endsWith("#") ? "num" : null, text: x.replace(/#$/, "") })))),
      h("tbody", {}, rows));
  }

  // -- HTTP ------------------------------------------------------------------------------------
  function token() { return sessionStorage.getItem(TOKEN_KEY); }
  async function api(path, options) {
    const opts = options || {};
    const headers = { Accept: "application/json" };
    const t = token();
    if (t) headers.Authorization = "Bearer " + t;
    if (opts.body !== undefined) headers["Content-Type"] = "application/json";
    const res = await fetch("api/" + path, {
      method: opts.method || "GET", headers, cache: "no-store",
      body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
    });
    let data = null;
    try { data = await res.json(); } catch (e) { data = null; }
    if (!res.ok) {
      const err = new Error((data && data.error) || res.status + " " + res.statusText);
      err.status = res.status;
      throw err;
    }
    return data;
  }

  function flash(text, isError) {
    const el = $("#flash");
    el.textContent = text;
    el.className = isError ? "error" : "";
    el.hidden = false;
    clearTimeout(flash.timer);
    flash.timer = setTimeout(() => { el.hidden = true; }, 8000);
  }

  async function refreshSession() {
    try { session = await api("session"); } catch (e) { /* keep the last one */ }
    const mode = $("#mode");
    if (session.read_only) { mode.textContent = "read-only (the server has no token)"; mode.className = "ro"; }
    else if (session.authorized) { mode.textContent = "token accepted: requeue and purge enabled"; mode.className = "rw"; }
    else { mode.textContent = "read-only until you give the token"; mode.className = "ro"; }
    $("#forget-token").hidden = !token();
  }

  function askToken() {
    const dialog = $("#token-dialog");
    const input = $("#token-input");
    input.value = "";
    return new Promise((resolve) => {
      const done = () => {
        dialog.removeEventListener("close", done);
        const value = dialog.returnValue === "ok" ? input.value.trim() : "";
        if (value) sessionStorage.setItem(TOKEN_KEY, value);
        resolve(value || null);
      };
      dialog.addEventListener("close", done);
      dialog.returnValue = "";
      dialog.showModal();
      input.focus();
    });
  }

  /* POST a mutating action with the token (asked for when there is none). Returns the JSON
     answer, or null when it did not happen (read-only, no token given, refused). */
  async function mutate(path, body) {
    if (session.read_only) {
      flash("read-only: the server has no token, so requeue and purge are off (start it with --api-token)", true);
      return null;
    }
    if (!token() && !(await askToken())) {
      flash("nothing changed: no token given (the dashboard stays read-only)", true);
      return null;
    }
    try {
      return await api(path, { method: "POST", body: body || {} });
    } catch (e) {
      if (e.status === 401) {
        sessionStorage.removeItem(TOKEN_KEY);
        flash("refused (401): the token is wrong; nothing changed", true);
      } else if (e.status === 403) {
        flash("refused (403): " + e.message, true);
      } else {
        flash("failed: " + e.message, true);
      }
      return null;
    } finally {
      refreshSession();
    }
  }

  // -- pages -----------------------------------------------------------------------------------
  function hashQuery(q) {
    const out = {};
    new URLSearchParams(q || "").forEach((v, k) => { out[k] = v; });
    return out;
  }

  const pages = {};

  pages.runs = {
    title: "Runs",
    enter(root, route) {
      const q = route.query;
      const status = h("select", { id: "status-filter", onchange: () => this.go() },
        h("option", { value: "", text: "any status" }),
        RUN_STATUSES.map((x) => h("option", { value: x, text: x, selected: q.status === x })));
      const workflow = h("select", { id: "workflow-filter", onchange: () => this.go() },
        h("option", { value: "", text: "any workflow" }));
      if (q.workflow) workflow.appendChild(h("option", { value: q.workflow, text: q.workflow, selected: true }));
      root.append(h("h2", { text: "Runs" }),
        h("div", { class: "filters" }, h("label", {}, "Status ", status), h("label", {}, "Workflow ", workflow),
          h("span", { class: "muted", id: "runs-count" })),
        h("div", { id: "page-body" }));
      this.query = q;
    },
    go() {
      const p = new URLSearchParams();
      const st = $("#status-filter").value, wf = $("#workflow-filter").value;
      if (st) p.set("status", st);
      if (wf) p.set("workflow", wf);
      location.hash = "#/runs" + (p.toString() ? "?" + p.toString() : "");
    },
    load() {
      const p = new URLSearchParams({ limit: "100" });
      if (this.query.status) p.set("status", this.query.status);
      if (this.query.workflow) p.set("workflow", this.query.workflow);
      return api("runs?" + p.toString());
    },
    render(data, body) {
      const st = $("#status-filter");
      const known = new Set(Array.from(st.options).map((o) => o.value));
      for (const x of data.statuses || []) if (!known.has(x)) st.appendChild(h("option", { value: x, text: x, selected: this.query.status === x }));
      const select = $("#workflow-filter");
      const have = new Set(Array.from(select.options).map((o) => o.value));
      for (const name of data.workflows) if (!have.has(name)) select.appendChild(h("option", { value: name, text: name }));
      $("#runs-count").textContent = data.runs.length + " run(s), newest first";
      const rows = data.runs.map((r) => h("tr", { "data-run-id": r.run_id, "data-status": r.status },
        h("td", { class: "mono" }, h("a", { href: "#/runs/" + encodeURIComponent(r.run_id), text: r.run_id })),
        h("td", { text: dash(r.workflow) }),
        h("td", {}, statusPill(r.status)),
        h("td", { text: fmtTime(r.started_at) }),
        h("td", { class: "num", text: fmtMs(r.duration_ms) }),
        h("td", {}, Object.entries(r.task_summary || {}).map(([n, t]) =>
          h("span", { class: "status " + (t.state || "pending"), title: n + ": " + t.state + ", " + (t.attempts || 0) + " attempt(s)", text: n }), " ")),
        h("td", { class: "error-cell", text: r.error ? errorText(r.error).split("\n")[0] : "" })));
      fill(body, table("runs-table", ["Run", "Workflow", "Status", "Started", "Duration#", "Nodes", "Error"], rows,
        "no runs" + (this.query.status || this.query.workflow ? " match these filters" : " recorded yet")));
    },
  };

  function dagSvg(graph) {
    const cols = Math.max(graph.columns, 1), rows = Math.max(graph.rows, 1);
    const width = PAD * 2 + cols * NODE_W + (cols - 1) * GAP_X;
    const height = PAD * 2 + rows * NODE_H + (rows - 1) * GAP_Y;
    const pos = {};
    for (const n of graph.nodes) {
      pos[n.name] = { x: PAD + n.depth * (NODE_W + GAP_X), y: PAD + n.row * (NODE_H + GAP_Y) };
    }
    const edges = [];
    for (const n of graph.nodes) {
      for (const d of n.depends_on || []) {
        const a = pos[d], b = pos[n.name];
        if (!a || !b) continue;
        const x1 = a.x + NODE_W, y1 = a.y + NODE_H / 2, x2 = b.x - 4, y2 = b.y + NODE_H / 2, mx = (x1 + x2) / 2;
        edges.push(s("path", { class: "edge", "data-from": d, "data-to": n.name, "marker-end": "url(#arrow)",
          d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}` }));
      }
    }
    const nodes = graph.nodes.map((n) => {
      const p = pos[n.name];
      const label = n.name.length > 24 ? n.name.slice(0, 23) + "…" : n.name;
      const attempts = (n.attempts || 0) + (n.attempts === 1 ? " attempt" : " attempts");
      return s("g", { class: "node st-" + n.status + (ui.selectedNode === n.name ? " selected" : ""),
        "data-node": n.name, "data-status": n.status, transform: `translate(${p.x},${p.y})`,
        onclick: () => { ui.selectedNode = n.name; rerender(); } },
        s("title", { text: `${n.name}: ${n.status}, ${attempts}, ${fmtMs(n.duration_ms)}` +
          (n.depends_on.length ? `\ndepends on ${n.depends_on.join(", ")}` : "") + (n.error ? "\n" + errorText(n.error) : "") }),
        s("rect", { width: NODE_W, height: NODE_H, rx: 8, ry: 8 }),
        s("text", { x: 10, y: 20, text: label }),
        s("text", { class: "sub", x: 10, y: 36, text: n.status + " · " + attempts }),
        s("text", { class: "sub", x: 10, y: 50, text: fmtMs(n.duration_ms) }));
    });
    return s("svg", { class: "dag", id: "dag", width, height, viewBox: `0 0 ${width} ${height}`,
      "data-edges-from": graph.edges_from },
      s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto" },
        s("path", { d: "M0,0 L10,5 L0,10 z", fill: "#8b95a8" }))),
      edges, nodes);
  }

  pages.run = {
    title: "Run",
    enter(root, route) {
      this.runId = route.arg;
      if (ui.runId !== route.arg) { ui.selectedNode = null; ui.runId = route.arg; }
      root.append(h("p", {}, h("a", { href: "#/runs", text: "← all runs" })),
        h("h2", {}, "Run ", h("span", { class: "mono", id: "run-id", text: route.arg })),
        h("div", { id: "page-body" }));
    },
    load() { return api("runs/" + encodeURIComponent(this.runId)); },
    render(r, body) {
      const logsEl = $("#logs");
      const atBottom = !logsEl || logsEl.scrollTop + logsEl.clientHeight >= logsEl.scrollHeight - 4;
      const graph = r.graph;
      const failed = graph.nodes.filter((n) => n.error && (n.status === "failed" || n.status === "cancelled"));
      const selected = graph.nodes.find((n) => n.name === ui.selectedNode);
      const meta = [["Workflow", dash(r.workflow_name)], ["Type", dash(r.workflow_type)], ["Status", statusPill(r.status)],
        ["Started", fmtTime(r.started_at)], ["Finished", fmtTime(r.finished_at)], ["Duration", fmtMs(r.duration_ms)]];
      if (r.conversation_id) meta.push(["Conversation", r.conversation_id]);
      if (r.parent_run_id) meta.push(["Parent run", h("a", { href: "#/runs/" + encodeURIComponent(r.parent_run_id), text: r.parent_run_id })]);
      if (r.cancelled_by || r.cancelled_at) meta.push(["Cancelled", dash(r.cancelled_by) + " at " + fmtTime(r.cancelled_at)]);
      const note = graph.edges_from === "timeline"
        ? h("p", { class: "muted", id: "dag-note", text: "The run record has no edges (no depends_on per node) and this server does not have the workflow: columns follow the order the nodes started in, without arrows." })
        : h("p", { class: "muted", id: "dag-note", text: "Edges from " + (graph.edges_from === "record" ? "the run record" : "the registered workflow " + r.workflow_name) + "; columns are dependency depth. Click a node for its details." });
      const legend = h("p", { class: "legend" }, ["pending", "running", "succeeded", "failed", "skipped", "cancelled"].map((st) =>
        h("span", {}, h("i", { class: "status " + st }), st)));
      const detail = selected ? h("div", { class: "panel", id: "node-detail" },
        h("h3", {}, "Node ", h("span", { class: "mono", text: selected.name }), " ", statusPill(selected.status)),
        h("dl", { class: "kv" },
          h("dt", { text: "attempts" }), h("dd", { text: selected.attempts }),
          h("dt", { text: "duration" }), h("dd", { text: fmtMs(selected.duration_ms) }),
          h("dt", { text: "started" }), h("dd", { text: fmtTime(selected.started_at) }),
          h("dt", { text: "finished" }), h("dd", { text: fmtTime(selected.finished_at) }),
          h("dt", { text: "depends on" }), h("dd", { text: selected.depends_on.join(", ") || "-" }),
          h("dt", { text: "output" }), h("dd", { class: "mono", text: JSON.stringify((r.nodes[selected.name] || {}).output) })),
        selected.error ? h("pre", { class: "error", text: errorText(selected.error) + (selected.traceback ? "\n\n" + selected.traceback : "") }) : null) : null;
      const errors = [];
      if (r.error) errors.push(h("div", { id: "run-error" }, h("h3", { text: "Run error" }), h("pre", { class: "error", text: errorText(r.error) })));
      if (failed.length) {
        errors.push(h("h3", { text: "Node errors" }));
        for (const n of failed) {
          errors.push(h("div", { class: "node-error", "data-node": n.name },
            h("strong", { class: "mono", text: n.name }), " ", statusPill(n.status), " after ", String(n.attempts), " attempt(s)",
            h("pre", { class: "error", text: errorText(n.error) + (n.traceback ? "\n\n" + n.traceback : "") })));
        }
        if (!failed.some((n) => n.traceback || (n.error && n.error.traceback))) {
          errors.push(h("p", { class: "muted", text: "The record keeps each error's name, message and cause, not its traceback." }));
        }
      }
      const timeline = (r.timeline || []).map((t) => h("tr", {},
        h("td", { text: fmtTime(t.timestamp) + "." + String(Math.floor(((t.timestamp || 0) % 1) * 1000)).padStart(3, "0") }),
        h("td", { text: t.type }), h("td", { class: "mono", text: dash(t.node) }), h("td", { text: dash(t.attempt) }),
        h("td", { text: t.error ? errorText(t.error).split("\n")[0] : t.duration_ms !== undefined ? fmtMs(t.duration_ms) : dash(t.reason) })));
      fill(body, 
        h("div", { class: "panel" }, h("dl", { class: "kv", id: "run-meta" }, meta.map(([k, v]) => [h("dt", { text: k }), h("dd", {}, v)]))),
        h("h3", { text: "DAG" }), legend, h("div", { class: "dag-wrap" }, dagSvg(graph)), note, detail, errors,
        h("h3", { text: "Logs (" + (r.logs || []).length + " lines)" }),
        (r.logs || []).length ? h("pre", { class: "logs", id: "logs", text: r.logs.join("\n") }) : h("p", { class: "muted", id: "logs-empty", text: "no log lines" }),
        h("details", {}, h("summary", { text: "Timeline (" + timeline.length + " entries)" }),
          table("timeline-table", ["Time", "Type", "Node", "Attempt", "Detail"], timeline, "no timeline")));
      const newLogs = $("#logs");
      if (newLogs) newLogs.scrollTop = atBottom ? newLogs.scrollHeight : (logsEl ? logsEl.scrollTop : 0);
    },
  };

  pages.workers = {
    title: "Workers",
    enter(root) { root.append(h("h2", { text: "Workers" }), h("div", { id: "page-body" })); },
    load() { return api("workers"); },
    render(rows, body) {
      const live = rows.filter((w) => !w.stale).length;
      const trs = rows.map((w) => h("tr", { "data-worker-id": w.id, class: w.stale ? "stale" : null },
        h("td", { class: "mono", text: w.id }), h("td", { text: dash(w.host) }), h("td", { class: "num", text: dash(w.pid) }),
        h("td", { text: dash(w.mode) }),
        h("td", {}, w.stale ? h("span", { class: "flag bad", text: "stale" }) : h("span", { class: "flag ok", text: "live" })),
        h("td", { class: "heartbeat", text: fmtAge(w.age_s) }),
        h("td", { class: "num", text: dash(w.in_flight) }), h("td", { class: "num", text: dash(w.processed) }),
        h("td", { class: "num", text: dash(w.failed) }), h("td", { class: "num", text: dash(w.concurrency) }),
        h("td", { text: fmtTime(w.started) }),
        h("td", { class: "groups" }, chips(w.groups)), h("td", {}, chips(w.workflows))));
      fill(body, h("p", { class: "muted", text: `${live} live, ${rows.length - live} stale (a heartbeat older than three intervals)` }),
        table("workers-table", ["Worker", "Host", "PID#", "Mode", "State", "Heartbeat", "In flight#", "Processed#", "Failed#",
          "Concurrency#", "Started", "Groups it reads", "Workflows"], trs, "no worker heartbeats: no worker runs on this namespace"));
    },
  };

  pages.streams = {
    title: "Streams",
    enter(root) { root.append(h("h2", { text: "Streams and consumer groups" }), h("div", { id: "page-body" })); },
    load() { return api("streams"); },
    render(data, body) {
      const parts = [];
      if (data.waiting.length) {
        parts.push(h("div", { class: "banner", id: "waiting-banner" },
          `${data.waiting.length} group(s) have work and no live worker reads them: `, chips(data.waiting),
          " Their events wait (they are not lost) until a worker with that registration runs."));
      }
      for (const st of data.streams) {
        const groups = st.groups.map((g) => h("tr", { "data-group": g.name, class: g.waiting ? "waiting" : null },
          h("td", { class: "mono", text: g.name }),
          h("td", { text: g.kind ? g.kind + ": " + dash(g.route) : "-" }),
          h("td", { class: "num lag", text: dash(g.lag) }), h("td", { class: "num pending", text: g.pending }),
          h("td", { class: "num", text: dash(g.live_workers) }),
          h("td", {}, g.consumers.map((c) => h("span", { class: "chips" }, h("span", { text: `${c.name}: ${c.pending} pending, idle ${fmtMs(c.idle_ms)}` })))),
          h("td", { class: "mono", text: dash(g.last_delivered) }),
          h("td", {}, g.waiting ? h("span", { class: "flag warn", text: "waiting: no live worker" })
            : g.live_workers === undefined ? "" : h("span", { class: "flag ok", text: "read" }))));
        parts.push(h("div", { class: "panel stream", "data-stream": st.stream },
          h("h3", {}, h("span", { class: "mono", text: st.stream }), st.exists ? "" : " (does not exist yet)"),
          h("dl", { class: "kv" }, h("dt", { text: "length" }), h("dd", { class: "length", text: st.length }),
            h("dt", { text: "first id" }), h("dd", { class: "mono", text: dash(st.first_id) }),
            h("dt", { text: "last id" }), h("dd", { class: "mono", text: dash(st.last_id) })),
          st.groups.length ? h("h3", { text: "Consumer groups (one per route)" }) : null,
          table(st.stream === data.streams[0].stream ? "groups-table" : "dead-groups-table",
            ["Group", "Route", "Lag#", "Pending#", "Live workers#", "Consumers", "Last delivered", "State"], groups,
            "no consumer group")));
      }
      fill(body, ...parts);
    },
  };

  async function showDead(id) {
    if (ui.openDead[id]) { delete ui.openDead[id]; rerender(); return; }
    ui.openDead[id] = true;
    try { ui.deadEvents[id] = await api("dead/" + encodeURIComponent(id)); } catch (e) { ui.deadEvents[id] = { error: e.message }; }
    rerender();
  }

  async function requeue(ids) {
    const res = await mutate("dead/requeue", ids ? { ids } : { all: true });
    if (res) {
      const done = res.requeued.filter((r) => r.stream_id);
      flash(done.length ? "requeued " + done.map((r) => r.dead_id + " → " + r.stream_id).join(", ")
        : "nothing requeued (already gone)", !done.length);
    }
    rerender();
  }

  async function purge() {
    ui.confirmPurge = false;
    const res = await mutate("dead/purge", {});
    if (res) flash("purged " + res.purged + " dead letter(s)");
    rerender();
  }

  pages.dead = {
    title: "Dead letters",
    enter(root) { root.append(h("h2", { text: "Dead letters" }), h("div", { id: "page-body" })); },
    load() { return api("dead?limit=200"); },
    render(rows, body) {
      const ro = session.read_only;
      const why = ro ? "read-only: the server has no token" : null;
      const toolbar = h("div", { class: "toolbar" },
        h("button", { id: "requeue-all", type: "button", disabled: ro || !rows.length, title: why, onclick: () => requeue(null), text: "Requeue all" }),
        ui.confirmPurge
          ? h("span", { class: "confirm" }, `Delete all ${rows.length} dead letter(s)?`,
            h("button", { id: "purge-yes", class: "danger", type: "button", onclick: purge, text: "Purge" }),
            h("button", { id: "purge-no", type: "button", onclick: () => { ui.confirmPurge = false; rerender(); }, text: "Keep" }))
          : h("button", { id: "purge", class: "danger", type: "button", disabled: ro || !rows.length, title: why,
            onclick: () => { ui.confirmPurge = true; rerender(); }, text: "Purge…" }),
        h("span", { class: "muted", text: rows.length + " dead letter(s), newest first. Fix the handler first, then requeue: the event keeps its id and gets a fresh delivery count." }));
      const trs = [];
      for (const d of rows) {
        trs.push(h("tr", { "data-dead-id": d.dead_id },
          h("td", { class: "mono", text: d.dead_id }), h("td", { text: dash(d.type) }), h("td", { class: "mono", text: dash(d.event_id) }),
          h("td", { class: "mono", text: dash(d.group) }), h("td", { text: dash(d.reason) }), h("td", { class: "num", text: dash(d.deliveries) }),
          h("td", { text: fmtTime(d.failed_at) }), h("td", { class: "error-cell", text: dash(d.error) }),
          h("td", {}, h("button", { class: "requeue", type: "button", disabled: ro, title: why, onclick: () => requeue([d.dead_id]), text: "Requeue" }),
            " ", h("button", { class: "show", type: "button", onclick: () => showDead(d.dead_id), text: ui.openDead[d.dead_id] ? "Hide" : "Show" }))));
        if (ui.openDead[d.dead_id]) {
          const ev = ui.deadEvents[d.dead_id];
          trs.push(h("tr", { class: "dead-event" }, h("td", { colspan: 9 },
            h("pre", { class: "mono", text: ev ? JSON.stringify(ev.event || ev, null, 2) : "loading…" }))));
        }
      }
      fill(body, ro ? h("div", { class: "banner", id: "readonly-banner", text: "Read-only: this server has no token, so requeue and purge are off. Start it with --api-token to enable them." }) : null,
        toolbar, table("dead-table", ["Dead id", "Type", "Event id", "Group", "Reason", "Deliveries#", "Failed at", "Error", ""], trs, "no dead letters"));
    },
  };

  pages.cron = {
    title: "Cron",
    enter(root) { root.append(h("h2", { text: "Cron jobs and leaders" }), h("div", { id: "page-body" })); },
    load() { return api("cron"); },
    render(data, body) {
      const l = data.leader;
      const leader = l && l.holder
        ? h("div", { class: "panel", id: "cron-leader" }, "Cron leader: ", h("strong", { class: "mono", text: l.holder }),
          ` (lease ${fmtMs(l.ttl_ms)} left, fencing epoch ${dash(l.epoch)})`)
        : h("div", { class: "banner", id: "cron-leader", text: "Nobody leads cron now: no producer (tokiwa-producer run) holds the lease, so no job fires." });
      const now = Date.now() / 1000;
      const jobs = data.jobs.map((j) => h("tr", { "data-job": j.name },
        h("td", { class: "mono", text: j.name }), h("td", { text: dash(j.kind) }), h("td", { class: "mono", text: dash(j.expr) }),
        h("td", { text: dash(j.tz) }),
        h("td", { class: "next-fire", text: j.next_fire ? j.next_fire + " (" + fmtIn(Date.parse(j.next_fire) / 1000 - now) + ")" : "-" }),
        h("td", { text: dash(j.last_fired) })));
      const leases = data.leaders.map((r) => h("tr", { "data-role": r.role },
        h("td", { text: r.role }), h("td", { class: "mono", text: r.holder || "nobody" }), h("td", { class: "num", text: fmtMs(r.ttl_ms) }),
        h("td", { class: "num", text: dash(r.epoch) })));
      fill(body, leader,
        data.app ? null : h("p", { class: "muted", text: "This server does not have the app's cron jobs (serve it with --app): only jobs that fired are listed, without their expression." }),
        table("cron-table", ["Job", "Kind", "Expression", "Time zone", "Next fire", "Last fired slot"], jobs, "no cron jobs"),
        h("h3", { text: "Leader leases" }),
        table("leaders-table", ["Role", "Holder", "TTL#", "Epoch#"], leases, "no leader lease"));
    },
  };

  pages.locks = {
    title: "Locks",
    enter(root) { root.append(h("h2", { text: "Conversation locks" }), h("div", { id: "page-body" })); },
    load() { return api("locks"); },
    render(rows, body) {
      const trs = rows.map((r) => h("tr", { "data-conversation": r.conversation_id },
        h("td", { class: "mono", text: r.conversation_id }), h("td", { class: "mono", text: r.holder || "free" }),
        h("td", { class: "num", text: fmtMs(r.ttl_ms) }), h("td", { class: "num", text: dash(r.epoch) })));
      fill(body, h("p", { class: "muted", text: "A chatflow holds its conversation's lock while a turn runs (fenced: memory writes with an older epoch are refused)." }),
        table("locks-table", ["Conversation", "Holder token", "TTL#", "Epoch#"], trs, "no conversation lock"));
    },
  };

  pages.relays = {
    title: "Relays",
    enter(root) { root.append(h("h2", { text: "Relays and their topics" }), h("div", { id: "page-body" })); },
    load() { return api("relays"); },
    render(rows, body) {
      const trs = rows.map((r) => h("tr", { "data-relay": r.relay_id, class: r.stale ? "stale" : null },
        h("td", { class: "mono", text: r.relay_id }), h("td", { text: dash(r.host) }), h("td", { class: "num", text: dash(r.pid) }),
        h("td", {}, chips(r.tasks)), h("td", { class: "topics" }, chips(r.topics)), h("td", {}, chips(r.lossless)),
        h("td", { text: fmtAge(r.age_s) }),
        h("td", {}, r.stale ? h("span", { class: "flag bad", text: "stale" }) : h("span", { class: "flag ok", text: "live" }))));
      fill(body, table("relays-table", ["Relay", "Host", "PID#", "Tasks", "Topics", "Lossless", "Heartbeat", "State"], trs,
        "no relay heartbeat: no Miclow relay runs on this namespace"));
    },
  };

  pages.delayed = {
    title: "Delayed",
    enter(root) { root.append(h("h2", { text: "Delayed events" }), h("div", { id: "page-body" })); },
    load() { return api("delayed?limit=200"); },
    render(rows, body) {
      const trs = rows.map((r) => h("tr", { "data-event-id": r.event_id },
        h("td", { class: "mono", text: r.event_id }), h("td", { text: dash(r.type) }),
        h("td", { text: fmtTime(r.due_ms / 1000) }), h("td", { text: fmtIn(r.due_in_s) })));
      fill(body, h("p", { class: "muted", text: "Events published with a delay wait here, in due order; a worker's mover adds each to the stream when it is due." }),
        table("delayed-table", ["Event id", "Type", "Due at", "Due"], trs, "no delayed events"));
    },
  };

  // -- routing and polling ---------------------------------------------------------------------
  function parseRoute() {
    const raw = (location.hash || "#/runs").replace(/^#\/?/, "");
    const [path, query] = raw.split("?");
    const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
    if (parts[0] === "runs" && parts[1]) return { page: "run", arg: parts[1], query: hashQuery(query), nav: "runs" };
    const page = pages[parts[0]] ? parts[0] : "runs";
    return { page, arg: null, query: hashQuery(query), nav: page };
  }

  let current = null;
  function enter() {
    generation++;
    clearTimeout(timer);
    const route = parseRoute();
    current = pages[route.page];
    ui.confirmPurge = false;
    document.querySelectorAll("#nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === route.nav));
    const root = $("#view");
    root.replaceChildren();
    lastRendered = null;
    root.dataset.page = route.page;
    current.enter(root, route);
    document.title = current.title + " · tokiwa";
    tick();
  }

  function rerender() { lastRendered = null; tick(); }

  async function tick() {
    clearTimeout(timer);
    const gen = generation, page = current;
    try {
      const [data, summary] = await Promise.all([page.load(), api("summary").catch(() => null)]);
      if (gen !== generation) return;
      const body = $("#page-body");
      const key = JSON.stringify(data) + "|" + session.read_only;
      if (key !== lastRendered || $("#load-error")) {
        page.render(data, body);
        lastRendered = key;
      }
      $("#view").dataset.loaded = String(Date.now());
      if (summary) {
        document.querySelectorAll("[data-count]").forEach((b) => {
          const v = summary[b.dataset.count];
          b.textContent = v ? String(v) : "";
        });
      }
      lastOk = Date.now();
      const up = $("#updated");
      up.textContent = "updated " + new Date().toLocaleTimeString(undefined, { hour12: false });
      up.className = "";
    } catch (e) {
      if (gen !== generation) return;
      const body = $("#page-body");
      const msg = e.status === 404 ? "not found: " + e.message : "could not load (" + e.message + ")";
      let box = $("#load-error");
      if (!box) { box = h("p", { class: "banner", id: "load-error" }); body.prepend(box); }
      box.textContent = msg;
      if (Date.now() - lastOk > 5000) $("#updated").className = "stale";
    } finally {
      if (gen === generation) timer = setTimeout(tick, POLL_MS);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("#token-cancel").addEventListener("click", () => $("#token-dialog").close("cancel"));
    $("#forget-token").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); refreshSession(); flash("token forgotten"); });
    window.addEventListener("hashchange", enter);
    refreshSession().then(enter);
  });
})();
