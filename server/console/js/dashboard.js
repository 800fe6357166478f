// The engineer's dashboard: per-model figures from /api/dashboard (the /metrics registry,
// differenced over the chosen window) and the newest requests from the trace file.

import { getJSON, Unauthorized } from "./api.js";
import { el, energyText, num } from "./format.js";

const $ = (id) => document.getElementById(id);
const POLL_MS = 2000;
const HISTORY = 150; // chart points kept (5 minutes at one poll every 2 s)

let timer = null;
let chart = null;
let chartModels = "";
const points = { t: [], byModel: new Map() };

function modelRow(m) {
  return el("tr", {},
    el("td", { textContent: m.model }), el("td", { textContent: m.operation ?? "" }),
    el("td", { textContent: m.profile ?? "" }),
    el("td", { textContent: num(m.requests) }), el("td", { textContent: num(m.errors) }),
    el("td", { textContent: num(m.ttft_p50_ms, 1) }), el("td", { textContent: num(m.ttft_p95_ms, 1) }),
    el("td", { textContent: num(m.decode_tokens_per_s, 1) }),
    el("td", { textContent: m.joules_per_output_token == null ? "–"
      : `${num(m.joules_per_output_token, 4)} (${m.energy_source})` }),
    el("td", { textContent: num(m.in_flight) }), el("td", { textContent: num(m.queued) }));
}

function energyLine(body) {
  const sources = Object.entries(body.energy.joules);
  if (!body.energy_meter && !sources.length) return "Energy metering is off.";
  const parts = sources.map(([source, j]) => `${num(j, 2)} J (${source})`);
  const perToken = body.energy.joules_per_output_token;
  return `Energy in window: ${parts.join(", ") || "0 J"} · ${perToken == null ? "–" : num(perToken, 4)} J/token` +
    (body.energy_meter ? ` · meter: ${body.energy_meter}` : "");
}

// TTFT p95 per model over time, one line per model.
function plot(body) {
  const now = Date.now() / 1000;
  points.t.push(now);
  const names = new Set(body.models.map((m) => m.model));
  for (const name of names) if (!points.byModel.has(name)) points.byModel.set(name, points.t.map(() => null));
  for (const [name, series] of points.byModel) {
    const rows = body.models.filter((m) => m.model === name && m.ttft_p95_ms != null);
    series.push(rows.length ? Math.max(...rows.map((m) => m.ttft_p95_ms)) : null);
  }
  if (points.t.length > HISTORY) {
    points.t.shift();
    for (const series of points.byModel.values()) series.shift();
  }
  if (typeof uPlot === "undefined") return;
  const models = [...points.byModel.keys()];
  const data = [points.t, ...models.map((m) => points.byModel.get(m))];
  const width = Math.max(300, $("chart").clientWidth || 600);
  if (!chart || chartModels !== models.join("\n")) {
    chart?.destroy();
    chartModels = models.join("\n");
    const colors = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c"];
    chart = new uPlot({
      title: "TTFT p95 (ms) per model", width, height: 220,
      series: [{}, ...models.map((m, i) => ({ label: m, stroke: colors[i % colors.length], spanGaps: true }))],
    }, data, $("chart"));
  } else {
    chart.setData(data);
  }
}

function requestRow(r) {
  const row = el("tr", { class: "clickable", "data-testid": "dashboard-request-row" },
    el("td", { textContent: new Date(r.time_ms).toLocaleTimeString() }),
    el("td", { textContent: r.model ?? "" }), el("td", { textContent: r.profile ?? "" }),
    el("td", { textContent: num(r.ttft_ms, 1) }),
    el("td", { textContent: `${r.input_tokens ?? "–"} / ${r.output_tokens ?? "–"}` }),
    el("td", { textContent: r.joules == null ? "–" : `${num(r.joules, 2)} (${r.energy_source})` }),
    el("td", { textContent: r.status }));
  row.dataset.trace = r.trace_id;
  row.addEventListener("click", () => showSpan(r.trace_id));
  return row;
}

async function showSpan(trace) {
  const view = $("span-view");
  const span = await getJSON(`/api/requests/${trace}`);
  const total = Math.max(span.duration_ms, 1);
  const bars = span.phases.map((p) => el("div", { class: "phase" },
    el("span", { class: "phase-name", textContent: p.name }),
    el("span", { class: "phase-track" }, el("span", {
      class: `phase-bar ${p.name}`,
      style: `margin-left:${(100 * p.start_ms / total).toFixed(2)}%;width:${Math.max(0.5, 100 * p.duration_ms / total).toFixed(2)}%`,
    })),
    el("span", { class: "phase-ms", textContent: `${num(p.duration_ms, 1)} ms` })));
  const attrs = Object.entries(span.attributes).sort(([a], [b]) => a.localeCompare(b))
    .map(([k, v]) => el("tr", {}, el("td", { textContent: k }),
      el("td", { textContent: typeof v === "string" ? v : JSON.stringify(v) })));
  const events = span.events.map((e) => el("li", { textContent: `${num(e.time_ms, 1)} ms: ${e.name}` }));
  view.replaceChildren(
    el("h3", { textContent: `${span.name} · ${num(span.duration_ms, 1)} ms · ${span.status}` }),
    el("p", { textContent: `${energyText(span)} · trace ${span.trace_id}` }),
    ...bars, events.length ? el("ul", {}, ...events) : "",
    el("table", { class: "attributes" }, el("tbody", {}, ...attrs)));
  view.hidden = false;
}

async function refresh() {
  try {
    const body = await getJSON(`/api/dashboard?window_s=${$("window-select").value}`);
    $("metrics-off").hidden = body.metrics;
    $("window-note").textContent = `figures cover the last ${num(body.window_s)} s`;
    $("model-rows").replaceChildren(...body.models.map(modelRow));
    $("energy-line").textContent = energyLine(body);
    plot(body);
    $("traces-off").hidden = body.traces;
    if (body.traces) {
      const recent = await getJSON("/api/requests?limit=25");
      $("request-rows").replaceChildren(...recent.data.map(requestRow));
    } else {
      $("request-rows").replaceChildren();
    }
  } catch (err) {
    if (!(err instanceof Unauthorized)) $("window-note").textContent = `update failed: ${err.message}`;
  }
}

export function startDashboard() {
  if (timer) return;
  refresh();
  timer = setInterval(refresh, POLL_MS);
}

export function stopDashboard() {
  clearInterval(timer);
  timer = null;
}

export function setupDashboard() {
  $("window-select").addEventListener("change", refresh);
}
