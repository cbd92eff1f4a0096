/* The ApexBridge live dashboard.
 *
 * Starts from the snapshot the page was rendered with, applies hub events from
 * /ws/admin/events/ (PROTOCOL §5) as they arrive, and re-reads the snapshot
 * (./data) shortly after bursts of task / LLM events and every 30 s, because the
 * event channel is at-most-once. All text goes through textContent (no HTML
 * built from data).
 */
(function () {
  "use strict";

  const root = document.getElementById("ab-dashboard");
  if (!root) return;

  const COLOURS = {
    online: "#1f9d55", busy: "#d97706", offline: "#6b7280", unknown: "#9ca3af",
    queued: "#2563eb", succeeded: "#1f9d55", failed: "#dc2626",
  };
  const FINAL_TASK_EVENTS = new Set(["task_succeeded", "task_failed", "task_timed_out", "task_cancelled"]);
  const FEED_LENGTH = 15;

  const state = {
    nodes: new Map(),
    nodeCounts: {},
    taskCounts: {},
    llm: {},
    tokensByNode: new Map(),
    tasksPerMinute: [],
    recentTasks: [],
    recentLlm: [],
    clockSkew: 0,
  };
  let tasksChart = null;
  let tokensChart = null;

  // --- helpers -----------------------------------------------------------------------
  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null) continue;
      if (name === "text") node.textContent = value;
      else if (name === "className") node.className = value;
      else node.setAttribute(name, value);
    }
    for (const child of children || []) if (child) node.appendChild(child);
    return node;
  }

  // django.contrib.admin.utils.quote: the admin's way to put a primary key in a URL.
  function adminQuote(value) {
    const special = "\":/_#?;@&=+$,[]<>%\n\\";
    let out = "";
    for (const ch of String(value)) {
      out += special.includes(ch) ? "_" + ch.charCodeAt(0).toString(16).toUpperCase().padStart(2, "0") : ch;
    }
    return out;
  }

  function now() { return Date.now() + state.clockSkew; }

  function ago(ms) {
    if (!ms) return "never";
    const seconds = Math.max(0, Math.round((now() - ms) / 1000));
    if (seconds < 60) return seconds + " s ago";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min ago";
    if (seconds < 86400) return Math.floor(seconds / 3600) + " h ago";
    return Math.floor(seconds / 86400) + " d ago";
  }

  function clock(ms) {
    const d = new Date(ms || Date.now());
    return d.toTimeString().slice(0, 8);
  }

  function number(value) { return Number(value || 0).toLocaleString(); }

  function setText(id, value) {
    const node = document.getElementById(id);
    if (node) node.textContent = value;
  }

  // --- snapshot ----------------------------------------------------------------------
  function applySnapshot(snapshot) {
    state.clockSkew = (snapshot.serverTime || Date.now()) - Date.now();
    state.nodes = new Map(snapshot.nodes.map((node) => [node.nodeId, node]));
    state.nodeCounts = snapshot.nodeCounts || {};
    state.taskCounts = snapshot.taskCounts || {};
    state.llm = snapshot.llm || {};
    state.tokensByNode = new Map((snapshot.tokensByNode || []).map((row) => [row.nodeId, row.tokens]));
    state.tasksPerMinute = snapshot.tasksPerMinute || [];
    state.recentTasks = (snapshot.recentTasks || []).map((task) => ({
      kind: task.status, task, timestamp: task.finishedAt || task.createdAt,
    }));
    state.recentLlm = (snapshot.recentLlm || []).map((row) => ({
      kind: row.outcome, requestId: row.requestId, nodeId: row.nodeId, model: row.model,
      tokens: row.totalTokens, error: row.errorCode, timestamp: row.timestamp,
    }));
    renderAll();
  }

  let resyncTimer = null;
  function scheduleResync(delayMs) {
    if (resyncTimer) return;
    resyncTimer = setTimeout(resync, delayMs);
  }

  async function resync() {
    resyncTimer = null;
    try {
      const response = await fetch("data", { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (response.ok && (response.headers.get("content-type") || "").includes("json")) {
        applySnapshot(await response.json());
      }
    } catch (error) {
      // Offline for a moment: the next event or the 30 s timer tries again.
    }
  }

  // --- rendering ---------------------------------------------------------------------
  function renderCounts() {
    const counts = { online: 0, busy: 0, offline: 0, unknown: 0 };
    for (const node of state.nodes.values()) counts[node.status] = (counts[node.status] || 0) + 1;
    setText("kpi-online", number(counts.online));
    setText("kpi-busy", number(counts.busy));
    setText("kpi-offline", number(counts.offline + counts.unknown));
    setText("kpi-total", number(state.nodes.size));
    setText("kpi-queued", number(state.taskCounts.queued));
    setText("kpi-assigned", number(state.taskCounts.assigned));
    const lastFive = state.tasksPerMinute.slice(-5);
    setText("kpi-done", number(lastFive.reduce((sum, b) => sum + b.succeeded + b.failed, 0)));
    setText("kpi-tokens", number(state.llm.tokens));
    setText("kpi-llm-requests", `${number(state.llm.requests)} request${state.llm.requests === 1 ? "" : "s"}`);
    const connected = [...state.nodes.values()].filter((n) => n.connected).length;
    setText("nodes-note", `${state.nodes.size} registered · ${connected} connected`);
  }

  function nodeRow(node) {
    const url = root.dataset.nodeUrl + adminQuote(node.nodeId) + "/change/";
    const status = el("span", { className: "ab-status", "data-status": node.status, text: node.status });
    const statusCell = el("td", {}, [status]);
    if (node.draining) statusCell.appendChild(el("span", { className: "ab-chip ab-chip-warn", text: "draining" }));
    if (!node.connected && node.status !== "offline") {
      statusCell.appendChild(el("span", { className: "ab-chip", text: "disconnected" }));
    }
    const caps = el("td", {});
    const capabilities = node.capabilities || [];
    for (const cap of capabilities.slice(0, 4)) caps.appendChild(el("span", { className: "ab-chip", text: cap }));
    if (capabilities.length > 4) caps.appendChild(el("span", { className: "ab-quiet", text: `+${capabilities.length - 4}` }));
    if (!capabilities.length) caps.appendChild(el("span", { className: "ab-quiet", text: "—" }));
    const max = (node.config && node.config.maxConcurrentTasks) || 1;
    const stats = node.stats || {};
    return el("tr", { "data-node-id": node.nodeId, "data-status": node.status }, [
      el("td", {}, [
        el("a", { href: url, className: "ab-node-id", text: node.nodeId }),
        node.name && node.name !== node.nodeId ? el("span", { className: "ab-node-name", text: node.name }) : null,
      ]),
      el("td", { text: node.type + (node.protocol === "vcp" ? " · vcp" : "") }),
      statusCell,
      el("td", { className: "num", text: `${node.activeTasks || 0} / ${max}` }),
      caps,
      el("td", { className: "ab-heartbeat", "data-ms": node.lastHeartbeat || "", text: ago(node.lastHeartbeat) }),
      el("td", { className: "num", text: number(stats.completedTasks) }),
      el("td", { className: "num", text: number(stats.failedTasks) }),
      el("td", { className: "num", text: number(state.tokensByNode.get(node.nodeId)) }),
    ]);
  }

  function renderNodes(flashId) {
    const body = document.getElementById("ab-nodes-body");
    const rows = [...state.nodes.values()].sort((a, b) => a.nodeId.localeCompare(b.nodeId)).map(nodeRow);
    body.replaceChildren(...rows);
    document.getElementById("nodes-empty").hidden = state.nodes.size > 0;
    if (flashId) {
      const row = body.querySelector(`tr[data-node-id="${CSS.escape(flashId)}"]`);
      if (row) row.classList.add("ab-flash");
    }
  }

  function feedItem(timestamp, kind, label, what, extra) {
    return el("li", {}, [
      el("span", { className: "ab-time", text: clock(timestamp) }),
      el("span", {}, [el("span", { className: "ab-pill", "data-kind": kind, text: label })]),
      el("span", { className: "ab-what", text: what, title: what }),
      el("span", { className: "ab-extra", text: extra || "" }),
    ]);
  }

  function renderFeeds() {
    const tasks = document.getElementById("feed-tasks");
    const taskItems = state.recentTasks.slice(0, FEED_LENGTH).map((entry) => {
      const task = entry.task;
      const where = task.assignedNodeId ? ` → ${task.assignedNodeId}` : "";
      const extra = task.executionTime != null ? `${number(task.executionTime)} ms` : `attempt ${task.attempts || 0}`;
      return feedItem(entry.timestamp, entry.kind, entry.kind.replace("_", " "), `${task.toolName}${where} · ${task.taskId}`, extra);
    });
    tasks.replaceChildren(...(taskItems.length ? taskItems : [el("li", { className: "ab-empty", text: "No tasks yet." })]));

    const llm = document.getElementById("feed-llm");
    const llmItems = state.recentLlm.slice(0, FEED_LENGTH).map((entry) => {
      const what = `${entry.nodeId}${entry.model ? " · " + entry.model : ""}${entry.error ? " · " + entry.error : ""}`;
      return feedItem(entry.timestamp, entry.kind, entry.kind.replace("_", " "), what, entry.tokens ? `${number(entry.tokens)} tok` : "");
    });
    llm.replaceChildren(...(llmItems.length ? llmItems : [el("li", { className: "ab-empty", text: "No LLM requests yet." })]));
  }

  function chartTextColour() {
    return getComputedStyle(document.body).getPropertyValue("--body-quiet-color").trim() || "#6b7280";
  }

  function renderCharts() {
    if (typeof Chart === "undefined") return;
    const labels = state.tasksPerMinute.map((b) => clock(b.minute).slice(0, 5));
    const tick = chartTextColour();
    const grid = getComputedStyle(document.body).getPropertyValue("--hairline-color").trim() || "#e5e7eb";
    if (!tasksChart) {
      tasksChart = new Chart(document.getElementById("chart-tasks"), {
        data: {
          labels,
          datasets: [
            { type: "bar", label: "Succeeded", data: [], backgroundColor: COLOURS.succeeded, stack: "done", borderRadius: 2 },
            { type: "bar", label: "Failed", data: [], backgroundColor: COLOURS.failed, stack: "done", borderRadius: 2 },
            { type: "line", label: "Queued", data: [], borderColor: COLOURS.queued, backgroundColor: COLOURS.queued,
              cubicInterpolationMode: "monotone", pointRadius: 0, borderWidth: 2 },
          ],
        },
        options: {
          animation: false, maintainAspectRatio: false, interaction: { mode: "index", intersect: false },
          plugins: { legend: { position: "bottom", labels: { color: tick, boxWidth: 12 } } },
          scales: {
            x: { stacked: true, ticks: { color: tick, maxTicksLimit: 10 }, grid: { display: false } },
            y: { stacked: true, beginAtZero: true, ticks: { color: tick, precision: 0 }, grid: { color: grid } },
          },
        },
      });
    }
    tasksChart.data.labels = labels;
    tasksChart.data.datasets[0].data = state.tasksPerMinute.map((b) => b.succeeded);
    tasksChart.data.datasets[1].data = state.tasksPerMinute.map((b) => b.failed);
    tasksChart.data.datasets[2].data = state.tasksPerMinute.map((b) => b.queued);
    tasksChart.update("none");

    const rows = [...state.tokensByNode.entries()].sort((a, b) => b[1] - a[1]).slice(0, 12);
    document.getElementById("tokens-empty").hidden = rows.length > 0;
    if (!tokensChart) {
      tokensChart = new Chart(document.getElementById("chart-tokens"), {
        type: "bar",
        data: { labels: [], datasets: [{ label: "Tokens", data: [], backgroundColor: COLOURS.queued, borderRadius: 3 }] },
        options: {
          indexAxis: "y", animation: false, maintainAspectRatio: false,
          plugins: { legend: { display: false } },
          scales: {
            x: { beginAtZero: true, ticks: { color: tick, precision: 0 }, grid: { color: grid } },
            y: { ticks: { color: tick }, grid: { display: false } },
          },
        },
      });
    }
    tokensChart.data.labels = rows.map((row) => row[0]);
    tokensChart.data.datasets[0].data = rows.map((row) => row[1]);
    tokensChart.update("none");
  }

  function renderAll(flashId) {
    renderCounts();
    renderNodes(flashId);
    renderFeeds();
    renderCharts();
  }

  // --- events ------------------------------------------------------------------------
  function bumpMinute(field, timestamp) {
    const minute = Math.floor((timestamp || now()) / 60000) * 60000;
    let last = state.tasksPerMinute[state.tasksPerMinute.length - 1];
    while (last && last.minute < minute) {
      state.tasksPerMinute.push({ minute: last.minute + 60000, queued: 0, succeeded: 0, failed: 0 });
      if (state.tasksPerMinute.length > 30) state.tasksPerMinute.shift();
      last = state.tasksPerMinute[state.tasksPerMinute.length - 1];
    }
    if (last && last.minute === minute) last[field] += 1;
  }

  const handlers = {
    node_registered(data) {
      const node = data.node;
      const previous = state.nodes.get(node.nodeId);
      node.activeTasks = previous ? previous.activeTasks : 0;
      state.nodes.set(node.nodeId, node);
      renderCounts();
      renderNodes(node.nodeId);
    },
    node_status_changed(data) {
      const node = state.nodes.get(data.nodeId);
      if (!node) { scheduleResync(300); return; }
      node.status = data.newStatus;
      // A socket that closed is the usual reason; the resync below corrects it if not.
      if (data.newStatus === "offline") node.connected = false;
      else node.lastHeartbeat = data.timestamp;
      renderCounts();
      renderNodes(data.nodeId);
      scheduleResync(1500); // connection state, in-flight counts
    },
    node_unregistered(data) {
      state.nodes.delete(data.nodeId);
      renderCounts();
      renderNodes();
    },
  };

  function onTaskEvent(type, data) {
    const task = data.task || {};
    const kind = type.slice("task_".length);
    state.recentTasks.unshift({ kind, task, timestamp: data.timestamp });
    state.recentTasks.length = Math.min(state.recentTasks.length, FEED_LENGTH);
    if (type === "task_queued") bumpMinute("queued", data.timestamp);
    if (FINAL_TASK_EVENTS.has(type)) bumpMinute(type === "task_succeeded" ? "succeeded" : "failed", data.timestamp);
    renderFeeds();
    renderCharts();
    scheduleResync(1500);
  }

  const LLM_OUTCOMES = {
    llm_proxy_completed: "succeeded", llm_proxy_stream_completed: "succeeded",
    llm_proxy_failed: "failed", llm_proxy_rate_limited: "rate_limited",
  };

  function onLlmEvent(type, data) {
    const kind = LLM_OUTCOMES[type];
    if (!kind) return; // llm_proxy_request: the outcome event follows
    const usage = data.usage || {};
    const tokens = usage.totalTokens || 0;
    state.recentLlm.unshift({
      kind, requestId: data.requestId, nodeId: data.nodeId, model: data.model, tokens,
      error: data.error && data.error.code, timestamp: data.timestamp,
    });
    state.recentLlm.length = Math.min(state.recentLlm.length, FEED_LENGTH);
    if (tokens && kind === "succeeded") {
      state.tokensByNode.set(data.nodeId, (state.tokensByNode.get(data.nodeId) || 0) + tokens);
      state.llm.tokens = (state.llm.tokens || 0) + tokens;
    }
    state.llm.requests = (state.llm.requests || 0) + 1;
    renderCounts();
    renderFeeds();
    renderCharts();
    scheduleResync(1500);
  }

  function onEvent(message) {
    const { type, data } = message;
    if (!type || !data) return;
    if (handlers[type]) handlers[type](data);
    else if (type.startsWith("task_")) onTaskEvent(type, data);
    else if (type.startsWith("llm_proxy_")) onLlmEvent(type, data);
  }

  // --- connection --------------------------------------------------------------------
  let retryMs = 1000;
  function setConnection(stateName, text) {
    const badge = document.getElementById("ab-conn");
    badge.dataset.state = stateName;
    setText("ab-conn-text", text);
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${scheme}://${location.host}${root.dataset.eventsPath}`);
    socket.addEventListener("open", () => {
      retryMs = 1000;
      setConnection("live", "Live");
      resync(); // catch up on whatever happened while disconnected
    });
    socket.addEventListener("message", (event) => {
      try { onEvent(JSON.parse(event.data)); } catch (error) { /* a malformed frame is dropped */ }
    });
    socket.addEventListener("close", () => {
      setConnection("reconnecting", "Reconnecting…");
      setTimeout(connect, retryMs);
      retryMs = Math.min(retryMs * 2, 15000);
    });
  }

  function tickHeartbeats() {
    for (const cell of document.querySelectorAll("td.ab-heartbeat")) {
      cell.textContent = ago(Number(cell.dataset.ms) || 0);
    }
  }

  function start() {
    applySnapshot(JSON.parse(document.getElementById("dashboard-snapshot").textContent));
    connect();
    setInterval(tickHeartbeats, 1000);
    setInterval(resync, 30000);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
