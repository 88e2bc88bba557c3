// Cohort's console: one page over the gateway's JSON routes. Signing in sets an HttpOnly session
// cookie this script never sees; it keeps only the session's CSRF token, in memory, and sends it
// with every request that changes something. Everything shown is set as text, never as markup.
"use strict";

const state = { csrf: null, role: null, username: null, timer: null, chart: null, usageChart: null,
                detail: null };
const $ = (selector) => document.querySelector(selector);

async function api(method, path, body) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && state.csrf) headers["X-CSRF-Token"] = state.csrf;
  const response = await fetch(path, { method, headers, credentials: "same-origin",
                                       body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await response.text();
  const data = text ? JSON.parse(text) : {};
  if (!response.ok) {
    const message = (data.error && data.error.message) || `${response.status} ${response.statusText}`;
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return data;
}

function say(where, message) { $(where).textContent = message || ""; }

function cell(row, value) {
  const td = document.createElement("td");
  td.textContent = value === null || value === undefined ? "" : String(value);
  row.appendChild(td);
  return td;
}

function fill(table, rows, columns) {
  const body = $(table).querySelector("tbody");
  body.replaceChildren();
  for (const item of rows) {
    const row = document.createElement("tr");
    for (const column of columns) cell(row, typeof column === "function" ? column(item) : item[column]);
    body.appendChild(row);
  }
  return body;
}

function button(label, action) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.addEventListener("click", () => action().catch((e) => say("#error", e.message)));
  return b;
}

const ms = (seconds) => (seconds === null || seconds === undefined ? "" : `${Math.round(seconds * 1000)} ms`);
const share = (x) => `${Math.round(x * 100)}%`;

// --- signing in ---------------------------------------------------------------------------------

async function signedIn(session) {
  Object.assign(state, { csrf: session.csrf_token, role: session.role, username: session.username });
  $("#sign-in").hidden = true;
  $("#tabs").hidden = false;
  $("#who").hidden = false;
  say("#who-name", `${session.username} (${session.role})`);
  for (const element of document.querySelectorAll("[data-admin]")) element.hidden = session.role !== "admin";
  for (const element of document.querySelectorAll("[data-mine]")) element.hidden = session.role === "admin";
  show("live");
}

function signedOut() {
  Object.assign(state, { csrf: null, role: null, username: null });
  clearInterval(state.timer);
  for (const page of document.querySelectorAll(".page")) page.hidden = true;
  $("#tabs").hidden = true;
  $("#who").hidden = true;
  $("#sign-in").hidden = false;
}

async function signIn(body) {
  say("#sign-in-error", "");
  try {
    await signedIn(await api("POST", "/console/session", body));
  } catch (e) {
    say("#sign-in-error", e.message);
  }
}

// --- pages --------------------------------------------------------------------------------------

function show(tab) {
  clearInterval(state.timer);
  say("#error", "");
  for (const page of document.querySelectorAll(".page")) page.hidden = page.id !== tab;
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("current", b.dataset.tab === tab);
  const load = { live: loadLive, usage: loadUsage, work: loadWork, tenancy: loadUsers }[tab];
  const run = () => load().catch((e) => (e.status === 401 ? signedOut() : say("#error", e.message)));
  run();
  if (tab === "live" || tab === "work") state.timer = setInterval(run, 2000);
}

async function loadLive() {
  const live = await api("GET", "/console/live");
  fill("#workers", live.workers, ["id", "state", "engine", "model", "running", "waiting",
    (w) => share(w.kv_usage), (w) => share(w.prefix_hit_rate), "prefixes_held", "jobs_failed",
    "last_failure"]);
  const minutes = live.minutes;
  fill("#minutes", minutes.slice().reverse(), [(m) => new Date(m.minute * 1000).toISOString().slice(11, 16),
    "requests", "errors", (m) => ms(m.ttft_p50_s), (m) => ms(m.ttft_p99_s), (m) => ms(m.e2e_p50_s),
    (m) => ms(m.e2e_p99_s)]);
  const last = minutes.length ? minutes[minutes.length - 1] : null;
  say("#live-rate", last ? `${(last.requests / 60).toFixed(2)} requests/s this minute` : "no requests in the last hour");
  say("#live-queued", Object.entries(live.queued).map(([model, tiers]) =>
    `${model}: ${tiers.interactive || 0} interactive, ${tiers.batch || 0} batch queued`).join("; "));
  say("#live-updated", `updated ${new Date(live.now * 1000).toISOString().slice(11, 19)} UTC`);
  const data = [minutes.map((m) => m.minute), ...["ttft_p50_s", "ttft_p99_s", "e2e_p50_s", "e2e_p99_s"]
    .map((k) => minutes.map((m) => (m[k] === null ? null : m[k] * 1000)))];
  state.chart = chart(state.chart, "#live-chart", "latency (ms)", data,
                      ["TTFT p50", "TTFT p99", "end-to-end p50", "end-to-end p99"],
                      [live.now - 3600, live.now]);
}

// A time chart (seconds on x); `span` pins the x axis (the last hour), else it fits the data.
function chart(existing, where, label, data, names, span) {
  if (typeof uPlot === "undefined") return null;
  if (existing) existing.destroy();
  const colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
  const x = span ? { time: true, range: () => span } : { time: true };
  return new uPlot({ width: Math.min(900, window.innerWidth - 40), height: 240,
    scales: { x }, series: [{}, ...names.map((name, i) => ({
      label: name, stroke: colours[i % colours.length], points: { show: true } }))],
    axes: [{}, { label }] }, data, $(where));
}

function usageQuery(form, extra) {
  const query = new URLSearchParams({ start: form.start.value, end: form.end.value, ...extra });
  return `${state.role === "admin" ? "/admin/usage" : "/v1/usage"}?${query}`;
}

async function loadUsage() {
  const form = $("#usage-form");
  if (!form.start.value) {
    const today = new Date();
    form.end.value = new Date(today.getTime() + 86400000).toISOString().slice(0, 10);
    form.start.value = new Date(today.getTime() - 6 * 86400000).toISOString().slice(0, 10);
  }
  const group = form.group_by.value;
  const report = await api("GET", usageQuery(form, { group_by: group }));
  say("#usage-total", `${report.requests} requests, ${report.prompt_tokens} prompt and ` +
      `${report.completion_tokens} completion tokens`);
  const head = $("#usage-table thead tr");
  head.replaceChildren();
  for (const name of [group, "requests", "prompt tokens", "completion tokens"]) {
    const th = document.createElement("th");
    th.textContent = name;
    head.appendChild(th);
  }
  fill("#usage-table", report.buckets || [], [group, "requests", "prompt_tokens", "completion_tokens"]);
  $("#usage-csv").href = usageQuery(form, { group_by: group, format: "csv" });
  const days = (await api("GET", usageQuery(form, { group_by: "day" }))).buckets || [];
  const data = [days.map((d) => Date.parse(`${d.day}T00:00:00Z`) / 1000),
                days.map((d) => d.prompt_tokens + d.completion_tokens), days.map((d) => d.requests)];
  state.usageChart = chart(state.usageChart, "#usage-chart", "per day", data, ["tokens", "requests"]);
}

// An admin sees every user's newest work (with whose it is), a user their own and their files.
async function loadWork() {
  const admin = state.role === "admin";
  const work = admin ? await api("GET", "/admin/work?limit=50")
    : { batches: (await api("GET", "/v1/batches?limit=50")).data,
        tasks: (await api("GET", "/tasks?limit=50")).data };
  const whose = admin ? ["user"] : [];
  fill("#batches", work.batches, ["id", ...whose, "status", "endpoint", (b) => b.request_counts.completed,
    (b) => b.request_counts.failed, (b) => b.request_counts.total, "input_file_id", "output_file_id",
    "error_file_id", (b) => (b.errors && b.errors.data ? b.errors.data.map((e) => e.message).join("; ") : "")]);
  fill("#tasks", work.tasks, ["id", ...whose, "status", (t) => t.request && t.request.model, "created_at",
    (t) => (t.error ? t.error.message : "")]);
  if (!admin) fill("#files", (await api("GET", "/v1/files?limit=50")).data, ["id", "filename", "purpose", "bytes"]);
}

async function loadUsers() {
  const users = await api("GET", "/admin/users");
  const body = fill("#users", users.data, ["username", "role", "disabled"]);
  users.data.forEach((user, i) => {
    const td = document.createElement("td");
    td.appendChild(button("Keys and limits", () => openUser(user.username)));
    td.appendChild(button("Remove", async () => {
      if (!window.confirm(`Remove ${user.username}, with their keys, tasks, files and batches?`)) return;
      await api("DELETE", `/admin/users/${encodeURIComponent(user.username)}`);
      if (state.detail === user.username) $("#user-detail").hidden = true;
      await loadUsers();
    }));
    body.children[i].appendChild(td);
  });
}

async function openUser(name) {
  state.detail = name;
  $("#user-detail").hidden = false;
  $("#minted").hidden = true;
  say("#detail-name", name);
  const user = await api("GET", `/admin/users/${encodeURIComponent(name)}`);
  const body = fill("#keys", user.keys, ["id", "name", (k) => (k.models ? k.models.join(", ") : "all"), "revoked"]);
  user.keys.forEach((key, i) => {
    const td = document.createElement("td");
    if (!key.revoked) {
      td.appendChild(button("Revoke", async () => {
        await api("DELETE", `/admin/users/${encodeURIComponent(name)}/keys/${key.id}`);
        await openUser(name);
      }));
    }
    body.children[i].appendChild(td);
  });
  const limits = user.limits || {};
  say("#limits-now", user.limits ? Object.entries(limits).map(([k, v]) => `${k} ${v}`).join(", ") : "no limits");
}

// --- wiring -------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("#password-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = event.target;
    signIn({ username: form.username.value, password: form.password.value });
    form.password.value = "";
  });
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    signIn({ api_key: event.target.api_key.value });
    event.target.api_key.value = "";
  });
  $("#sign-out").addEventListener("click", async () => {
    try { await api("DELETE", "/console/session"); } finally { signedOut(); }
  });
  for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => show(b.dataset.tab));
  $("#usage-form").addEventListener("submit", (event) => {
    event.preventDefault();
    loadUsage().catch((e) => say("#error", e.message));
  });
  $("#user-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    try {
      await api("POST", "/admin/users", { username: form.username.value, password: form.password.value,
                                          role: form.role.value });
      form.reset();
      await loadUsers();
    } catch (e) { say("#error", e.message); }
  });
  $("#key-mint-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    const models = form.models.value.split(",").map((m) => m.trim()).filter(Boolean);
    try {
      const key = await api("POST", `/admin/users/${encodeURIComponent(state.detail)}/keys`,
                            { name: form.name.value, ...(models.length ? { models } : {}) });
      form.reset();
      await openUser(state.detail);
      say("#minted-key", key.key);
      $("#minted").hidden = false;
    } catch (e) { say("#error", e.message); }
  });
  $("#limits-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const values = {};
    for (const input of event.target.elements) {
      if (!input.name || input.value === "") continue;
      values[input.name] = input.type === "number" ? Number(input.value) : input.value;
    }
    try {
      await api("PUT", `/admin/users/${encodeURIComponent(state.detail)}/limits`, values);
      event.target.reset();
      await openUser(state.detail);
    } catch (e) { say("#error", e.message); }
  });
  api("GET", "/console/session").then(signedIn).catch(signedOut);
});
