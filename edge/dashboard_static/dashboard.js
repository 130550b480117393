/* gapcast dashboard: the station list, per-channel plots (uPlot), the skill table and the gateway panel.
   Data: GET /api/state and /api/station/NAME; live: server-sent events on /events (one "update" per message). */
"use strict";
const $ = (id) => document.getElementById(id);
let chosen = null, plots = [], pending = null, lastState = null;

function fmt(v, d = 3) { return v === null || v === undefined ? "–" : (typeof v === "number" ? v.toFixed(d) : String(v)); }
function el(tag, attrs = {}, text = "") { const e = document.createElement(tag); Object.assign(e, attrs); if (text) e.textContent = text; return e; }

async function getJSON(url) { const r = await fetch(url, { cache: "no-store" }); if (!r.ok) return null; return r.json(); }

function renderStations(st) {
  const ul = $("stations"); ul.textContent = "";
  for (const [name, s] of Object.entries(st.stations)) {
    const li = el("li"); li.dataset.station = name; li.dataset.state = s.state;
    if (name === chosen) li.classList.add("chosen");
    li.append(el("span", {}, name), el("span", { className: "state state-" + s.state }, s.state));
    li.onclick = () => { chosen = name; location.hash = encodeURIComponent(name); refresh(); };
    ul.append(li);
  }
}

function renderGateways(st) {
  const box = $("gateways"); box.textContent = "";
  for (const [gw, g] of Object.entries(st.gateways)) {
    const s = g.status || {}, m = g.model || {}, d = g.drift || {};
    const c = s.counters || {}, ob = s.outbox || {};
    const rows = [["gateway", gw], ["state", s.state], ["backend", s.backend], ["model", s.model ? `${s.model.name} v${s.model.version}` : s.model_version],
      ["filled", c.filled], ["forecasts", c.forecasts], ["revisions", c.revisions], ["fallback steps", c.fallback_steps || 0],
      ["outbox depth", ob.depth !== undefined ? ob.depth : (ob.messages !== undefined ? ob.messages : ob.queued)],
      ["update stage", m.stage ? `${m.stage}${m.version ? " v" + m.version : ""}` : "–"],
      ["drift", (d.stations || []).map((x) => x.station).join(", ") || "none"]];
    const dl = el("dl", { className: "gw" }); dl.dataset.gateway = gw;
    for (const [k, v] of rows) { dl.append(el("dt", {}, k), el("dd", {}, v === undefined || v === null ? "–" : String(v))); }
    box.append(dl);
  }
}

function renderSkill(skill) {
  const tb = $("skill").querySelector("tbody"); tb.textContent = "";
  if (!skill) { tb.append(el("tr", {}, "")).append(el("td", { colSpan: 5 }, "no forecast scored yet")); return; }
  for (const [label, b] of Object.entries(skill.buckets || {})) {
    const tr = el("tr"); for (const v of [label, fmt(b.model), fmt(b.persistence), fmt(b.seasonal_naive), b.n]) tr.append(el("td", {}, String(v)));
    tb.append(tr);
  }
  const tr = el("tr"); tr.append(el("td", {}, "ratio"), el("td", { colSpan: 4 }, fmt(skill.ratio) + (skill.drift ? "  DRIFT" : ""))); tb.append(tr);
}

function gapShade(u, xs, gapMask) {
  const ctx = u.ctx, top = u.bbox.top, h = u.bbox.height;
  ctx.save(); ctx.fillStyle = "rgba(239,108,0,0.15)";
  const half = xs.length > 1 ? (xs[1] - xs[0]) / 2 : 1800;
  for (let i = 0; i < xs.length; i++) {
    if (!gapMask[i]) continue;
    const x0 = u.valToPos(xs[i] - half, "x", true), x1 = u.valToPos(xs[i] + half, "x", true);
    ctx.fillRect(x0, top, Math.max(1, x1 - x0), h);
  }
  ctx.restore();
}

function renderPlots(data) {
  for (const p of plots) p.destroy(); plots = []; const box = $("plots"); box.textContent = "";
  const steps = data.steps, fc = data.forecast;
  const channels = steps.length ? Object.keys(steps[steps.length - 1].values) : (fc ? Object.keys(fc.steps[0].values) : []);
  const fcTs = fc ? fc.steps.map((s) => Date.parse(s.ts) / 1000) : [];
  const xs = steps.map((s) => s.epoch_s).concat(fcTs.filter((t) => !steps.length || t > steps[steps.length - 1].epoch_s));
  let drawn = 0;
  for (const ch of channels) {
    const obs = [], fill = [], rev = [], fcs = [], gap = [];
    for (const s of steps) {
      const imp = s.imputed.includes(ch), v = s.values[ch] === undefined ? null : s.values[ch];
      obs.push(imp ? null : v); fill.push(imp && s.status === "filled" ? v : null); rev.push(imp && s.status === "revised" ? v : null);
      fcs.push(null); gap.push(imp);
    }
    for (let i = steps.length; i < xs.length; i++) { obs.push(null); fill.push(null); rev.push(null); gap.push(false); }
    for (let i = steps.length; i < xs.length; i++) fcs.push(null);
    if (fc) { for (const s of fc.steps) { const i = xs.indexOf(Date.parse(s.ts) / 1000); if (i >= 0) fcs[i] = s.values[ch]; }
      const o = xs.indexOf(Date.parse(fc.origin) / 1000); if (o >= 0) fcs[o] = (obs[o] ?? fill[o] ?? rev[o]); }
    const div = el("div", { className: "plot" }); div.dataset.channel = ch;
    div.append(el("div", { className: "title" }, `${ch}${data.units[ch] ? " (" + data.units[ch] + ")" : ""}`));
    box.append(div);
    const pts = (stroke) => ({ stroke, width: 0, points: { show: true, size: 5, fill: stroke, stroke } });
    const opts = {
      width: Math.max(400, box.clientWidth - 10), height: 160, legend: { show: false },
      scales: { x: { time: true } },
      series: [{}, { label: "observed", ...pts("#1565c0") }, { label: "fill", ...pts("#ef6c00") }, { label: "revision", ...pts("#2e7d32") },
        { label: "forecast", stroke: "#8e24aa", width: 2, spanGaps: true, points: { show: true, size: 4 } }],
      hooks: { drawClear: [(u) => gapShade(u, xs, gap)], draw: [() => { drawn++; if (drawn >= channels.length) document.body.dataset.plotted = data.station; }] },
    };
    plots.push(new uPlot(opts, [xs, obs, fill, rev, fcs], div));
  }
  if (!channels.length) document.body.dataset.plotted = data.station;
}

async function refresh() {
  const st = await getJSON("/api/state"); if (!st) return; lastState = st;
  $("prefix").textContent = st.prefix;
  if (!chosen) { const names = Object.keys(st.stations); const want = decodeURIComponent(location.hash.slice(1)); chosen = names.includes(want) ? want : names[0] || null; }
  renderStations(st); renderGateways(st);
  if (!chosen) return;
  const data = await getJSON("/api/station/" + encodeURIComponent(chosen)); if (!data) return;
  $("station-name").textContent = data.station;
  const s = $("station-state"); s.textContent = data.state; s.className = "state state-" + data.state; s.dataset.state = data.state;
  $("points").textContent = String(data.counts.filled || 0); $("revisions").textContent = String(data.counts.revisions || 0);
  $("forecast-info").textContent = data.forecast ? `forecast from ${data.forecast.origin}, ${data.forecast.horizon} steps (${data.forecast.method})` : "no forecast yet";
  renderSkill(data.skill); renderPlots(data);
}

function schedule() { if (pending) return; pending = setTimeout(() => { pending = null; refresh(); }, 250); }

const es = new EventSource("/events");
es.onopen = () => { $("live").textContent = "live"; $("live").classList.add("on"); };
es.onerror = () => { $("live").textContent = "reconnecting"; $("live").classList.remove("on"); };
es.addEventListener("update", schedule);
refresh();
