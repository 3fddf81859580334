// fuse ui: the Compose and Results pages. Plain JS, no library; every check is done by the server
// with fusion's own validator, this file only draws what it answers.
"use strict";

const $ = (id) => document.getElementById(id);
let catalog = null;
let composed = null;
let composeSeq = 0;
let results = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const response = await fetch(path, options);
  const data = await response.json();
  if (!response.ok && data.ok === false && !("command" in data)) throw new Error(data.error || response.statusText);
  return data;
}

function setStatus(text) { $("status").textContent = text; }

// ---------------------------------------------------------------- compose

function findComponent(section, name) {
  for (const group of catalog.sections[section]) {
    for (const item of group.items) if (item.name === name) return item;
  }
  return null;
}

function fillSelect(select, section, { allowNone = false } = {}) {
  select.replaceChildren();
  if (allowNone) select.append(el("option", { value: "", text: "(none: no evaluation)" }));
  for (const group of catalog.sections[section]) {
    const optgroup = el("optgroup", { label: `plugin ${group.plugin}` });
    for (const item of group.items) optgroup.append(el("option", { value: item.name, text: `${item.name} — ${item.summary}` }));
    select.append(optgroup);
  }
}

function fieldInput(section, field) {
  const id = `f-${section}-${field.name}`;
  let input;
  if (field.widget === "bool" || field.widget === "choice") {
    const choices = field.widget === "bool" ? ["true", "false"] : field.choices;
    input = el("select", { id, "data-section": section, "data-field": field.name });
    if (field.default_by) input.append(el("option", { value: "", class: "by-default", text: field.default_by.value }));  // unset
    for (const choice of choices) input.append(el("option", { value: choice, text: choice }));
    input.value = field.default;
  } else {
    input = el("input", { id, type: "text", value: field.default, placeholder: field.required ? "(required)" : field.default,
                          spellcheck: "false", autocomplete: "off", "data-section": section, "data-field": field.name });
  }
  const changed = () => { showChosenDefaults(section); scheduleCompose(); };
  input.addEventListener(input.tagName === "SELECT" ? "change" : "input", changed);
  const reset = el("button", { type: "button", class: "reset", title: "back to the default", text: "↺",
                               onclick: () => { input.value = field.default; changed(); } });
  return el("div", { class: "field", id: `field-${section}-${field.name}` },
    el("label", { for: id }, el("code", { text: field.name }), el("span", { class: "type", text: field.type })),
    el("div", { class: "input-row" }, input, reset),
    el("div", { class: "help" }, field.help, " ", el("span", { class: "default", id: `default-${section}-${field.name}`,
      text: field.required ? "required" : `default: ${field.default_by ? field.default_by.text : field.default}` })),
    el("div", { class: "field-error", id: `error-${section}-${field.name}` }));
}

const sectionFields = {};

// The text a field of the section holds now (its default when left empty).
function currentText(section, name) {
  const field = (sectionFields[section] || []).find((f) => f.name === name);
  const input = $(`f-${section}-${name}`);
  const text = input ? input.value.trim() : "";
  return text === "" && field ? field.default : text;
}

// A field that another field (a method's convention) fills when it is left unset: the value the
// current choice gives it, as the core's DefaultBy.describe writes it, in its placeholder and help.
function showChosenDefaults(section) {
  for (const field of sectionFields[section] || []) {
    const by = field.default_by;
    if (!by) continue;
    const choice = currentText(section, by.field);
    const match = by.cases.find((c) => c.choice === choice && currentText(section, c.when) === c.equals);
    const value = match ? match.value : by.values[choice];
    const input = $(`f-${section}-${field.name}`);
    const short = value === undefined ? `set by ${by.field}` : `${value} (${by.field} ${choice})`;
    if (input.tagName === "SELECT") input.querySelector("option.by-default").textContent = short;
    else input.placeholder = short;
    const others = Object.entries(by.values).filter(([c]) => c !== choice).map(([c, v]) => `${c}: ${v}`).join(", ");
    const cases = by.cases.map((c) => `; ${c.choice} with ${c.when}=${c.equals}: ${c.value}`).join("");
    $(`default-${section}-${field.name}`).textContent = value === undefined ? `default: set by ${by.field} (${others}${cases})`
      : `default: ${value} (${by.field} ${choice}${others ? `; ${others}` : ""}${cases})`;
  }
}

function renderFields(section, fields) {
  const box = $(`fields-${section}`);
  sectionFields[section] = fields;
  box.replaceChildren(...fields.map((f) => fieldInput(section, f)));
  if (!fields.length) box.append(el("p", { class: "help", text: "no fields" }));
  showChosenDefaults(section);
}

function renderMethodInfo(method) {
  const info = $("method-info");
  info.replaceChildren(
    el("p", {}, el("strong", { text: method.name }), ` (plugin ${method.plugin}${method.dist ? `, ${method.dist}` : ""}): ${method.summary}`),
    method.capabilities.length ? el("p", { class: "tags" }, method.capabilities.map((c) => el("span", { class: "tag", text: c }))) : null,
    method.reference ? el("p", {}, "paper: ", el("a", { href: method.reference, rel: "noreferrer noopener", target: "_blank", text: method.reference })) : null,
    method.fusionbench_config ? el("p", { class: "help", text: `defaults: FusionBench's fusion_bench_config/method/${method.fusionbench_config} (checked by the parity suite)` }) : null,
  );
}

function onComponentChange(section) {
  const select = $(section);
  const component = findComponent(section, select.value);
  if (section === "method") renderMethodInfo(component);
  renderFields(section, component ? component.fields : []);
  scheduleCompose();
}

function onBenchmarkChange() {
  const bench = catalog.benchmarks.find((b) => b.name === $("benchmark").value);
  $("benchmark-info").textContent = bench
    ? `${bench.summary} — model pool ${bench.modelpool.name}, task pool ${bench.taskpool.name} (plugin ${bench.plugin})` : "";
  scheduleCompose();
}

function mode() { return $("mode-pools").checked ? "pools" : "benchmark"; }

function onModeChange() {
  $("bench-row").classList.toggle("hidden", mode() !== "benchmark");
  $("pools-row").classList.toggle("hidden", mode() !== "pools");
  scheduleCompose();
}

function pageState() {
  const values = {};
  for (const input of document.querySelectorAll("[data-section]")) {
    const section = input.dataset.section;
    if (mode() === "benchmark" && (section === "modelpool" || section === "taskpool")) continue;
    (values[section] = values[section] || {})[input.dataset.field] = input.value;
  }
  return { mode: mode(), benchmark: $("benchmark").value, method: $("method").value,
           modelpool: $("modelpool").value, taskpool: $("taskpool").value, values, extra: $("extra-overrides").value };
}

let composeTimer = null;
function scheduleCompose() {
  clearTimeout(composeTimer);
  composeTimer = setTimeout(runCompose, 120);
}

async function runCompose() {
  const seq = ++composeSeq;
  setStatus("validating…");
  let data;
  try {
    data = await api("/api/compose", pageState());
  } catch (err) {
    showError(String(err.message || err));
    return;
  }
  if (seq !== composeSeq) return;  // a newer change is on its way
  composed = data;
  renderComposed(data);
  setStatus(data.ok ? "valid" : "invalid");
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").classList.toggle("hidden", !message);
}

function renderComposed(data) {
  $("command").textContent = data.command;
  $("yaml").textContent = data.yaml || "";
  showError(data.ok ? "" : data.error);
  for (const node of document.querySelectorAll(".field-error")) node.textContent = "";
  for (const node of document.querySelectorAll(".field.invalid")) node.classList.remove("invalid");
  for (const [key, message] of Object.entries(data.field_errors || {})) {
    const [section, ...rest] = key.split(".");
    const name = rest.join(".");
    const target = $(`error-${section}-${name}`);
    if (target) {
      target.textContent = message;
      $(`field-${section}-${name}`).classList.add("invalid");
    }
  }
  $("merge-box").classList.toggle("hidden", !data.merge);
  $("merge-command").textContent = data.merge || "";
  $("command").classList.toggle("stale", !data.ok);
  $("dry-run").disabled = !data.ok;
  if ($("run-stop").classList.contains("hidden")) $("run-start").disabled = !data.ok;
}

async function onDryRun() {
  const out = $("dry-run-output");
  out.classList.remove("hidden", "failed");
  out.textContent = "running the dry run…";
  try {
    const data = await api("/api/dry-run", pageState());
    if (data.ok) {
      out.textContent = `dry run: config, names and files are valid; nothing was loaded.\n\n${data.plan}`;
    } else {
      out.classList.add("failed");
      out.textContent = `error: ${data.error}`;
    }
  } catch (err) {
    out.classList.add("failed");
    out.textContent = `error: ${err.message || err}`;
  }
}

// ---------------------------------------------------------------- run (localhost only)

let runNext = 0;
let runTimer = null;

function showRunStatus(data) {
  const log = $("run-log");
  if (data.state !== "idle") log.classList.remove("hidden");
  if (data.lines.length) {
    log.textContent += data.lines.join("\n") + "\n";
    log.scrollTop = log.scrollHeight;
  }
  runNext = data.next;
  const running = data.state === "running";
  $("run-stop").classList.toggle("hidden", !running);
  $("run-start").disabled = running || !(composed && composed.ok);
  const seconds = data.seconds === null ? "" : ` (${data.seconds} s)`;
  $("run-state").textContent = data.state === "idle" ? "starts the command above in the server's folder (output under runs/); Stop ends it" : `${data.state}${seconds}: ${data.command}` +
    (data.returncode !== null && data.state !== "running" ? `, exit ${data.returncode}` : "");
  clearTimeout(runTimer);
  if (running) runTimer = setTimeout(pollRun, 1000);
}

async function pollRun() {
  try { showRunStatus(await api(`/api/runs/status?since=${runNext}`)); } catch (err) { reportError(err); }
}

async function onRunStart() {
  $("run-log").textContent = "";
  runNext = 0;
  try {
    showRunStatus(await api("/api/runs/start", pageState()));
  } catch (err) {
    $("run-state").textContent = `error: ${err.message || err}`;
  }
}

async function onRunStop() {
  $("run-stop").disabled = true;
  try { showRunStatus(await api("/api/runs/stop", {})); } catch (err) { reportError(err); }
  $("run-stop").disabled = false;
}

function copyText(id) {
  const text = $(id).textContent;
  if (navigator.clipboard) navigator.clipboard.writeText(text).then(() => setStatus("copied"), () => setStatus("select and copy"));
}

function downloadYaml() {
  if (!composed || !composed.yaml) return;
  const blob = new Blob([composed.yaml], { type: "text/yaml" });
  const link = el("a", { href: URL.createObjectURL(blob), download: "experiment.yaml" });
  document.body.append(link);
  link.click();
  link.remove();
}

function initCompose() {
  const benchSelect = $("benchmark");
  for (const bench of catalog.benchmarks) benchSelect.append(el("option", { value: bench.name, text: `${bench.name} (plugin ${bench.plugin})` }));
  if (catalog.benchmarks.some((b) => b.name === catalog.default_benchmark)) benchSelect.value = catalog.default_benchmark;
  if (!catalog.benchmarks.length) { $("mode-pools").checked = true; $("mode-benchmark").disabled = true; }
  fillSelect($("method"), "method");
  fillSelect($("modelpool"), "modelpool");
  fillSelect($("taskpool"), "taskpool", { allowNone: true });
  const bench = catalog.benchmarks.find((b) => b.name === benchSelect.value);
  if (bench && bench.methods.length) $("method").value = bench.methods[0];
  renderFields("settings", catalog.settings);
  benchSelect.addEventListener("change", onBenchmarkChange);
  for (const section of ["method", "modelpool", "taskpool"]) $(section).addEventListener("change", () => onComponentChange(section));
  for (const radio of document.querySelectorAll("input[name=mode]")) radio.addEventListener("change", onModeChange);
  $("dry-run").addEventListener("click", onDryRun);
  $("extra-overrides").addEventListener("input", scheduleCompose);
  $("copy-command").addEventListener("click", () => copyText("command"));
  $("copy-merge").addEventListener("click", () => copyText("merge-command"));
  $("download-yaml").addEventListener("click", downloadYaml);
  if (catalog.runs) {
    $("run-box").classList.remove("hidden");
    $("run-start").addEventListener("click", onRunStart);
    $("run-stop").addEventListener("click", onRunStop);
    pollRun();
  }
  for (const section of ["method", "modelpool", "taskpool"]) {
    const component = findComponent(section, $(section).value);
    if (section === "method" && component) renderMethodInfo(component);
    renderFields(section, component ? component.fields : []);
  }
  onModeChange();
  onBenchmarkChange();
}

// ---------------------------------------------------------------- results

const PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd"];
const BASELINE_COLORS = { pretrained: "#b8b8b8", individual: "#6f6f6f" };

function fmt(value, percent) {
  if (value === null || value === undefined) return "–";
  return percent ? (100 * value).toFixed(1) : Number(value).toPrecision(4);
}

function fmtStat(stat, percent) {
  if (!stat) return "–";
  let text = fmt(stat.mean, percent);
  if (stat.std !== null && stat.std !== undefined) text += ` ± ${percent ? (100 * stat.std).toFixed(1) : Number(stat.std).toPrecision(2)}`;
  return text;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  for (const child of children.flat()) if (child) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

// Grouped vertical bars: groups (x labels) × series (one bar each), values already scaled.
function barChart({ groups, series, unit, max }) {
  const barW = Math.max(6, Math.min(22, 260 / Math.max(1, series.length * groups.length / 4)));
  const groupW = series.length * barW + 18;
  const left = 48, top = 14, plotH = 220, bottom = 86;
  const legendH = 18 * Math.ceil(series.length / 3);
  const width = Math.max(520, left + groups.length * groupW + 20);
  const height = top + plotH + bottom + legendH;
  const top_ = max || Math.max(1e-9, ...series.flatMap((s) => s.values.filter((v) => v !== null)));
  const ceiling = unit === "%" ? Math.min(100, Math.ceil(top_ / 10) * 10) : top_ * 1.05;
  const y = (v) => top + plotH - (v / ceiling) * plotH;
  const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img" });
  for (let i = 0; i <= 5; i += 1) {
    const v = (ceiling * i) / 5;
    root.append(svg("line", { x1: left, x2: width - 10, y1: y(v), y2: y(v), stroke: "#e4e4e4" }),
                svg("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end", class: "axis" }, unit === "%" ? v.toFixed(0) : v.toPrecision(2)));
  }
  root.append(svg("text", { x: 12, y: top + plotH / 2, transform: `rotate(-90 12 ${top + plotH / 2})`, "text-anchor": "middle", class: "axis" }, unit || "value"));
  groups.forEach((group, g) => {
    const x0 = left + 10 + g * groupW;
    series.forEach((s, i) => {
      const v = s.values[g];
      if (v === null || v === undefined) return;
      const rect = svg("rect", { x: x0 + i * barW, y: y(Math.max(0, v)), width: barW - 2, height: Math.max(0, y(0) - y(Math.max(0, v))), fill: s.color });
      rect.append(svg("title", {}, `${s.name} on ${group}: ${unit === "%" ? v.toFixed(1) + " %" : v.toPrecision(4)}`));
      root.append(rect);
    });
    const cx = x0 + (series.length * barW) / 2;
    root.append(svg("text", { x: cx, y: top + plotH + 14, transform: `rotate(30 ${cx} ${top + plotH + 14})`, class: "axis" }, group));
  });
  series.forEach((s, i) => {
    const lx = left + (i % 3) * 220, ly = top + plotH + bottom + 18 * Math.floor(i / 3);
    root.append(svg("rect", { x: lx, y: ly - 10, width: 12, height: 12, fill: s.color }),
                svg("text", { x: lx + 16, y: ly, class: "legend" }, s.name.length > 32 ? s.name.slice(0, 31) + "…" : s.name));
  });
  return root;
}

function renderFilters(data) {
  for (const [id, key] of [["filter-benchmark", "benchmarks"], ["filter-method", "methods"], ["filter-seed", "seeds"]]) {
    const select = $(id);
    const current = select.value;
    select.replaceChildren(el("option", { value: "", text: "all" }), ...data.filters[key].map((v) => el("option", { value: v, text: v })));
    select.value = data.filters[key].map(String).includes(current) ? current : "";
  }
}

function renderLeaderboard(data) {
  const table = $("leaderboard");
  const unit = data.percent ? `${data.metric} (%)` : data.metric;
  $("board-title").textContent = `Leaderboard — ${data.title}, ${unit}`;
  const head = el("tr", {}, ["#", "method", "config", "seeds", ...data.tasks, "average"].map((h) => el("th", { text: h })));
  const rows = data.rows.map((row, i) => el("tr", { class: row.kind === "baseline" ? "baseline" : "" },
    el("td", { text: i + 1 }), el("td", { text: row.label }), el("td", { class: "config", text: row.config || "–" }),
    el("td", { text: row.seeds.length }),
    data.tasks.map((t) => el("td", { class: "num", text: fmtStat(row.tasks[t], data.percent) })),
    el("td", { class: "num strong", text: fmtStat(row.average, data.percent) })));
  table.replaceChildren(el("thead", {}, head), el("tbody", {}, rows));
  const scale = data.percent ? 100 : 1;
  const top = data.rows.slice(0, 10);
  $("board-plot").replaceChildren(top.length ? barChart({
    groups: [...data.tasks, "average"],
    series: top.map((row, i) => ({ name: row.name, color: BASELINE_COLORS[row.label] || PALETTE[i % PALETTE.length],
      values: [...data.tasks.map((t) => (row.tasks[t] ? scale * row.tasks[t].mean : null)), row.average ? scale * row.average.mean : null] })),
    unit: data.percent ? "%" : data.metric,
  }) : "");
}

function renderRuns(data) {
  const head = el("tr", {}, ["run", "method", "config", "seed", "benchmark", "average", "duration", "stored"].map((h) => el("th", { text: h })));
  const rows = data.runs.map((run) => el("tr", { class: run.kind === "baseline" ? "baseline" : "" },
    el("td", {}, el("a", { href: `#run=${encodeURIComponent(run.id)}`, class: "run-link", "data-id": run.id, text: run.id.slice(0, 10) + "…:" + run.seed })),
    el("td", { text: run.kind === "baseline" ? "pretrained / individual" : run.label }),
    el("td", { class: "config", text: run.config || "–" }), el("td", { text: run.seed }), el("td", { text: run.benchmark || "–" }),
    el("td", { class: "num", text: fmt(run.average, data.percent) }),
    el("td", { class: "num", text: run.duration_s === null ? "–" : `${run.duration_s.toFixed(1)} s` }),
    el("td", { text: run.created_at.replace("T", " ").replace("+00:00", " UTC") })));
  $("runs").replaceChildren(el("thead", {}, head), el("tbody", {}, rows));
  for (const id of ["diff-a", "diff-b"]) {
    $(id).replaceChildren(...data.runs.map((run) => el("option", { value: run.id,
      text: `${run.kind === "baseline" ? "baselines" : run.label}${run.config ? ` (${run.config})` : ""} seed ${run.seed}` })));
  }
  const methodRuns = data.runs.filter((run) => run.kind === "method");  // compare two method runs by default
  if (methodRuns.length > 1) { $("diff-a").value = methodRuns[0].id; $("diff-b").value = methodRuns[1].id; }
  else if (data.runs.length > 1) $("diff-b").selectedIndex = 1;
}

async function loadResults() {
  const params = new URLSearchParams({ benchmark: $("filter-benchmark").value, method: $("filter-method").value, seed: $("filter-seed").value });
  const data = await api(`/api/results?${params}`);
  results = data;
  $("db-path").textContent = `database: ${data.db}`;
  $("results-missing").classList.toggle("hidden", !data.missing);
  $("results-body").classList.toggle("hidden", Boolean(data.missing));
  if (data.missing) { $("results-missing").textContent = data.missing; return; }
  renderFilters(data);
  renderLeaderboard(data);
  renderRuns(data);
}

async function loadReports() {
  const data = await api("/api/reports");
  $("reports-title").replaceChildren("Reports of ", el("code", { text: "fuse run" }), ` in ${data.runs_dir}/`);
  const head = el("tr", {}, ["run", "method", "benchmark", "seed", "average", "duration", "peak memory", "started"].map((h) => el("th", { text: h })));
  const rows = data.reports.map((r) => el("tr", {},
    el("td", {}, el("a", { href: `#report=${encodeURIComponent(r.name)}`, class: "report-link", text: r.name })),
    el("td", { text: r.method }), el("td", { text: r.benchmark || "–" }), el("td", { text: r.seed }),
    el("td", { class: "num", text: fmt(r.average, r.percent) }),
    el("td", { class: "num", text: r.duration_s === null || r.duration_s === undefined ? "–" : `${Number(r.duration_s).toFixed(1)} s` }),
    el("td", { class: "num", text: r.peak_rss_mb ? `${r.peak_rss_mb} MiB` : "–" }), el("td", { text: r.started || "" })));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 8, class: "muted", text: "none yet (fuse run writes runs/<method>-<time>/report.json)" })));
  $("reports").replaceChildren(el("thead", {}, head), el("tbody", {}, rows));
}

async function showRun(id) {
  renderRunDetail(await api(`/api/run?id=${encodeURIComponent(id)}`));
}

async function showReport(name) {
  renderRunDetail(await api(`/api/report?name=${encodeURIComponent(name)}`));
}

function renderRunDetail(data) {
  $("run-detail").classList.remove("hidden");
  $("run-title").textContent = `Run ${data.kind === "baseline" ? "baselines" : data.label}${data.config_summary ? ` (${data.config_summary})` : ""}, seed ${data.seed}`;
  const labels = Object.keys(data.results);
  const order = [...labels.filter((l) => l === "pretrained"), ...labels.filter((l) => l !== "pretrained" && l !== "individual"), ...labels.filter((l) => l === "individual")];
  const tasks = [];
  for (const label of order) for (const task of Object.keys(data.results[label])) if (!tasks.includes(task)) tasks.push(task);
  const scale = data.percent ? 100 : 1;
  $("run-plot").replaceChildren(barChart({
    groups: tasks,
    series: order.map((label, i) => ({ name: label, color: BASELINE_COLORS[label] || PALETTE[i % PALETTE.length],
      values: tasks.map((t) => (data.results[label][t] === undefined || data.results[label][t] === null ? null : scale * data.results[label][t])) })),
    unit: data.percent ? "%" : data.metric,
  }));
  $("run-config").textContent = JSON.stringify(data.config, null, 2);
  const meta = [
    ["status", data.status + (data.error ? `: ${data.error}` : "")], ["benchmark", data.benchmark || "–"], ["seed", data.seed],
    ["stored", data.created_at], ["duration", data.duration_s === null ? "–" : `${data.duration_s.toFixed(2)} s`],
    ["peak memory", data.peak_rss_mb ? `${data.peak_rss_mb} MiB` : "not recorded"],
    ...Object.entries(data.timings).map(([k, v]) => [`time: ${k}`, `${Number(v).toFixed(2)} s`]),
    ...Object.entries(data.versions).map(([k, v]) => [`version: ${k}`, typeof v === "object" ? JSON.stringify(v) : String(v)]),
  ];
  $("run-meta").replaceChildren(el("tbody", {}, meta.map(([k, v]) => el("tr", {}, el("th", { text: k }), el("td", { text: v })))));
  $("run-detail").scrollIntoView({ behavior: "instant", block: "start" });
}

async function onDiff() {
  const data = await api(`/api/diff?a=${encodeURIComponent($("diff-a").value)}&b=${encodeURIComponent($("diff-b").value)}`);
  const head = el("tr", {}, el("th", { text: "key" }), el("th", { text: `A: ${data.a.label} ${data.a.config}` }), el("th", { text: `B: ${data.b.label} ${data.b.config}` }));
  const rows = data.differences.map((r) => el("tr", {}, el("td", {}, el("code", { text: r.key })), el("td", { text: r.a }), el("td", { text: r.b })));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 3, text: "the two configs are identical" })));
  $("diff").replaceChildren(el("thead", {}, head), el("tbody", {}, rows));
}

function initResults() {
  for (const id of ["filter-benchmark", "filter-method", "filter-seed"]) $(id).addEventListener("change", () => loadResults().catch(reportError));
  $("diff-button").addEventListener("click", () => onDiff().catch(reportError));
}

// ---------------------------------------------------------------- pages

function reportError(err) { setStatus(`error: ${err.message || err}`); }

async function route() {
  const hash = location.hash || "#compose";
  const onResults = hash.startsWith("#results") || hash.startsWith("#run=") || hash.startsWith("#report=");
  $("page-compose").classList.toggle("hidden", onResults);
  $("page-results").classList.toggle("hidden", !onResults);
  $("tab-compose").classList.toggle("active", !onResults);
  $("tab-results").classList.toggle("active", onResults);
  if (!onResults) return;
  setStatus("");
  const detail = hash.startsWith("#run=") || hash.startsWith("#report=");
  if (!results || !detail) await Promise.all([loadResults(), loadReports()]);  // fresh on each visit: a bench may be writing
  if (hash.startsWith("#run=")) await showRun(decodeURIComponent(hash.slice(5)));
  else if (hash.startsWith("#report=")) await showReport(decodeURIComponent(hash.slice(8)));
  else $("run-detail").classList.add("hidden");
}

async function main() {
  try {
    catalog = await api("/api/catalog");
    initCompose();
    initResults();
    window.addEventListener("hashchange", () => route().catch(reportError));
    await route();
  } catch (err) {
    reportError(err);
  }
}

main();
