// The coordinator's status page: reads the API every few seconds and draws what it answers.
//
// The admin token is pasted once into the form and kept in this tab's sessionStorage; it
// travels only in the Authorization header of the page's own requests, never in a URL.
// Everything the API answers is put into the page as text (textContent, text nodes, SVG
// attributes), never as HTML. docs/api.md describes the routes read here.
"use strict";

const TOKEN_KEY = "cotune.admin-token";
const POLL_MS = 3000;
const API = "../v1"; // the page is served at <coordinator>/ui/
const SVG_NS = "http://www.w3.org/2000/svg";
const LIVE_JOB_STATES = new Set(["pending", "sharding", "running", "merging"]);
const IN_FLIGHT_TASK_STATES = new Set(["queued", "leased", "verifying"]);
const ONLINE_S = 60; // a worker heard from this recently counts as online
const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
  "#17becf", "#7f7f7f", "#bcbd22"];

// ---- the API ---------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message, field) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field;
  }
}

function readToken() {
  return sessionStorage.getItem(TOKEN_KEY);
}

// GET an API route; its JSON, or an ApiError made of the coordinator's error body
// ({"error": {"code", "message", "field"}}, orchestrator/api/errors.py).
async function api(path) {
  const headers = { Accept: "application/json" };
  const token = readToken();
  if (token) headers.Authorization = "Bearer " + token;
  const response = await fetch(API + path, {
    headers,
    cache: "no-store",
    credentials: "omit",
    referrerPolicy: "no-referrer",
  });
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null; // not JSON: a proxy's page, say; the status line tells what happened
  }
  if (!response.ok) {
    const error = (body && body.error) || {};
    throw new ApiError(response.status, error.code || "http_" + response.status,
      error.message || response.statusText || "no answer", error.field);
  }
  return body;
}

function describe(error) {
  if (error instanceof ApiError) {
    const field = error.field ? ` (field ${error.field})` : "";
    return `${error.status} ${error.code}: ${error.message}${field}`;
  }
  return `the coordinator does not answer (${error && error.message ? error.message : error})`;
}

// ---- building the page: elements from text, never from HTML ----------------------------

function fill(element, attrs, children) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined && value !== false) {
      element.setAttribute(key, String(value));
    }
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : String(child)); // a string: a text node
  }
  return element;
}

function h(tag, attrs, ...children) {
  return fill(document.createElement(tag), attrs, children);
}

function svg(tag, attrs, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), attrs, children);
}

function table(columns, rows) {
  return h("table", {},
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", {}, c)))),
    h("tbody", {}, rows));
}

function show(sectionId, ...content) {
  document.querySelector(`#${sectionId} > .body`).replaceChildren(...content);
}

function muted(text) {
  return h("p", { class: "muted" }, text);
}

function stateBadge(state) {
  return h("span", { class: `state state-${state}` }, state);
}

function fmtLoss(x) {
  return Number.isFinite(x) ? x.toFixed(4) : "-";
}

function fmtTime(unixSeconds) {
  return unixSeconds ? new Date(unixSeconds * 1000).toLocaleString() : "-";
}

function fmtAgo(unixSeconds) {
  const s = Math.max(0, Date.now() / 1000 - unixSeconds);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

function fmtCount(x) {
  return Math.round(x).toLocaleString("en");
}

function fmtParams(params) {
  return Object.entries(params || {})
    .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`)
    .join(" ");
}

// ---- sections ------------------------------------------------------------------------------

function renderJobs(jobs, selected) {
  if (!jobs.length) {
    show("jobs", muted("no job yet: cotune submit SPEC"));
    return;
  }
  const rows = [...jobs].reverse().map((job) => h("tr",
    { "data-job": job.job_id, class: job.job_id === selected ? "selected" : null },
    h("td", {}, h("a", { href: "#job=" + encodeURIComponent(job.job_id) }, job.job_id)),
    h("td", {}, stateBadge(job.state)),
    h("td", { class: "num" }, job.trials),
    h("td", { class: "num" }, `${job.tasks.accepted} / ${taskTotal(job.tasks)}`),
    h("td", { class: "num" }, job.best_trial ?? "-"),
    h("td", {}, fmtTime(job.created_at))));
  show("jobs", table(["job", "state", "trials", "tasks accepted", "best trial", "created"], rows));
}

function taskTotal(counts) {
  return Object.values(counts).reduce((a, b) => a + b, 0);
}

function renderJob(job) {
  document.getElementById("job-title").textContent = "Job " + job.job_id;
  const t = job.tasks;
  const facts = [
    ["state", stateBadge(job.state)],
    ["created", fmtTime(job.created_at)],
    ["updated", fmtTime(job.updated_at)],
    ["trials started", job.trials],
    ["best trial", job.best_trial ?? "-"],
    ["tasks", `${t.queued} queued, ${t.leased} leased, ${t.verifying} verifying, ` +
      `${t.accepted} accepted, ${t.failed} failed, ${t.cancelled} cancelled`],
  ];
  if (job.error) facts.push(["error", h("span", { class: "error-text" }, job.error)]);
  const wasOpen = document.querySelector("#job details")?.open;
  show("job",
    h("dl", {}, facts.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
    h("details", { open: wasOpen || null }, h("summary", {}, "spec"), h("pre", {}, job.spec_yaml)));
}

function renderTrials(trials, best) {
  if (!trials.length) {
    show("trials", muted("no trial started yet"));
    return;
  }
  const rows = trials.map((t) => h("tr", { "data-trial": t.number },
    h("td", { class: "num" }, t.number, t.number === best ? h("span", { class: "best" }, " best") : null),
    h("td", {}, stateBadge(t.state)),
    h("td", { class: "num" }, t.rounds_done),
    h("td", { class: "num" }, t.eval_losses.map(fmtLoss).join("  ") || "-"),
    h("td", { class: "params" }, fmtParams(t.params)),
    h("td", { class: "error-text" }, t.error || "")));
  show("trials", table(["trial", "state", "rounds done", "eval loss by round", "params", "error"],
    rows));
}

function renderTasks(trials) {
  const tasks = trials.flatMap((t) => t.tasks
    .filter((task) => IN_FLIGHT_TASK_STATES.has(task.state))
    .map((task) => ({ trial: t.number, ...task })));
  if (!tasks.length) {
    show("tasks", muted("no task in flight"));
    return;
  }
  const rows = tasks.map((task) => h("tr", { "data-task": task.task_id },
    h("td", { class: "num" }, task.trial),
    h("td", { class: "num" }, task.round),
    h("td", { class: "num" }, task.duplicate_of ? `${task.shard} (redundancy)` : task.shard),
    h("td", {}, stateBadge(task.state)),
    h("td", { class: "num" }, task.attempt),
    h("td", { class: "mono" }, task.worker_id || "-"),
    h("td", {},
      h("progress", { max: Math.max(task.max_steps, 1), value: task.step }),
      task.max_steps ? ` ${task.step} / ${task.max_steps}` : " not started"),
    h("td", { class: "num" }, task.loss === null || task.loss === undefined ? "-" : fmtLoss(task.loss))));
  show("tasks", table(["trial", "round", "shard", "state", "attempt", "worker", "steps", "loss"],
    rows));
}

function renderWorkers(workers) {
  if (!workers.length) {
    show("workers", muted("no worker enrolled: cotune token create --join --name NAME"));
    return;
  }
  const now = Date.now() / 1000;
  const rows = workers.map((w) => {
    const online = now - w.last_seen < ONLINE_S;
    const hardware = w.gpus.length ? w.gpus.map((g) => g.name).join(", ") : "CPU";
    return h("tr", { "data-worker": w.worker_id },
      h("td", { class: "mono" }, w.worker_id),
      h("td", {}, w.name),
      h("td", {}, w.kind),
      h("td", {}, hardware, ` (${(w.memory_bytes / 2 ** 30).toFixed(0)} GiB)`),
      h("td", {}, h("span", { class: online ? "online" : "offline" }, online ? "online" : "away"),
        " ", fmtAgo(w.last_seen)),
      h("td", { class: "num" }, fmtCount(w.tokens)),
      h("td", { class: "num" }, `${w.tasks_accepted} / ${w.tasks_failed} / ${w.tasks_rejected} / ` +
        `${w.tasks_expired}`),
      h("td", { class: "num" }, w.leases.length));
  });
  show("workers", table(["worker", "owner", "kind", "hardware", "last seen", "tokens",
    "tasks ok / failed / rejected / expired", "leases"], rows));
}

function renderLeaderboard(board) {
  if (!board.entries.length) {
    show("leaderboard", muted("no contribution accepted yet"));
    return;
  }
  const rows = board.entries.map((e, i) => h("tr", { "data-name": e.name },
    h("td", { class: "num" }, i + 1),
    h("td", {}, e.name),
    h("td", { class: "num" }, fmtCount(e.tokens)),
    h("td", { class: "num" }, e.tasks)));
  show("leaderboard", table(["#", "contributor", "tokens trained", "tasks"], rows));
}

// ---- the eval-loss chart: one line per trial, round on x, eval loss on y --------------------

function niceTicks(lo, hi, count) {
  const raw = (hi - lo) / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(v);
  return { ticks, digits: Math.max(0, -Math.floor(Math.log10(step))) };
}

function renderChart(trials, best) {
  const series = trials.filter((t) => t.eval_losses.some(Number.isFinite));
  if (!series.length) {
    show("loss-chart", muted("no round evaluated yet"));
    return;
  }
  const W = 640, H = 280, left = 60, right = 36, top = 12, bottom = 40;
  const rounds = Math.max(2, ...series.map((t) => t.eval_losses.length));
  const values = series.flatMap((t) => t.eval_losses).filter(Number.isFinite);
  let lo = Math.min(...values), hi = Math.max(...values);
  if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; } // one value: give the axis some height
  const pad = (hi - lo) * 0.08;
  lo -= pad;
  hi += pad;
  const x = (r) => left + (r * (W - left - right)) / (rounds - 1);
  const y = (v) => top + ((hi - v) * (H - top - bottom)) / (hi - lo);

  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img",
    "aria-label": "eval loss by round, one line per trial" });
  const { ticks, digits } = niceTicks(lo, hi, 5);
  for (const v of ticks) {
    chart.append(
      svg("line", { class: "grid", x1: left, x2: W - right, y1: y(v), y2: y(v) }),
      svg("text", { class: "tick", x: left - 6, y: y(v) + 4, "text-anchor": "end" },
        v.toFixed(digits)));
  }
  for (let r = 0; r < rounds; r++) {
    chart.append(svg("text", { class: "tick", x: x(r), y: H - bottom + 16, "text-anchor": "middle" },
      `round ${r}`));
  }
  chart.append(
    svg("line", { class: "axis", x1: left, x2: left, y1: top, y2: H - bottom }),
    svg("line", { class: "axis", x1: left, x2: W - right, y1: H - bottom, y2: H - bottom }),
    svg("text", { class: "axis-title", x: 14, y: top + (H - top - bottom) / 2,
      transform: `rotate(-90 14 ${top + (H - top - bottom) / 2})`, "text-anchor": "middle" },
    "eval loss"));

  for (const t of series) {
    const color = PALETTE[t.number % PALETTE.length];
    const points = t.eval_losses
      .map((v, r) => [r, v])
      .filter(([, v]) => Number.isFinite(v));
    chart.append(svg("polyline", {
      class: t.number === best ? "curve best" : "curve",
      "data-trial": t.number,
      points: points.map(([r, v]) => `${x(r).toFixed(1)},${y(v).toFixed(1)}`).join(" "),
      stroke: color,
      fill: "none",
    }));
    for (const [r, v] of points) {
      chart.append(svg("circle", { class: "point", cx: x(r), cy: y(v), r: 3.5, fill: color },
        svg("title", {}, `trial ${t.number}, round ${r}: eval loss ${fmtLoss(v)}`)));
    }
  }
  const legend = h("ul", { class: "legend" }, series.map((t) => h("li", {},
    svg("svg", { width: 14, height: 14, viewBox: "0 0 14 14", "aria-hidden": "true" },
      svg("rect", { width: 14, height: 14, rx: 3, fill: PALETTE[t.number % PALETTE.length] })),
    ` trial ${t.number} (${t.state}${t.number === best ? ", best" : ""})`)));
  show("loss-chart", chart, legend);
}

// ---- which job is shown: #job=<id>, else the newest live job, else the newest --------------

function chosenJob(jobs) {
  const wanted = new URLSearchParams(location.hash.slice(1)).get("job");
  if (wanted && jobs.some((j) => j.job_id === wanted)) return wanted;
  const newest = [...jobs].sort((a, b) => b.created_at - a.created_at);
  const live = newest.find((j) => LIVE_JOB_STATES.has(j.state));
  return (live || newest[0] || {}).job_id || null;
}

function clearJob() {
  document.getElementById("job-title").textContent = "Job";
  for (const id of ["job", "loss-chart", "trials", "tasks"]) show(id, muted("no job selected"));
}

// ---- polling ---------------------------------------------------------------------------------

async function refreshJobs() {
  const jobs = await api("/jobs");
  const jobId = chosenJob(jobs.jobs);
  renderJobs(jobs.jobs, jobId);
  if (!jobId) {
    clearJob();
    return;
  }
  const path = "/jobs/" + encodeURIComponent(jobId);
  const [job, trials] = await Promise.all([api(path), api(path + "/trials")]);
  renderJob(job);
  renderChart(trials.trials, job.best_trial);
  renderTrials(trials.trials, job.best_trial);
  renderTasks(trials.trials);
}

function showTokenForm(problem) {
  document.getElementById("admin").hidden = true;
  document.getElementById("forget-token").hidden = true;
  document.getElementById("token-form").hidden = false;
  const line = document.getElementById("token-problem");
  line.textContent = problem || "";
  line.hidden = !problem;
  document.getElementById("token-input").focus();
}

function showAdmin() {
  document.getElementById("token-form").hidden = true;
  document.getElementById("admin").hidden = false;
  document.getElementById("forget-token").hidden = false;
}

function showProblems(problems) {
  const line = document.getElementById("error");
  line.textContent = problems.map(describe).join("; ");
  line.hidden = problems.length === 0;
}

let timer = null;
let running = false;
let again = false;

async function refresh() {
  if (running) {
    again = true;
    return;
  }
  running = true;
  clearTimeout(timer);
  try {
    const token = readToken();
    if (token) showAdmin();
    // Each section on its own: one route failing leaves the others up to date.
    const work = [api("/leaderboard?limit=20").then(renderLeaderboard)];
    if (token) work.push(api("/workers").then((w) => renderWorkers(w.workers)), refreshJobs());
    const results = await Promise.allSettled(work);
    const problems = results.filter((r) => r.status === "rejected").map((r) => r.reason);
    const refused = problems.find((e) => e instanceof ApiError && e.status === 401);
    if (refused) sessionStorage.removeItem(TOKEN_KEY);
    const formShown = !document.getElementById("token-form").hidden;
    if (refused) showTokenForm("the coordinator refused it: " + describe(refused));
    else if (!readToken() && !formShown) showTokenForm("");
    showProblems(problems.filter((e) => e !== refused));
    if (!problems.length) {
      document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
    }
  } finally {
    running = false;
    timer = setTimeout(refresh, again ? 0 : POLL_MS);
    again = false;
  }
}

function start() {
  document.getElementById("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("token-input");
    const token = input.value.trim();
    input.value = "";
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    showAdmin();
    refresh();
  });
  document.getElementById("forget-token").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showTokenForm("");
  });
  window.addEventListener("hashchange", () => refresh());
  refresh();
}

start();
