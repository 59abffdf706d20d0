// Meridian status page: reads /status.json every few seconds and redraws
// the markers, the steering lines and the tables in place. Text only goes
// in through textContent; nothing is loaded from anywhere but this server.
"use strict";

const REFRESH_MS = 3000;
const SVG = "http://www.w3.org/2000/svg";
const WORDS = {
  in_service: "in service",
  full: "at capacity",
  lagging: "lagging",
  draining: "draining",
  down: "down",
  forced_down: "taken out",
};
let places = {};
let lastOk = 0;

// The map's projection (geodns/status/make_map.py): 1000 units = 360 degrees.
function project(lat, lon) {
  return [(lon + 180) * 1000 / 360, (90 - lat) * 1000 / 360];
}

function el(tag, attrs, text) {
  const e = document.createElementNS(tag === "svg" || attrs.svg ? SVG : "http://www.w3.org/1999/xhtml", tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k !== "svg") e.setAttribute(k, v);
  }
  if (text !== undefined) e.textContent = text;
  return e;
}

function age(seconds) {
  if (seconds < 0) seconds = 0;
  if (seconds < 90) return Math.round(seconds) + " s ago";
  if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
  if (seconds < 129600) return Math.round(seconds / 3600) + " h ago";
  return Math.round(seconds / 86400) + " days ago";
}

function date(unix) {
  return new Date(unix * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";
}

function bytes(n) {
  const units = ["B/s", "kB/s", "MB/s", "GB/s"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function cell(row, text, cls) {
  const td = el("td", cls ? { class: cls } : {}, text);
  row.appendChild(td);
  return td;
}

function drawMirrors(doc) {
  const markers = document.getElementById("markers");
  const body = document.querySelector("#mirrors tbody");
  markers.replaceChildren();
  body.replaceChildren();
  for (const m of doc.mirrors) {
    const [x, y] = project(m.latitude, m.longitude);
    const word = WORDS[m.standing] || m.standing;
    const g = el("g", { svg: 1, class: "mirror " + m.standing, "data-id": m.id, "data-standing": m.standing,
      transform: "translate(" + x.toFixed(1) + " " + y.toFixed(1) + ")" });
    g.appendChild(el("title", { svg: 1 }, m.id + ": " + word + " (" + m.reason + ")"));
    g.appendChild(el("circle", { svg: 1, r: 6 }));
    g.appendChild(el("text", { svg: 1, x: 9, y: 4 }, m.id + " · " + word));
    markers.appendChild(g);

    const tr = el("tr", { "data-id": m.id, "data-standing": m.standing });
    const th = el("th", { scope: "row" }, m.id);
    tr.appendChild(th);
    cell(tr, m.region);
    cell(tr, word, "state " + m.standing).title = m.reason;
    cell(tr, String(m.generation), "num");
    cell(tr, m.generations_behind ? m.generations_behind + " generations" : "current", "num");
    const load = m.capacity_bytes_per_sec
      ? Math.round(m.load * 100) + "% (" + bytes(m.egress_bytes_per_sec) + " of " + bytes(m.capacity_bytes_per_sec) + ")"
      : bytes(m.egress_bytes_per_sec) + " (no capacity set)";
    cell(tr, load, "num");
    cell(tr, m.last_sync ? date(m.last_sync) + ", " + age(doc.now - m.last_sync) : "never");
    cell(tr, m.standing === "down" ? "failing" : m.probe_ms.toFixed(1) + " ms", "num");
    body.appendChild(tr);
  }
}

function drawSteering(doc) {
  const flows = document.getElementById("flows");
  const body = document.querySelector("#steering tbody");
  flows.replaceChildren();
  body.replaceChildren();
  const at = {};
  for (const m of doc.mirrors) at[m.id] = project(m.latitude, m.longitude);
  let total = 0;
  for (const f of doc.steering) total += f.answers;
  for (const f of doc.steering) {
    const share = total ? f.answers / total : 0;
    const from = places[f.country];
    const to = at[f.mirror];
    if (from && to) {
      // A curve bowed to one side, so a flow and its reverse stay apart.
      const [x1, y1] = from, [x2, y2] = to;
      const mx = (x1 + x2) / 2 - (y2 - y1) * 0.2, my = (y1 + y2) / 2 + (x2 - x1) * 0.2;
      const p = el("path", { svg: 1, d: "M" + x1 + " " + y1 + "Q" + mx.toFixed(1) + " " + my.toFixed(1) + " " + x2 + " " + y2,
        "stroke-width": (1 + 6 * share).toFixed(1), "data-country": f.country, "data-mirror": f.mirror });
      p.appendChild(el("title", { svg: 1 }, f.country + " → " + f.mirror + ": " + f.answers + " answers"));
      flows.appendChild(p);
    }
    const tr = el("tr", { "data-country": f.country, "data-mirror": f.mirror });
    tr.appendChild(el("th", { scope: "row" }, f.country));
    cell(tr, f.mirror);
    cell(tr, String(f.answers), "num");
    cell(tr, Math.round(share * 100) + "%", "num");
    body.appendChild(tr);
  }
  if (!doc.steering.length) {
    const tr = el("tr", {});
    const td = cell(tr, "No answers in the last " + (doc.window_seconds || 60) + " seconds.");
    td.colSpan = 4;
    body.appendChild(tr);
  }
}

function summarize(doc) {
  const n = {};
  for (const m of doc.mirrors) n[m.standing] = (n[m.standing] || 0) + 1;
  const parts = [(n.in_service || 0) + " of " + doc.mirrors.length + " mirrors in service"];
  for (const k of ["full", "lagging", "draining", "down", "forced_down"]) {
    if (n[k]) parts.push(n[k] + " " + WORDS[k]);
  }
  const s = document.getElementById("summary");
  s.textContent = parts.join(", ") + "; newest generation " + doc.newest_generation + ".";
  s.classList.remove("stale");
  document.getElementById("updated").textContent = "Updated " + date(doc.now) + ".";
}

async function refresh() {
  try {
    const r = await fetch("/status.json", { cache: "no-store" });
    if (!r.ok) throw new Error("HTTP " + r.status);
    const doc = await r.json();
    drawMirrors(doc);
    drawSteering(doc);
    summarize(doc);
    lastOk = Date.now();
    document.body.dataset.updated = String(lastOk);
  } catch (e) {
    const s = document.getElementById("summary");
    s.classList.add("stale");
    s.textContent = "Cannot reach this GeoDNS server's status (" + e.message + ")" +
      (lastOk ? "; what is shown is from " + age((Date.now() - lastOk) / 1000) + "." : ".");
  }
}

async function start() {
  try {
    const r = await fetch("/places.json");
    if (r.ok) places = await r.json();
  } catch (e) {
    // Without places the steering table still shows; only the lines are missing.
  }
  await refresh();
  setInterval(refresh, REFRESH_MS);
}

start();
