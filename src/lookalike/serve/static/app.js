// The lookalike search page: drop, paste or pick an image; see its most similar images and, when the
// collection has labelled images, what it shows; search again with any of them. Plain JavaScript, no
// build step, nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);

let limits = { max_upload_bytes: 20 * 1024 * 1024, default_k: 30 };
let running = null; // AbortController of the search under way
let queryUrl = null; // object URL of the uploaded query image, revoked when replaced
let viewed = null; // the hit shown in the viewer
let recognition = null; // how /api/recognize votes, or null when the collection has no labels
let again = null; // runs the last search again (when the re-ranking chain changes)

const rerankChain = () => $("rerank").value.trim() || "none";

async function loadInfo() {
  try {
    const response = await fetch("/api/info");
    if (response.status === 401) {
      // The server has an access token and this browser has not been given it yet.
      $("collection").textContent = "";
      showError("this server needs its access token: open this page's address with ?token=… added once");
      return;
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const info = await response.json();
    limits = info.limits;
    recognition = info.recognition;
    $("collection").textContent = `${info.indexed} images · ${info.model}`;
  } catch (error) {
    $("collection").textContent = `collection info unavailable (${error.message})`;
  }
}

function showQuery(src, name) {
  const image = $("query-image");
  image.src = src;
  image.alt = `query: ${name}`;
  image.hidden = false;
  $("drop").classList.add("has-image");
  $("query-name").textContent = name;
}

function setBusy(busy) {
  $("progress").hidden = !busy;
  $("results").setAttribute("aria-busy", busy ? "true" : "false");
  document.body.classList.toggle("searching", busy);
  if (busy) $("status").textContent = "Searching…";
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("status").textContent = "";
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function describeError(body, status) {
  if (!body || !body.error) return `the server answered ${status}`;
  if (typeof body.detail === "string") return `${body.error}: ${body.detail}`;
  if (Array.isArray(body.detail)) return `${body.error}: ${body.detail.map((d) => d.problem).join("; ")}`;
  return body.error;
}

function showLabel(data) {
  const label = $("label");
  label.replaceChildren();
  label.hidden = !data;
  if (!data) return;
  const name = document.createElement("strong");
  name.textContent = data.label;
  const votes = data.neighbours.filter((n) => n.label === data.label).length;
  const detail = ` · confidence ${data.confidence.toFixed(3)} · ${votes} of ${data.neighbours.length} neighbours`;
  label.append("Looks like ", name, detail);
  label.title = `${data.method} over the collection's labelled images`;
}

async function runRecognize(body, headers, signal) {
  try {
    const response = await fetch("/api/recognize", { method: "POST", body, headers, signal });
    const data = await response.json().catch(() => null);
    showLabel(response.ok && data.label !== null ? data : null);
  } catch (error) {
    showLabel(null); // the search results stand on their own
  }
}

async function runSearch(body, headers, recognizeBody) {
  if (running) running.abort();
  const mine = new AbortController();
  running = mine;
  clearError();
  showLabel(null);
  setBusy(true);
  const started = performance.now();
  try {
    const response = await fetch("/api/search", { method: "POST", body, headers, signal: mine.signal });
    const data = await response.json().catch(() => null);
    if (!response.ok) throw new Error(describeError(data, response.status));
    renderResults(data);
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    $("status").textContent = `${data.results.length} most similar images in ${seconds} s`;
    if (recognition) await runRecognize(recognizeBody, headers, mine.signal);
    return data;
  } catch (error) {
    if (error.name !== "AbortError") {
      $("results").replaceChildren();
      showError(error.message);
    }
    return null;
  } finally {
    if (running === mine) {
      running = null;
      setBusy(false);
    }
  }
}

function searchFile(file) {
  if (!file) return;
  if (file.size > limits.max_upload_bytes) {
    const mb = (n) => (n / 1048576).toFixed(1);
    showError(`upload too large: ${mb(file.size)} MB; the limit is ${mb(limits.max_upload_bytes)} MB`);
    return;
  }
  if (queryUrl) URL.revokeObjectURL(queryUrl);
  queryUrl = URL.createObjectURL(file);
  const name = file.name || "pasted image";
  showQuery(queryUrl, name);
  history.replaceState(null, "", location.pathname);
  again = () => {
    const form = new FormData();
    form.append("image", file, file.name || "pasted.png");
    form.append("k", String(limits.default_k));
    form.append("rerank", rerankChain());
    const recognizeForm = new FormData();
    recognizeForm.append("image", file, file.name || "pasted.png");
    return runSearch(form, {}, recognizeForm);
  };
  return again();
}

async function searchId(id, name) {
  showQuery(`/api/images/${id}`, name || `image ${id}`);
  history.replaceState(null, "", `#id=${id}`);
  again = async () => {
    const data = await runSearch(
      JSON.stringify({ id, k: limits.default_k, rerank: rerankChain() }),
      { "Content-Type": "application/json" },
      JSON.stringify({ id }),
    );
    if (data) $("query-name").textContent = data.query.name;
    return data;
  };
  return again();
}

function renderResults(data) {
  const tiles = data.results.map((hit) => {
    const item = document.createElement("li");
    item.className = "tile";
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.id = String(hit.id);
    button.title = `${hit.path} — score ${hit.score.toFixed(4)}`;
    const image = document.createElement("img");
    image.src = hit.thumb_url;
    image.alt = hit.name;
    image.loading = "lazy";
    image.decoding = "async";
    const caption = document.createElement("span");
    caption.className = "caption";
    for (const [cls, text] of [["rank", `${hit.rank}.`], ["score", hit.score.toFixed(3)], ["name", hit.name]]) {
      const part = document.createElement("span");
      part.className = cls;
      part.textContent = text;
      caption.append(part);
    }
    button.append(image, caption);
    button.addEventListener("click", () => openViewer(hit));
    item.append(button);
    return item;
  });
  $("results").replaceChildren(...tiles);
}

function openViewer(hit) {
  viewed = hit;
  $("viewer-image").src = hit.image_url;
  $("viewer-image").alt = hit.name;
  $("viewer-name").textContent = hit.path;
  const size = hit.width && hit.height ? ` · ${hit.width}×${hit.height}` : "";
  $("viewer-meta").textContent = `rank ${hit.rank} · score ${hit.score.toFixed(4)}${size}`;
  $("viewer-open").href = hit.image_url;
  $("viewer").showModal();
}

function firstImage(items) {
  for (const item of items || []) {
    if (item.kind === "file" && item.type.startsWith("image/")) return item.getAsFile();
  }
  return null;
}

function wire() {
  const drop = $("drop");
  $("query-image").addEventListener("error", () => {
    $("query-image").hidden = true; // not something the browser can show either
    drop.classList.remove("has-image");
  });
  $("file").addEventListener("change", (event) => {
    searchFile(event.target.files[0]);
    event.target.value = ""; // the same file can be chosen again
  });
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      $("file").click();
    }
  });
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("dragging");
  });
  document.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) drop.classList.remove("dragging");
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("dragging");
    const file = event.dataTransfer.files[0];
    if (file) searchFile(file);
    else showError("drop an image file (from your files, not a link)");
  });
  document.addEventListener("paste", (event) => {
    const file = firstImage(event.clipboardData && event.clipboardData.items);
    if (file) {
      event.preventDefault();
      searchFile(file);
    }
  });
  $("viewer-search").addEventListener("click", () => {
    $("viewer").close();
    if (viewed) searchId(viewed.id, viewed.name);
  });
  $("viewer-close").addEventListener("click", () => $("viewer").close());
  $("rerank").addEventListener("change", () => {
    if (again) again();
  });
  $("viewer").addEventListener("click", (event) => {
    if (event.target === $("viewer")) $("viewer").close(); // a click on the backdrop
  });
}

async function start() {
  wire();
  await loadInfo();
  const linked = /^#id=(\d+)$/.exec(location.hash);
  if (linked) searchId(Number(linked[1]));
}

start();
