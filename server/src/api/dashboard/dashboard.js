// Tally dashboard: polls /api/cluster once a second, draws nodes, partitions
// and rates (counter differences between polls), and runs Stats + Series
// queries through /api/stats and /api/series. No libraries, nothing fetched
// from outside this node.
"use strict";

const POLL_MS = 1000;
const COLOURS = ["#2563eb", "#16a34a", "#d97706", "#7c3aed", "#db2777", "#0891b2", "#65a30d", "#dc2626", "#4b5563"];
let previous = null; // the last poll: {at, totals}
let serverOffsetMs = 0; // server clock minus browser clock

const $ = (id) => document.getElementById(id);
const fmt = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));
const colourOf = (node) => COLOURS[(node - 1) % COLOURS.length];

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function totals(cluster) {
  const t = { accepted: 0, duplicate: 0, rejected: 0, queries: 0 };
  for (const n of cluster.nodes) {
    if (!n.up) continue;
    t.accepted += n.events_accepted; t.duplicate += n.events_duplicate;
    t.rejected += n.events_rejected; t.queries += n.queries;
  }
  return t;
}

function renderRates(cluster) {
  const now = performance.now();
  const t = totals(cluster);
  if (previous) {
    const secs = (now - previous.at) / 1000;
    for (const k of Object.keys(t)) {
      // A restarted node resets its counters: never show a negative rate.
      const rate = Math.max(0, t[k] - previous.totals[k]) / secs;
      $("rate-" + k).textContent = fmt(Math.round(rate));
    }
  }
  previous = { at: now, totals: t };
}

function renderNodes(cluster) {
  const up = cluster.nodes.filter((n) => n.up).length;
  const pill = $("nodes-up");
  pill.textContent = `${up}/${cluster.nodes.length} nodes up`;
  pill.className = "pill " + (up === cluster.nodes.length ? "ok" : "bad");
  document.body.dataset.nodesUp = String(up);
  document.body.dataset.nodes = String(cluster.nodes.length);
  const leaderless = cluster.partitions.filter((p) => !p.leader).length;
  document.body.dataset.leaderless = String(leaderless);
  $("summary").textContent = `${cluster.partition_count} partitions × ${cluster.replication_factor} replicas · ` +
    `metadata leader: node ${cluster.metadata_leader || "none"} · ${leaderless} without a leader · served by node ${cluster.serving_node}`;
  const body = $("nodes").tBodies[0];
  body.replaceChildren(...cluster.nodes.map((n) => el("tr", { "data-node": n.node_id },
    el("td", {}, el("span", { class: "cell", style: `background:${colourOf(n.node_id)};display:inline-flex` }, n.node_id)),
    el("td", {}, n.addr),
    el("td", { class: n.up ? "up" : "down", title: n.error || "" }, n.up ? "up" : "down"),
    el("td", {}, fmt(n.leads)), el("td", {}, fmt(n.replicas)), el("td", {}, fmt(n.quiesced)),
    el("td", {}, fmt(n.events_accepted)), el("td", {}, fmt(n.dedup_keys)), el("td", {}, fmt(n.dedup_conflicts)))));
}

function renderPartitions(cluster) {
  $("partition-legend").textContent = "(colour = leading node; faded = quiesced on every replica; red = no leader)";
  $("partitions").replaceChildren(...cluster.partitions.map((p) => {
    const quiet = p.quiesced_on.length >= p.replicas.length;
    const cell = el("div", {
      class: "cell" + (p.leader ? "" : " leaderless") + (quiet ? " quiesced" : ""),
      title: `partition ${p.partition}: leader ${p.leader || "none"}, term ${p.term}, replicas ${p.replicas.join(",")}, ` +
        `quiesced on ${p.quiesced_on.join(",") || "none"}, commit ${p.commit_index}`,
      "data-partition": p.partition, "data-leader": p.leader,
    }, p.partition);
    if (p.leader) cell.style.background = colourOf(p.leader);
    return cell;
  }));
}

// With tokens on (tallyd --auth-file) the JSON asks for one: kept for this
// browser session only, sent as the bearer token.
function authHeaders() {
  const token = sessionStorage.getItem("tally-token");
  return token ? { Authorization: "Bearer " + token } : {};
}

function askForToken(message) {
  $("token-form").hidden = false;
  $("poll-error").textContent = message;
}

$("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem("tally-token", $("token").value.trim());
  $("token").value = "";
  $("token-form").hidden = true;
});

async function poll() {
  try {
    const response = await fetch("/api/cluster", { cache: "no-store", headers: authHeaders() });
    if (response.status === 401 || response.status === 403) {
      askForToken((await response.json()).error);
      setTimeout(poll, POLL_MS);
      return;
    }
    if (!response.ok) throw new Error(`status ${response.status}`);
    const cluster = await response.json();
    serverOffsetMs = cluster.now_ms - Date.now();
    renderNodes(cluster);
    renderPartitions(cluster);
    renderRates(cluster);
    $("poll-error").textContent = "";
  } catch (e) {
    $("poll-error").textContent = "this node does not answer: " + e.message;
    $("nodes-up").className = "pill bad";
  }
  setTimeout(poll, POLL_MS);
}

// "now", "-30m", "+1m", "-2h", "-7d", RFC 3339, or ms since the epoch; relative
// to the server's clock, so the browser's clock does not matter.
function parseTime(text) {
  const now = Date.now() + serverOffsetMs;
  const t = text.trim();
  if (t === "now" || t === "") return now;
  const rel = /^([+-])(\d+)(s|m|h|d)$/.exec(t);
  if (rel) {
    const unit = { s: 1e3, m: 6e4, h: 36e5, d: 864e5 }[rel[3]];
    return now + (rel[1] === "-" ? -1 : 1) * Number(rel[2]) * unit;
  }
  if (/^\d+$/.test(t)) return Number(t);
  const parsed = Date.parse(t);
  if (Number.isNaN(parsed)) throw new Error(`not a time: ${text}`);
  return parsed;
}

function drawSeries(buckets) {
  const svg = $("series-chart");
  const W = 800, H = 220, pad = 24;
  const max = Math.max(1, ...buckets.map((b) => b.count));
  const w = (W - pad) / Math.max(1, buckets.length);
  const ns = "http://www.w3.org/2000/svg";
  const shapes = buckets.map((b, i) => {
    const h = (b.count / max) * (H - 2 * pad);
    const r = document.createElementNS(ns, "rect");
    r.setAttribute("x", String(pad + i * w)); r.setAttribute("width", String(Math.max(1, w - 1)));
    r.setAttribute("y", String(H - pad - h)); r.setAttribute("height", String(h));
    r.setAttribute("data-count", String(b.count));
    const title = document.createElementNS(ns, "title");
    title.textContent = `${new Date(b.start).toISOString()}: ${b.count}`;
    r.append(title);
    return r;
  });
  const label = (x, y, text) => {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", String(x)); t.setAttribute("y", String(y)); t.textContent = text;
    return t;
  };
  const first = buckets[0], last = buckets[buckets.length - 1];
  if (first) shapes.push(label(pad, H - 6, new Date(first.start).toISOString().slice(0, 16)));
  if (last) shapes.push(label(W - 120, H - 6, new Date(last.start).toISOString().slice(0, 16)));
  shapes.push(label(2, pad - 8, `max ${max}`));
  svg.replaceChildren(...shapes);
}

async function getJson(path, params) {
  const response = await fetch(path + "?" + new URLSearchParams(params), { cache: "no-store", headers: authHeaders() });
  const body = await response.json();
  if (response.status === 401 || response.status === 403) askForToken(body.error);
  if (!response.ok) throw new Error(body.error || `status ${response.status}`);
  return body;
}

async function runQuery(form) {
  $("query-error").textContent = "";
  const data = new FormData(form);
  try {
    const params = {
      entity: data.get("entity"), type: data.get("type"),
      from: parseTime(data.get("from")), to: parseTime(data.get("to")),
      consistency: data.get("consistency"),
    };
    const [stats, series] = await Promise.all([
      getJson("/api/stats", params),
      getJson("/api/series", { ...params, granularity: data.get("granularity") }),
    ]);
    $("stats-count").textContent = fmt(stats.count);
    $("stats-sum").textContent = stats.sum;
    $("stats-average").textContent = stats.average.toFixed(3);
    $("stats-range").textContent = `${new Date(stats.from).toISOString()} – ${new Date(stats.to).toISOString()}`;
    $("stats-served").textContent = `node ${stats.served_by}`;
    $("stats").hidden = false;
    const total = series.buckets.reduce((s, b) => s + b.count, 0);
    $("series-total").textContent = String(total);
    $("series-buckets").textContent = String(series.buckets.length);
    $("series").hidden = false;
    drawSeries(series.buckets);
    document.body.dataset.seriesTotal = String(total);
    document.body.dataset.statsCount = String(stats.count);
  } catch (e) {
    $("query-error").textContent = e.message;
    document.body.dataset.queryError = e.message;
  }
}

$("query").addEventListener("submit", (e) => { e.preventDefault(); runQuery(e.target); });

// A link can carry a query (?entity=…&type=…&from=…&to=…&granularity=…): fill
// the form and run it once the first poll has set the server's clock.
const fromUrl = new URLSearchParams(location.search);
for (const [k, v] of fromUrl) {
  const field = $("query").elements.namedItem(k);
  if (field) field.value = v;
}
poll().then(() => { if (fromUrl.get("entity")) runQuery($("query")); });
