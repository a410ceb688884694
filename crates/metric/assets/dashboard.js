// The dashboard page: polls /api/dashboard once a second and draws it with uPlot.
// window.dashboard exposes the charts and the last answer (the browser test reads them).
"use strict";

const dashboard = { charts: {}, last: null, versionsKey: null };
window.dashboard = dashboard;

const COLORS = ["#1565c0", "#d84315", "#2e7d32", "#6a1b9a", "#00838f", "#f9a825", "#4e342e", "#ad1457"];
const $ = (id) => document.getElementById(id);
const fixed = (x, digits) => (x === null || x === undefined || !isFinite(x) ? "–" : x.toFixed(digits));

function chartWidth(id) {
  return Math.max(300, $(id).clientWidth || 400);
}

function setPill(id, text, cls) {
  const el = $(id);
  el.textContent = text;
  el.className = "pill " + cls;
}

// A new chart in the element `id`, replacing the chart stored as dashboard.charts[key].
function makeChart(key, id, opts, data) {
  const old = dashboard.charts[key];
  if (old) old.destroy();
  const chart = new uPlot({ width: chartWidth(id), height: 260, ...opts }, data, $(id));
  dashboard.charts[key] = chart;
  return chart;
}

function drawMaeHistory(state) {
  const versions = state.history.series.map((s) => s.version);
  const data = [state.history.t, ...state.history.series.map((s) => s.mae)];
  const key = versions.join("\u0000");
  if (dashboard.versionsKey !== key || !dashboard.charts.mae) {
    dashboard.versionsKey = key;
    const series = [{}, ...versions.map((v, i) => ({
      label: v, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: false,
    }))];
    makeChart("mae", "chart-mae", { series, axes: [{}, { label: "MAE" }] }, data);
  } else {
    dashboard.charts.mae.setData(data);
  }
}

function drawErrors(state) {
  const summary = state.errors;
  $("errors-count").textContent = summary ? summary.count.toLocaleString("en-US") : "0";
  const bins = summary ? summary.bins : [];
  const width = summary ? summary.upper / bins.length : 1;
  const data = [bins.map((_, i) => (i + 0.5) * width), bins];
  if (!dashboard.charts.errors) {
    makeChart("errors", "chart-errors", {
      scales: { x: { time: false } },
      series: [{ label: "|error|" }, {
        label: "pairs", fill: "#568cc4aa", stroke: "#568cc4",
        paths: uPlot.paths.bars({ size: [0.9, Infinity] }), points: { show: false },
      }],
      axes: [{ label: "absolute error" }, { label: "pairs" }],
    }, data);
  } else {
    dashboard.charts.errors.setData(data);
  }
}

function drawScatter(state) {
  const points = state.recent.y_true.map((t, i) => [t, state.recent.y_pred[i]]);
  points.sort((a, b) => a[0] - b[0]);
  $("recent-count").textContent = points.length;
  const xs = points.map((p) => p[0]);
  const data = [xs, points.map((p) => p[1]), xs.slice()];
  if (!dashboard.charts.scatter) {
    makeChart("scatter", "chart-scatter", {
      scales: { x: { time: false } },
      series: [{ label: "true" }, {
        label: "predicted", stroke: "#1565c0", paths: () => null,
        points: { show: true, size: 5, fill: "#1565c0" },
      }, { label: "y = x", stroke: "#888", width: 1, points: { show: false } }],
      axes: [{ label: "true" }, { label: "predicted" }],
    }, data);
  } else {
    dashboard.charts.scatter.setData(data);
  }
}

// PARTITIONS > 1: which partitions this instance serves, its totals, and a link to each one's page.
function renderPartitions(partitions) {
  const line = $("partitions");
  line.hidden = !partitions;
  if (!partitions) return;
  line.textContent = `${partitions.served}: ${partitions.pairs.toLocaleString("en-US")} pairs, ` +
    `${partitions.waiting.toLocaleString("en-US")} waiting in all; this page: ${partitions.page} · `;
  for (const page of partitions.pages) {
    const link = document.createElement("a");
    link.href = "/" + page;
    link.textContent = page;
    link.style.marginRight = ".5em";
    line.append(link);
  }
}

// TASK=classification: the classifier's tiles, versions, confusion matrix and calibration in
// place of the regression's.
function renderClassification(state) {
  const report = state.classification;
  const on = !!report;
  $("class-tiles").hidden = !on;
  $("class-section").hidden = !on;
  $("regression-tiles").hidden = on;
  for (const el of document.querySelectorAll(".regression-only")) el.hidden = on;
  if (!on) return false;
  const all = report.all, win = report.window;
  $("acc-all").textContent = fixed(all.accuracy, 4);
  $("acc-window").textContent = fixed(win.accuracy, 4);
  $("logloss-all").textContent = fixed(all.log_loss, 4);
  $("logloss-window").textContent = fixed(win.log_loss, 4);
  $("f1-all").textContent = fixed(all.f1_macro, 4);
  $("f1-window").textContent = fixed(win.f1_macro, 4);
  $("brier-all").textContent = fixed(all.brier, 4);
  $("brier-window").textContent = fixed(win.brier, 4);
  $("auc-window").textContent = fixed(win.roc_auc, 4);
  $("unknown-all").textContent = all.unknown_class.toLocaleString("en-US");
  $("class-ratio").textContent = state.alert_ratio;
  const body = $("class-versions");
  body.innerHTML = "";
  for (const v of report.versions) {
    const row = body.insertRow();
    if (v.alarm.retired) row.className = "retired";
    else if (v.alarm.alarm) row.className = "alarm";
    for (const text of [v.model_version, v.all.n.toLocaleString("en-US"), fixed(v.all.accuracy, 4),
      fixed(v.all.log_loss, 4), fixed(v.alarm.windowed, 4), fixed(v.alarm.baseline, 4),
      fixed(v.window.prediction_psi, 3), v.alarm.retired ? "retired" : v.alarm.alarm ? "ALARM" : "ok"]) {
      row.insertCell().textContent = text;
    }
  }
  const cells = win.confusion || [];
  $("confusion-count").textContent = win.n.toLocaleString("en-US");
  const classes = [...new Set(cells.flatMap((c) => [c.y_true, c.y_pred]))].sort();
  const count = (t, p) => (cells.find((c) => c.y_true === t && c.y_pred === p) || { n: 0 }).n;
  const table = $("confusion");
  table.innerHTML = "";
  const head = table.insertRow();
  head.insertCell().textContent = "true \\ predicted";
  for (const c of classes) head.insertCell().textContent = c;
  for (const t of classes) {
    const row = table.insertRow();
    row.insertCell().textContent = t;
    for (const p of classes) {
      const cell = row.insertCell();
      cell.textContent = count(t, p).toLocaleString("en-US");
      if (t === p) cell.style.fontWeight = "600";
    }
  }
  const calibration = $("calibration");
  calibration.innerHTML = "";
  for (const bin of win.calibration || []) {
    const row = calibration.insertRow();
    for (const text of [`${fixed(bin.from, 1)}–${fixed(bin.from + 0.1, 1)}`, bin.n.toLocaleString("en-US"),
      fixed(bin.confidence, 3), fixed(bin.accuracy, 3)]) {
      row.insertCell().textContent = text;
    }
  }
  const alarms = report.versions.filter((v) => v.alarm.alarm && !v.alarm.retired).map((v) => v.model_version);
  if (alarms.length) setPill("alarm", "ALARM: " + alarms.join(", "), "bad");
  else setPill("alarm", "ok", "ok");
  return true;
}

function render(answer) {
  dashboard.last = answer;
  const status = answer.status;
  if (status.broker_connected) setPill("broker", "connected", "ok");
  else setPill("broker", "disconnected", "bad");
  $("health").textContent = status.health === "ok" ? "" : "health: " + status.health;
  renderPartitions(status.partitions);
  $("dead-letters").innerHTML = "";
  for (const d of status.dead_letters) {
    const row = $("dead-letters").insertRow();
    row.insertCell().textContent = d.queue;
    row.insertCell().textContent = d.reason;
    row.insertCell().textContent = d.count.toLocaleString("en-US");
  }
  if (!status.dead_letters.length) $("dead-letters").insertRow().insertCell().textContent = "none";

  const state = answer.state;
  if (!state) return;
  $("pairs").textContent = state.pairs.toLocaleString("en-US");
  $("rate").textContent = fixed(state.pairs_per_second, 1);
  $("waiting").textContent = state.waiting.toLocaleString("en-US");
  const audit = state.audit;
  $("audit").hidden = !audit;
  if (audit) {
    const n = (x) => x.toLocaleString("en-US");
    $("audit").textContent = `Loss audit, last hour: ${n(audit.complete)} windows complete, ` +
      `${n(audit.incomplete)} incomplete, ${n(audit.missing)} samples missing` +
      (audit.late ? `, ${n(audit.late)} arrived late` : "") +
      (audit.pending ? ` · ${n(audit.pending)} windows in their grace time` : "");
    $("audit").style.color = audit.missing ? "#c0392b" : "";
  }
  $("window-size").textContent = state.window_size.toLocaleString("en-US");
  if (renderClassification(state)) return;
  $("ratio").textContent = state.alert_ratio;
  $("mae-all").textContent = fixed(state.all.mae, 3);
  $("rmse-all").textContent = fixed(state.all.rmse, 3);
  $("r2-all").textContent = fixed(state.all.r2, 4);
  $("mae-window").textContent = fixed(state.window.mae, 3);
  $("rmse-window").textContent = fixed(state.window.rmse, 3);
  $("r2-window").textContent = fixed(state.window.r2, 4);

  const body = $("versions");
  body.innerHTML = "";
  for (const v of state.versions) {
    const row = body.insertRow();
    // A retired version (replaced for QUALITY_RETIRE_SECS) has no alarm: greyed, never red.
    if (v.retired) row.className = "retired";
    else if (v.alarm) row.className = "alarm";
    const verdict = v.retired ? "retired" : v.alarm ? "ALARM" : "ok";
    for (const text of [v.version, v.pairs.toLocaleString("en-US"), fixed(v.all.mae, 3), fixed(v.all.rmse, 3),
      fixed(v.all.r2, 4), fixed(v.window.mae, 3), fixed(v.baseline_mae, 3), verdict]) {
      row.insertCell().textContent = text;
    }
  }
  const alarms = state.versions.filter((v) => v.alarm && !v.retired).map((v) => v.version);
  if (alarms.length) setPill("alarm", "ALARM: " + alarms.join(", "), "bad");
  else setPill("alarm", "ok", "ok");

  drawMaeHistory(state);
  drawErrors(state);
  drawScatter(state);
}

async function poll() {
  try {
    // Relative to the page: /p2 reads /p2/api/dashboard (one page per partition).
    const base = location.pathname.replace(/\/?$/, "/");
    const response = await fetch(base + "api/dashboard", { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
  } catch (err) {
    // The service itself is away: the broker state is unknown, so say so.
    setPill("broker", "disconnected (service unreachable)", "bad");
  } finally {
    setTimeout(poll, 1000);
  }
}

window.addEventListener("resize", () => {
  for (const [id, chart] of Object.entries({ "chart-mae": dashboard.charts.mae,
    "chart-errors": dashboard.charts.errors, "chart-scatter": dashboard.charts.scatter })) {
    if (chart) chart.setSize({ width: chartWidth(id), height: 260 });
  }
});

poll();
