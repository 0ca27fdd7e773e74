// Try-it page for the triage classifier: no framework, no build step; every value is rendered with
// textContent (never innerHTML) because labels and metrics come from the server.
"use strict";

const TOKEN_KEY = "triage.classifier.token";
const $ = (id) => document.getElementById(id);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// ---- token: sessionStorage (this tab only), or #token= in the page URL ---------------------------
// The fragment, never the query string: browsers do not send it, so no proxy or access log sees it.
function takeTokenFromUrl() {
  const fragment = new URLSearchParams(window.location.hash.slice(1));
  const token = fragment.get("token");
  if (!token) return false;
  sessionStorage.setItem(TOKEN_KEY, token);
  // Drop it from the address bar and history so it is not bookmarked or shared by accident.
  fragment.delete("token");
  const rest = fragment.toString();
  history.replaceState(null, "", window.location.pathname + window.location.search + (rest ? "#" + rest : ""));
  return true;
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token()) headers["Authorization"] = "Bearer " + token();
  const response = await fetch(path, Object.assign({}, options, { headers }));
  return response;
}

async function errorMessage(response) {
  if (response.status === 401) return "Token missing or rejected: enter the classifier token above.";
  if (response.status === 503) {
    const wait = response.headers.get("Retry-After");
    return "The classifier is busy or loading" + (wait ? `; try again in ${wait}s.` : ".");
  }
  try {
    const body = await response.json();
    if (body && body.error) return `${response.status}: ${body.error}`;
  } catch (_) { /* not JSON */ }
  return `Request failed (${response.status}).`;
}

// ---- classify ------------------------------------------------------------------------------------
async function classify() {
  const text = $("text").value;
  const status = $("status");
  if (!text.trim()) {
    status.textContent = "Type a message first.";
    return;
  }
  const button = $("classify");
  button.disabled = true;
  status.textContent = "Classifying…";
  try {
    const response = await api("/v1/classify", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ texts: [text] }),
    });
    if (!response.ok) {
      status.textContent = await errorMessage(response);
      return;
    }
    const body = await response.json();
    renderResult(body.results[0], body.model_version, (body.truncated || [])[0]);
    status.textContent = "";
    if ($("version").textContent !== body.model_version) loadModel();  // swapped since the page loaded
  } catch (err) {
    status.textContent = "Cannot reach the classifier: " + err.message;
  } finally {
    button.disabled = false;
  }
}

function renderResult(result, version, truncated) {
  const box = $("results");
  box.replaceChildren();
  const title = el("h2", null, "Result ");
  title.appendChild(el("span", "muted", `from model ${version}`));
  title.dataset.version = version;
  title.id = "result-version";
  box.appendChild(title);
  if (truncated) {
    box.appendChild(el("p", "warning", "The message was longer than the model reads; only its start was used."));
  }
  for (const [head, prediction] of Object.entries(result)) {
    const section = el("div", "head");
    section.dataset.head = head;
    const heading = el("h3", null, head + ": ");
    const label = el("span", "label", prediction.label);
    heading.appendChild(label);
    heading.appendChild(el("span", "confidence", ` ${(prediction.confidence * 100).toFixed(1)}%`));
    section.appendChild(heading);
    const scores = Object.entries(prediction.scores).sort((a, b) => b[1] - a[1]);
    for (const [name, score] of scores) {
      const row = el("div", "bar-row" + (name === prediction.label ? " top" : ""));
      row.appendChild(el("span", "bar-label", name));
      const bar = el("div", "bar");
      const fill = el("div", "fill");
      fill.style.width = `${Math.max(0, Math.min(1, score)) * 100}%`;  // CSSOM: allowed by the page's CSP
      bar.appendChild(fill);
      row.appendChild(bar);
      row.appendChild(el("span", "bar-value", `${(score * 100).toFixed(1)}%`));
      section.appendChild(row);
    }
    box.appendChild(section);
  }
  box.hidden = false;
}

// ---- model info: version, evaluation metrics, confusion matrices ---------------------------------
let imageUrls = [];

async function loadModel() {
  if (!token()) {
    $("version").textContent = "?";
    $("model-meta").textContent = "Enter the token to see the model's version and evaluation.";
    return;
  }
  let response;
  try {
    response = await api("/v1/model");
  } catch (err) {
    $("model-meta").textContent = "Cannot reach the classifier: " + err.message;
    return;
  }
  if (!response.ok) {
    $("model-meta").textContent = await errorMessage(response);
    return;
  }
  const info = await response.json();
  $("version").textContent = info.version;
  $("model-version").textContent = info.version;
  const meta = [info.status, info.created && `created ${info.created}`,
    info.base_model_name && `base ${info.base_model_name}`, `reads ${info.max_length} tokens`].filter(Boolean);
  $("model-meta").textContent = meta.join(" · ");
  $("model-meta").title = info.base_model || "";
  renderMetrics(info.metrics || {});
  await renderImages(info.eval_images || []);
}

function fmt(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(3);
  return String(value);
}

// metrics: {head: {n, accuracy, macro_f1, ...}} as GET /v1/model sends them; one table row per head.
function renderMetrics(metrics) {
  const box = $("metrics");
  box.replaceChildren();
  const heads = Object.fromEntries(
    Object.entries(metrics).filter(([, values]) => values && typeof values === "object"));
  if (Object.keys(heads).length) {
    const columns = [];
    for (const values of Object.values(heads)) {
      for (const [key, value] of Object.entries(values || {})) {
        if ((typeof value === "number" || value === null) && !columns.includes(key)) columns.push(key);
      }
    }
    const table = el("table", "metrics");
    const header = el("tr");
    header.appendChild(el("th", null, "head"));
    for (const c of columns) header.appendChild(el("th", null, c.replace(/_/g, " ")));
    table.appendChild(header);
    for (const [head, values] of Object.entries(heads)) {
      const row = el("tr");
      row.appendChild(el("th", null, head));
      for (const c of columns) row.appendChild(el("td", null, fmt((values || {})[c])));
      table.appendChild(row);
    }
    box.appendChild(table);
  }
  const scalars = Object.entries(metrics).filter(([, v]) => typeof v === "number");
  if (scalars.length) {
    const list = el("p", "muted", scalars.map(([k, v]) => `${k.replace(/_/g, " ")}: ${fmt(v)}`).join(" · "));
    box.appendChild(list);
  }
  if (!box.childElementCount) box.appendChild(el("p", "muted", "No evaluation recorded for this version."));
}

async function renderImages(images) {
  const box = $("eval-images");
  for (const url of imageUrls) URL.revokeObjectURL(url);
  imageUrls = [];
  box.replaceChildren();
  // <img src> cannot send the Authorization header: fetch with it and show the bytes as a blob URL.
  for (const image of images) {
    try {
      const response = await api(image.url);
      if (!response.ok) continue;
      const url = URL.createObjectURL(await response.blob());
      imageUrls.push(url);
      const figure = el("figure");
      const img = el("img");
      img.src = url;
      img.alt = image.name;
      figure.appendChild(img);
      figure.appendChild(el("figcaption", null, image.name.replace(/\.png$/, "").replace(/_/g, " ")));
      box.appendChild(figure);
    } catch (_) { /* one missing plot should not hide the others */ }
  }
}

// ---- wiring --------------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  takeTokenFromUrl();
  const field = $("token");
  field.value = token();
  field.addEventListener("change", () => {
    const value = field.value.trim();
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
    loadModel();
  });
  $("forget-token").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    field.value = "";
    loadModel();
  });
  // A second #token= link opened in this tab changes only the fragment: the page does not load again.
  window.addEventListener("hashchange", () => {
    if (!takeTokenFromUrl()) return;
    field.value = token();
    loadModel();
  });
  $("classify").addEventListener("click", classify);
  $("text").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) classify();
  });
  loadModel();
});
