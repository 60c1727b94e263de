// The Sundial dashboard: reads /api/fleet every two seconds and draws it.
// Read-only; no dependencies, nothing fetched from elsewhere.
"use strict";

const BAD = new Set(["failed", "timed_out", "rejected", "interrupted"]);
const COLOURS = {
  succeeded: "#2e7d32", failed: "#c62828", timed_out: "#c62828", rejected: "#c62828",
  interrupted: "#c62828", skipped: "#757575",
};
let last = null;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function ago(iso, now) {
  if (!iso) return "never";
  const s = Math.round((Date.parse(now) - Date.parse(iso)) / 1000);
  if (s < 120) return s + "s ago";
  if (s < 7200) return Math.round(s / 60) + "m ago";
  if (s < 172800) return Math.round(s / 3600) + "h ago";
  return Math.round(s / 86400) + "d ago";
}

function fill(id, rows) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren(...rows);
}

function names(fleet) {
  const agents = new Map(fleet.agents.map(a => [a.agent_id, a.name || a.agent_id]));
  const tasks = new Map(fleet.tasks.map(t => [t.task_id, t.name || t.task_id]));
  return { agent: id => agents.get(id) || id, task: id => tasks.get(id) || id };
}

function tiles(fleet) {
  const online = fleet.agents.filter(a => a.online).length;
  const live = fleet.agents.filter(a => !a.revoked).length;
  const hour = Date.parse(fleet.now) - 3600e3;
  const recent = fleet.runs.filter(r => Date.parse(r.scheduled_at) >= hour);
  const bad = recent.filter(r => BAD.has(r.outcome)).length;
  const tile = (label, value, cls) => el("div", { class: "tile" }, el("b", cls ? { class: cls } : {}, value), label);
  document.getElementById("tiles").replaceChildren(
    tile("agents online", online + " / " + live, online < live ? "offline" : "online"),
    tile("tasks", fleet.tasks.length),
    // The dashboard reads the newest 500 runs: past that, "500+".
    tile("runs in the last hour", recent.length + (recent.length >= fleet.runs.length && fleet.runs.length >= 500 ? "+" : "")),
    tile("did not succeed", bad, bad ? "failed" : "succeeded"),
  );
}

function agents(fleet) {
  fill("agents", fleet.agents.map(a => el("tr", { "data-agent": a.agent_id },
    el("td", {}, (a.name || a.agent_id) + " ", el("span", { class: "muted" }, a.agent_id)),
    el("td", { class: a.revoked ? "muted" : a.online ? "online" : "offline" },
      a.revoked ? "revoked" : a.online ? "online" : "offline"),
    el("td", {}, ago(a.last_seen, fleet.now)),
    el("td", { class: a.clock === "held" || a.clock === "unvouched" ? "failed" : "" },
      (a.clock_offset_ms == null ? "-" : a.clock_offset_ms + " ms") + (a.clock ? " (" + a.clock + ")" : "")),
    el("td", a.outbox_len ? { title: a.oldest_unsynced ? "oldest ended " + ago(a.oldest_unsynced, fleet.now) : "" } : {},
      a.outbox_len == null ? "-" : String(a.outbox_len)),
    el("td", {}, a.tasks == null ? "-" : String(a.tasks)),
    el("td", {}, a.version || "-"),
    el("td", {}, a.labels.join(", ")))));
}

function tasks(fleet, n) {
  fill("tasks", fleet.tasks.map(t => el("tr", { "data-task": t.task_id },
    el("td", {}, (t.name || t.task_id) + " ", el("span", { class: "muted" }, t.task_id)),
    el("td", {}, t.schedule),
    el("td", {}, t.paused ? "paused" : "active"),
    el("td", {}, t.next || "-"),
    el("td", {}, ...t.last_runs.map(l => el("div", { class: l.outcome },
      n.agent(l.agent_id) + ": " + l.outcome + (l.detail ? " — " + l.detail : "")))))));
}

function runs(fleet, n) {
  const q = document.getElementById("filter").value.trim().toLowerCase();
  const rows = fleet.runs.slice().reverse().filter(r => !q ||
    [n.task(r.task_id), r.task_id, n.agent(r.agent_id), r.agent_id, r.outcome, r.why || ""]
      .some(x => String(x).toLowerCase().includes(q)));
  fill("runs", rows.map(r => el("tr", { "data-run": r.task_id + "/" + r.agent_id + "/" + r.scheduled_at + "/" + r.attempt },
    el("td", {}, n.task(r.task_id)), el("td", {}, n.agent(r.agent_id)), el("td", {}, r.scheduled_at),
    el("td", {}, r.attempt), el("td", { class: r.outcome }, r.outcome),
    el("td", {}, r.lateness_ms == null ? "-" : r.lateness_ms),
    el("td", {}, r.duration_ms == null ? "-" : r.duration_ms),
    el("td", {}, r.why || (r.outcome === "succeeded" ? "" : "-")))));
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

// One row per task, a dot per run over the last hour, coloured by outcome.
function timeline(fleet, n) {
  const box = document.getElementById("timeline");
  const width = box.clientWidth || 800, left = 140, row = 18;
  const end = Date.parse(fleet.now), start = end - 3600e3;
  const ids = fleet.tasks.map(t => t.task_id);
  box.setAttribute("height", Math.max(40, ids.length * row + 20));
  const parts = [];
  ids.forEach((id, i) => {
    const y = 14 + i * row;
    const label = svg("text", { x: 0, y: y + 4 });
    label.textContent = n.task(id);
    parts.push(label, svg("line", { x1: left, x2: width - 5, y1: y, y2: y, stroke: "#eee" }));
    for (const r of fleet.runs) {
      const t = Date.parse(r.scheduled_at);
      if (r.task_id !== id || t < start) continue;
      const x = left + (width - left - 5) * (t - start) / (end - start);
      const dot = svg("circle", { cx: x.toFixed(1), cy: y, r: 3.5, fill: COLOURS[r.outcome] || "#999" });
      const tip = svg("title", {});
      tip.textContent = n.task(id) + " on " + n.agent(r.agent_id) + " at " + r.scheduled_at + ": " + r.outcome;
      dot.append(tip);
      parts.push(dot);
    }
  });
  box.replaceChildren(...parts);
}

// How late first attempts started: a bar per bucket.
function lateness(fleet) {
  const box = document.getElementById("lateness");
  const bounds = [1, 2, 5, 10, 25, 50, 100, 250, 1000, Infinity];
  const labels = ["≤1", "≤2", "≤5", "≤10", "≤25", "≤50", "≤100", "≤250", "≤1000", ">1000"];
  const counts = bounds.map(() => 0);
  for (const r of fleet.runs) {
    if (r.lateness_ms == null) continue;
    counts[bounds.findIndex(b => Math.max(0, r.lateness_ms) <= b)] += 1;
  }
  const width = box.clientWidth || 800, height = 140, bar = (width - 40) / counts.length;
  const max = Math.max(1, ...counts);
  const parts = [];
  counts.forEach((c, i) => {
    const h = (height - 40) * c / max;
    parts.push(svg("rect", { x: 20 + i * bar, y: height - 25 - h, width: bar - 6, height: h, fill: "#5c6bc0" }));
    const t = svg("text", { x: 20 + i * bar, y: height - 10 });
    t.textContent = labels[i] + " ms";
    const v = svg("text", { x: 20 + i * bar, y: height - 30 - h });
    v.textContent = c;
    parts.push(t, v);
  });
  box.replaceChildren(...parts);
}

function draw(fleet) {
  const n = names(fleet);
  tiles(fleet);
  timeline(fleet, n);
  lateness(fleet);
  agents(fleet);
  tasks(fleet, n);
  runs(fleet, n);
  document.getElementById("updated").textContent = "as of " + fleet.now;
}

async function refresh() {
  try {
    const res = await fetch("/api/fleet", { cache: "no-store" });
    if (!res.ok) throw new Error(await res.text());
    last = await res.json();
    draw(last);
  } catch (e) {
    document.getElementById("updated").textContent = "cannot reach the coordinator: " + e.message;
  }
}

document.getElementById("filter").addEventListener("input", () => last && runs(last, names(last)));
refresh();
setInterval(refresh, 2000);
