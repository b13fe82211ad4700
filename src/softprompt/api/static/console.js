// softprompt web console: talks to the server's HTTP API only (the same on every backend).
// Every request carries the key from the key field (sessionStorage) as a Bearer token.
"use strict";

const KEY_STORAGE = "softprompt.apiKey";
const state = {
  tasks: [], unavailable: [], nextAfter: null, base: null, backend: null, selected: null, mode: "classify",
  plotUrls: new Map(), deleteArmed: false,
};
// Tasks per page of /v1/tasks (1 to 1000); `/?page_size=N` sets it, e.g. to see paging at work.
const PAGE_SIZE = Math.min(1000, Math.max(1, parseInt(new URLSearchParams(location.search).get("page_size"), 10) || 100));
const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

function apiKey() { return sessionStorage.getItem(KEY_STORAGE) || ""; }

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (apiKey()) headers.set("Authorization", "Bearer " + apiKey());
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch (_) { /* not JSON: keep the status line */ }
    throw new ApiError(message, response.status);
  }
  return response;
}

async function postJson(path, body) {
  const response = await api(path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  return response.json();
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "text") node.textContent = value;
    else if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function showError(target, error) {
  target.replaceChildren(el("p", { class: "error", text: error.message || String(error) }));
}

function formatBytes(n) {
  if (n === null || n === undefined) return "-";
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(2)} MiB`;
}

function formatValue(value) {
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toPrecision(4);
  if (value === null || value === undefined) return "-";
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

// A template's plain {field} placeholders, {{ and }} being literal braces (as data.Template reads it).
function renderTemplate(template, values) {
  return template.replace(/\{\{|\}\}|\{([^{}]*)\}/g, (match, name) =>
    match === "{{" ? "{" : match === "}}" ? "}" : (values[name] ?? ""));
}

// ------------------------------------------------------------------ tasks

// The task list comes a page at a time (name order); "Load more tasks" appends the next one.
async function fetchPage(after) {
  const query = new URLSearchParams({ limit: PAGE_SIZE });
  if (after) query.set("after", after);
  return (await api(`/v1/tasks?${query}`)).json();
}

function addPage(listing) {
  const known = new Set(state.tasks.map((t) => t.id));
  state.tasks = state.tasks.concat(listing.data.filter((t) => !known.has(t.id)))
    .sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  state.unavailable = state.unavailable.concat(listing.unavailable);
  state.nextAfter = listing.has_more ? listing.last_id : null;
  $("served").textContent = `model ${listing.model} - backend ${listing.backend} - ` +
    `${state.tasks.length} task(s)${state.nextAfter ? " shown, more in the bank" : ""}`;
  $("more-tasks").hidden = !state.nextAfter;
  renderTaskTable();
  renderUnavailable(state.unavailable);
  renderCompareChoices();
}

async function loadTasks() {
  const listing = await fetchPage(null);
  const previous = state.selected ? state.selected.id : null;
  state.base = listing.model;
  state.backend = listing.backend;
  state.tasks = [];
  state.unavailable = [];
  addPage(listing);
  if (previous && !state.tasks.some((t) => t.id === previous)) await ensureTask(previous);
  const keep = state.tasks.find((t) => t.id === previous);
  selectTask(keep ? keep.id : (state.tasks[0] ? state.tasks[0].id : null));
}

async function loadMoreTasks() {
  if (!state.nextAfter) return;
  const button = $("more-tasks");
  button.disabled = true;
  try {
    addPage(await fetchPage(state.nextAfter));
    for (const row of $("task-table").querySelectorAll("tbody tr")) {
      row.classList.toggle("selected", !!state.selected && row.dataset.task === state.selected.id);
    }
  } catch (error) {
    showError($("unavailable"), error);
  } finally {
    button.disabled = false;
  }
}

// A task not on the pages shown yet (e.g. just uploaded) joins the table on its own.
async function ensureTask(name) {
  if (state.tasks.some((t) => t.id === name)) return;
  try {
    const task = await (await api(`/v1/tasks/${encodeURIComponent(name)}`)).json();
    addPage({
      model: state.base, backend: state.backend, data: [task], unavailable: [],
      has_more: !!state.nextAfter, last_id: state.nextAfter,
    });
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 404)) throw error;
  }
}

function bestValidation(task) {
  const m = task.metrics || {};
  return m.best_validation === undefined ? "-" : formatValue(m.best_validation);
}

function renderTaskTable() {
  const body = $("task-table").querySelector("tbody");
  body.replaceChildren(...state.tasks.map((task) => {
    const row = el("tr", { "data-task": task.id, tabindex: "0" },
      el("td", { text: task.id }), el("td", { text: task.kind }),
      el("td", { text: String(task.num_virtual_tokens) }), el("td", { text: formatBytes(task.size_bytes) }),
      el("td", { text: bestValidation(task) }));
    row.addEventListener("click", () => selectTask(task.id));
    row.addEventListener("keydown", (event) => { if (event.key === "Enter") selectTask(task.id); });
    return row;
  }));
  $("no-tasks").hidden = state.tasks.length > 0;
}

function renderUnavailable(items) {
  const box = $("unavailable");
  box.replaceChildren();
  if (!items || !items.length) return;
  box.append(el("h3", { text: "In the bank but not served" }),
    el("ul", {}, ...items.map((item) => el("li", {}, el("b", { text: item.id }), ": " + item.reason))));
}

function selectTask(name) {
  state.selected = state.tasks.find((t) => t.id === name) || null;
  state.deleteArmed = false;
  for (const row of $("task-table").querySelectorAll("tbody tr")) {
    row.classList.toggle("selected", row.dataset.task === name);
  }
  $("delete-task").disabled = !state.selected;
  $("delete-task").textContent = "Delete selected task";
  renderDetail();
  renderTryForm();
}

function renderDetail() {
  const task = state.selected;
  $("detail-title").textContent = task ? task.id : "Select a task";
  const facts = $("detail-facts");
  facts.replaceChildren();
  $("detail-metrics").replaceChildren();
  $("detail-plots").replaceChildren();
  if (!task) return;
  const rows = [
    ["kind", task.kind === "deep" ? "deep prompt (keys and values in every layer)" : "soft prompt (input vectors)"],
    ["length", `${task.num_virtual_tokens} virtual tokens`],
    ["size on disk", formatBytes(task.size_bytes)],
    ["base model", task.base_model || "-"],
    ["template", task.template ?? "-"],
    ["labels", task.labels ? task.labels.map((l, i) => `${l} -> "${task.targets[i]}"`).join(", ") : "none (generation)"],
    ["created", task.created || "-"],
  ];
  if (task.classify_error) rows.push(["problem", task.classify_error]);
  for (const [name, value] of rows) facts.append(el("dt", { text: name }), el("dd", { text: value, "data-fact": name }));
  renderMetrics(task);
  renderPlots(task);
}

function renderMetrics(task) {
  const box = $("detail-metrics");
  const sections = [["metrics", task.metrics], ["training", task.training]];
  for (const [title, values] of sections) {
    if (!values) continue;
    const body = el("tbody");
    for (const [name, value] of Object.entries(values)) {
      body.append(el("tr", {}, el("th", { text: name }), el("td", { text: formatValue(value) })));
    }
    box.append(el("details", title === "metrics" ? { open: "" } : {}, el("summary", { text: title }),
      el("table", { class: "kv" }, body)));
  }
}

const PLOT_ORDER = ["loss", "validation", "grad_norms"];

async function renderPlots(task) {
  const box = $("detail-plots");
  if (!task.plots.length) {
    box.append(el("p", { class: "muted", text: "No plots were saved with this prompt." }));
    return;
  }
  const order = (name) => { const i = PLOT_ORDER.indexOf(name); return i < 0 ? PLOT_ORDER.length : i; };
  for (const plot of [...task.plots].sort((a, b) => order(a) - order(b))) {
    const img = el("img", { alt: `${plot} plot of ${task.id}`, "data-plot": plot });
    box.append(img);
    try {
      img.src = await plotUrl(task, plot);  // fetched with the key: images cannot send headers
    } catch (error) {
      img.replaceWith(el("p", { class: "error", text: `${plot}: ${error.message}` }));
    }
  }
}

async function plotUrl(task, plot) {
  const cacheKey = `${task.id}@${task.version}/${plot}`;
  if (!state.plotUrls.has(cacheKey)) {
    const path = `/v1/tasks/${encodeURIComponent(task.id)}/plots/${encodeURIComponent(plot)}.png`;
    state.plotUrls.set(cacheKey, URL.createObjectURL(await (await api(path)).blob()));
  }
  return state.plotUrls.get(cacheKey);
}

// ------------------------------------------------------------------ try a task

function renderTryForm() {
  const task = state.selected;
  const fields = $("try-fields");
  fields.replaceChildren();
  $("mode-choice").replaceChildren();
  for (const id of ["tuned-result", "plain-result"]) $(id).querySelector(".body").replaceChildren();
  $("try-run").disabled = !task;
  if (!task) return;
  if (!task.classify) state.mode = "generate";
  const modes = task.classify ? ["classify", "generate"] : ["generate"];
  for (const mode of modes) {
    const radio = el("input", { type: "radio", name: "mode", value: mode, id: `mode-${mode}` });
    radio.checked = mode === state.mode;
    radio.addEventListener("change", () => { state.mode = mode; updateModeControls(); });
    $("mode-choice").append(el("label", {}, radio, " " + mode));
  }
  const names = task.fields.length ? task.fields : ["text"];
  for (const name of names) {
    fields.append(el("label", { class: "field" }, el("span", { text: name }),
      el("textarea", { rows: "2", "data-field": name, id: `field-${name}` })));
  }
  $("tuned-title").textContent = `with the prompt (${task.id})`;
  updateModeControls();
}

function updateModeControls() {
  $("max-tokens-label").hidden = state.mode !== "generate";
  $("plain-title").textContent = state.mode === "classify"
    ? "plain model (same template and labels, no prompt)" : `plain model (${state.base})`;
}

function fieldValues() {
  const values = {};
  for (const area of $("try-fields").querySelectorAll("textarea")) values[area.dataset.field] = area.value;
  return values;
}

async function runTry(event) {
  event.preventDefault();
  const task = state.selected;
  if (!task) return;
  const tuned = $("tuned-result").querySelector(".body");
  const plain = $("plain-result").querySelector(".body");
  for (const box of [tuned, plain]) box.replaceChildren(el("p", { class: "muted", text: "running..." }));
  const values = fieldValues();
  const run = state.mode === "classify" ? classifyBoth(task, values) : generateBoth(task, values);
  const [withPrompt, without] = await Promise.allSettled(run);
  showOutcome(tuned, withPrompt);
  showOutcome(plain, without);
}

function classifyBoth(task, values) {
  const input = task.fields.length === 1 ? values[task.fields[0]] : values;
  return [postJson("/v1/classify", { model: task.id, input }).then(classificationView),
    postJson("/v1/classify", { model: task.id, input, zero_shot: true }).then(classificationView)];
}

function generateBoth(task, values) {
  const prompt = task.template ? renderTemplate(task.template, values) : values.text;
  const maxTokens = Number($("max-tokens").value) || 24;
  const ask = (model) => postJson("/v1/completions", { model, prompt, max_tokens: maxTokens, temperature: 0 })
    .then((answer) => el("pre", { class: "generation", text: answer.choices[0].text }));
  return [ask(task.id), ask(state.base)];
}

function classificationView(answer) {
  const row = answer.data[0];
  const table = el("table", { class: "scores" });
  for (const [label, p] of Object.entries(row.probabilities)) {
    const bar = el("span", { class: "bar" });
    bar.style.width = `${(100 * p).toFixed(1)}%`;
    table.append(el("tr", label === row.label ? { class: "best" } : {}, el("th", { text: label }),
      el("td", { class: "bar-cell" }, bar), el("td", { text: p.toFixed(3) })));
  }
  return el("div", {}, el("p", {}, "label: ", el("b", { class: "label", text: row.label })), table);
}

function showOutcome(box, outcome) {
  if (outcome.status === "fulfilled") box.replaceChildren(outcome.value);
  else showError(box, outcome.reason);
}

// ------------------------------------------------------------------ compare

function renderCompareChoices() {
  for (const [id, offset] of [["compare-a", 0], ["compare-b", 1]]) {
    const select = $(id);
    const previous = select.value;
    select.replaceChildren(...state.tasks.map((t) => el("option", { value: t.id, text: t.id })));
    const fallback = state.tasks[Math.min(offset, state.tasks.length - 1)];
    select.value = state.tasks.some((t) => t.id === previous) ? previous : (fallback ? fallback.id : "");
  }
}

async function runCompare(event) {
  event.preventDefault();
  const out = $("compare-result");
  const [a, b, k] = [$("compare-a").value, $("compare-b").value, $("compare-k").value];
  if (!a || !b) return;
  out.replaceChildren(el("p", { class: "muted", text: "comparing..." }));
  try {
    const query = new URLSearchParams({ a, b, k });
    const report = await (await api(`/v1/compare?${query}`)).json();
    out.replaceChildren(compareView(report, a, b));
  } catch (error) {
    showError(out, error);
  }
}

function compareView(report, a, b) {
  const summary = report.similarity === null ? report.similarity_note
    : `cosine similarity of the mean-pooled prompts: ${report.similarity.toFixed(4)}`;
  const norms = report.embedding_norms;
  const view = el("div", {}, el("p", { id: "similarity", text: summary }),
    el("p", { class: "muted", text: `real token embedding norms: mean ${norms.mean}, std ${norms.std}` }));
  const columns = el("div", { class: "side-by-side" });
  for (const name of a === b ? [a] : [a, b]) columns.append(promptTokensView(name, report.tasks[name]));
  view.append(columns);
  return view;
}

function promptTokensView(name, info) {
  const box = el("div", { class: "result" }, el("h3", { text: `${name} (${info.kind}, ${info.shape.join(" x ")})` }));
  if (!info.nearest_tokens) {
    box.append(el("p", { class: "muted", text: "A deep prompt's rows are keys and values, not input embeddings: no nearest tokens." }));
    return box;
  }
  const body = el("tbody");
  info.nearest_tokens.forEach((near, i) => {
    const words = near.map(([token, sim]) => `${JSON.stringify(token)} ${sim.toFixed(2)}`).join(", ");
    body.append(el("tr", {}, el("th", { text: `v${i}` }), el("td", { text: info.norms[i].toFixed(2) }), el("td", { text: words })));
  });
  box.append(el("table", { class: "tokens" }, el("thead", {}, el("tr", {}, el("th", { text: "" }),
    el("th", { text: "norm" }), el("th", { text: "nearest tokens (cosine)" }))), body));
  return box;
}

// ------------------------------------------------------------------ admin

function adminMessage(text, isError) {
  const box = $("admin-message");
  box.textContent = text;
  box.className = isError ? "error" : "ok";
}

const PROMPT_FILES = ["adapter_config.json", "adapter_model.safetensors", "softprompt.json"];

async function upload(event) {
  event.preventDefault();
  const chosen = [...$("upload-files").files, ...$("upload-folder").files];
  const files = chosen.filter((f) => PROMPT_FILES.includes(f.name));
  const folder = chosen.find((f) => f.webkitRelativePath);
  const name = $("upload-name").value.trim() || (folder ? folder.webkitRelativePath.split("/")[0] : "");
  if (!name) return adminMessage("Give the task a name (or choose its folder).", true);
  if (!files.length) return adminMessage(`Choose the prompt files: ${PROMPT_FILES.join(", ")}.`, true);
  const form = new FormData();
  for (const file of files) form.append(file.name, file, file.name);
  try {
    const answer = await (await api(`/v1/prompts/${encodeURIComponent(name)}`, { method: "PUT", body: form })).json();
    adminMessage(`Uploaded '${answer.id}' (${answer.num_virtual_tokens} virtual tokens).`, false);
    await loadTasks();
    await ensureTask(answer.id);
    selectTask(answer.id);
  } catch (error) {
    adminMessage(`Upload refused: ${error.message}`, true);
  }
}

async function deleteSelected() {
  const task = state.selected;
  if (!task) return;
  if (!state.deleteArmed) {  // a second click confirms (no blocking dialog)
    state.deleteArmed = true;
    $("delete-task").textContent = `Really delete '${task.id}'?`;
    return;
  }
  state.deleteArmed = false;
  $("delete-task").textContent = "Delete selected task";
  try {
    await api(`/v1/prompts/${encodeURIComponent(task.id)}`, { method: "DELETE" });
    adminMessage(`Deleted '${task.id}'.`, false);
  } catch (error) {
    adminMessage(`Delete refused: ${error.message}`, true);
  }
  await refresh();
}

// ------------------------------------------------------------------ start

function showKeyState() {
  $("key-state").textContent = apiKey() ? "key set for this tab" : "no key";
}

async function refresh() {
  const banner = $("page-error");
  try {
    await loadTasks();
    banner.hidden = true;
  } catch (error) {
    banner.textContent = `Could not list the tasks: ${error.message}`;
    banner.hidden = false;
  }
}

function start() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("api-key").value);
    $("api-key").value = "";
    showKeyState();
    refresh();  // with tenant keys, what a key may see differs
  });
  $("forget-key").addEventListener("click", () => { sessionStorage.removeItem(KEY_STORAGE); showKeyState(); refresh(); });
  $("try-form").addEventListener("submit", runTry);
  $("compare-form").addEventListener("submit", runCompare);
  $("upload-form").addEventListener("submit", upload);
  $("delete-task").addEventListener("click", deleteSelected);
  $("more-tasks").addEventListener("click", loadMoreTasks);
  showKeyState();
  refresh();
}

document.addEventListener("DOMContentLoaded", start);
