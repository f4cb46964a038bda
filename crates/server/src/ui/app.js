// pier's dashboard: polls the node's JSON API every two seconds and redraws. No framework,
// nothing fetched from anywhere but this node.
"use strict";

const POLL_MS = 2000;
const HISTORY = 150;
const history = [];
let last = null;

function $(id) { return document.getElementById(id); }

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function fill(tableId, rows, draw) {
  const body = $(tableId).querySelector("tbody");
  body.replaceChildren();
  if (rows.length === 0) {
    const tr = document.createElement("tr");
    const td = cell(tr, "none", "muted");
    td.colSpan = $(tableId).querySelectorAll("th").length;
    body.appendChild(tr);
    return;
  }
  for (const r of rows) {
    const tr = document.createElement("tr");
    draw(tr, r);
    body.appendChild(tr);
  }
}

async function getJson(path) {
  const resp = await fetch(path, { cache: "no-store", credentials: "same-origin" });
  if (!resp.ok) throw new Error(path + ": " + resp.status);
  return resp.json();
}

function drawStatus(s) {
  $("node").textContent = s.node.name + (s.node.zone ? " (" + s.node.zone + ")" : "") + " · " + s.node.version;
  const ready = $("ready");
  ready.textContent = s.ready ? "ready" : "not ready: " + s.not_ready_reasons.join("; ");
  ready.className = "badge " + (s.ready ? "ok" : "bad");
  fill("members", s.members, (tr, m) => {
    cell(tr, m.name);
    cell(tr, m.address);
    cell(tr, m.zone);
    cell(tr, m.state, "state " + m.state);
    cell(tr, m.since);
  });
  const sb = s.cache.served_bytes;
  $("served-local").textContent = bytes(sb.local);
  $("served-peer").textContent = bytes(sb.peer);
  $("served-upstream").textContent = bytes(sb.upstream);
  const total = sb.local + sb.peer + sb.upstream;
  $("hit-ratio").textContent = total ? ((100 * (sb.local + sb.peer)) / total).toFixed(1) + " %" : "–";
  if (last) {
    const d = (k) => Math.max(0, sb[k] - last[k]);
    const all = d("local") + d("peer") + d("upstream");
    history.push(all ? (d("local") + d("peer")) / all : null);
    if (history.length > HISTORY) history.shift();
    drawChart();
  }
  last = sb;
  $("cache-bytes").textContent = bytes(s.cache.bytes);
  $("cache-blobs").textContent = s.cache.blobs;
  const bound = s.cache.max_bytes;
  $("cache-bound").textContent = bound ? "of " + bytes(bound) + " bound" : "no bound";
  $("cache-fill").style.width = bound ? Math.min(100, (100 * s.cache.bytes) / bound) + "%" : "0";
  $("free-bytes").textContent = bytes(s.storage.free_bytes);
  $("writable").textContent = s.storage.writable ? "writable" : "refusing writes";
  const ups = [];
  for (const u of s.upstreams) for (const e of u.endpoints) ups.push({ name: u.name, url: e.url, state: e.state || (e.healthy ? "healthy" : "unhealthy") });
  fill("upstreams", ups, (tr, u) => {
    cell(tr, u.name);
    cell(tr, u.url);
    const look = { healthy: "state alive", unhealthy: "state dead", unknown: "state unknown" };
    cell(tr, u.state === "unknown" ? "unknown (not tried yet)" : u.state, look[u.state] || "state");
  });
}

function drawChart() {
  const svg = $("hit-chart");
  const w = 600, h = 120;
  const pts = [];
  history.forEach((v, i) => {
    if (v === null) return;
    const x = (i / (HISTORY - 1)) * w;
    pts.push(x.toFixed(1) + "," + (h - v * (h - 4) - 2).toFixed(1));
  });
  svg.replaceChildren();
  const ns = "http://www.w3.org/2000/svg";
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", pts.join(" "));
  line.setAttribute("class", "hit-line");
  svg.appendChild(line);
}

async function retry(id, button) {
  button.disabled = true;
  button.textContent = "queued…";
  try {
    const resp = await fetch("/api/v1/sync/retry", {
      method: "POST",
      headers: { "content-type": "application/json" },
      credentials: "same-origin",
      body: JSON.stringify({ id: id }),
    });
    if (!resp.ok) throw new Error(String(resp.status));
  } catch (e) {
    button.textContent = "retry failed: " + e.message;
    return;
  }
  poll();
}

function drawJobs(answer) {
  const jobs = answer.jobs.slice().sort((a, b) => b.id - a.id);
  fill("jobs", jobs, (tr, j) => {
    tr.dataset.job = j.id;
    cell(tr, j.id);
    cell(tr, j.kind);
    cell(tr, j.image, "image");
    // An import has no target; its row names the file it came from.
    cell(tr, j.kind === "import" ? j.file : j.target);
    cell(tr, j.state, "state job-" + j.state);
    cell(tr, j.attempts);
    cell(tr, j.last_error, "error");
    const td = cell(tr, "");
    // A failed import is not retried by the queue (its file is in failed/, or was an upload).
    if (j.state === "failed" && j.kind !== "import") {
      const b = document.createElement("button");
      b.textContent = "retry";
      b.className = "retry";
      b.addEventListener("click", () => retry(j.id, b));
      td.appendChild(b);
    }
  });
}

function drawErrors(answer) {
  fill("errors", answer.errors, (tr, e) => {
    cell(tr, e.at);
    cell(tr, e.method + " " + e.path);
    cell(tr, e.status, "state dead");
  });
}

async function poll() {
  try {
    const [status, jobs, errors] = await Promise.all([
      getJson("/api/v1/status"),
      getJson("/api/v1/sync/jobs").catch(() => ({ jobs: [] })),
      getJson("/api/v1/errors").catch(() => ({ errors: [] })),
    ]);
    drawStatus(status);
    drawJobs(jobs);
    drawErrors(errors);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    $("updated").textContent = "cannot reach the node: " + e.message;
  }
}

poll();
setInterval(poll, POLL_MS);
