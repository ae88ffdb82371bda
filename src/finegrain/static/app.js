// The search page of `finegrain serve`: plain JS over the JSON API (no build step).
"use strict";
const $ = (id) => document.getElementById(id);
let health = null;
let lastQuery = null;  // {file} or {galleryId}: what the pair pictures are asked for
let galleryOffset = 0;
let inFlight = null;  // the AbortController of the search in flight: a newer search wins

function showError(msg) {
  $("error").textContent = msg;
  $("error").hidden = !msg;
}

async function detail(resp) {
  try { return (await resp.json()).detail || resp.statusText; } catch (e) { return resp.statusText; }
}

function queryForm(query) {
  const form = new FormData();
  if (query.file) form.append("image", query.file);
  else form.append("gallery_id", String(query.galleryId));
  return form;
}

async function search(query) {
  // Search stays usable while a search runs: a new one (another file, another k) cancels
  // the one in flight, so the results always match the k and the query on the page.
  showError("");
  if (inFlight) inFlight.abort();
  const mine = new AbortController();
  inFlight = mine;
  if (!query.file) $("file").value = "";  // a gallery pick: the file field names no file
  const form = queryForm(query);
  form.append("k", $("k").value);
  form.append("explain", $("explain").checked ? "true" : "false");
  $("busy").hidden = false;
  try {
    const resp = await fetch("/search", { method: "POST", body: form, signal: mine.signal });
    if (!resp.ok) { showError(`Error ${resp.status}: ${await detail(resp)}`); return; }
    const res = await resp.json();
    if (inFlight !== mine) return;  // a newer search was started meanwhile
    lastQuery = query;
    render(res);
  } catch (e) {
    if (e.name !== "AbortError") showError(`The server did not answer: ${e}`);
  } finally {
    if (inFlight === mine) { inFlight = null; $("busy").hidden = true; }
  }
}

function render(res) {
  $("query").hidden = false;
  $("query-name").textContent = res.query;
  $("took").textContent = `(${res.took_ms.toFixed(0)} ms)`;
  $("attention").hidden = !res.attention;
  if (res.attention) $("attention").src = res.attention;
  $("results-title").hidden = false;
  $("results-title").textContent = `Top ${res.k} results`;
  $("pair").hidden = true;
  const list = $("results");
  list.replaceChildren();
  for (const r of res.results) {
    const li = document.createElement("li");
    li.className = "result";
    const img = document.createElement("img");
    img.src = r.url;
    img.alt = r.name;
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = `#${r.rank}  ${r.score.toFixed(3)}`;
    const name = document.createElement("div");
    name.className = "name";
    name.textContent = r.label >= 0 ? `${r.name} (label ${r.label})` : r.name;
    li.append(img, score, name);
    if (health && health.explain_pair) {
      const why = document.createElement("button");
      why.type = "button";
      why.className = "why";
      why.textContent = "why do these match?";
      why.onclick = () => explainPair(r.id);
      li.append(why);
    }
    list.append(li);
  }
}

async function explainPair(resultId) {
  showError("");
  const form = queryForm(lastQuery);
  form.append("result_id", String(resultId));
  const resp = await fetch("/explain/pair", { method: "POST", body: form });
  if (!resp.ok) { showError(`Error ${resp.status}: ${await detail(resp)}`); return; }
  const old = $("pair-picture").src;
  $("pair-picture").src = URL.createObjectURL(await resp.blob());
  if (old.startsWith("blob:")) URL.revokeObjectURL(old);
  $("pair").hidden = false;
}

async function loadGallery() {
  const resp = await fetch(`/gallery?offset=${galleryOffset}&limit=48`);
  if (!resp.ok) return;
  const page = await resp.json();
  for (const item of page.items) {
    const img = document.createElement("img");
    img.src = item.url;
    img.alt = item.name;
    img.title = item.name;
    img.className = "pick";
    img.onclick = () => search({ galleryId: item.id });
    $("gallery").append(img);
  }
  galleryOffset += page.items.length;
  $("more").hidden = galleryOffset >= page.count;
}

async function start() {
  try {
    const resp = await fetch("/health");
    health = await resp.json();
    $("status").textContent = `${health.images} images, model ${health.model_name}` +
      (health.task ? ` (${health.task})` : "");
    $("k").max = health.k_max;
    $("explain").disabled = !health.explain;
    if (!health.explain) $("explain").checked = false;
  } catch (e) {
    $("status").textContent = "the server does not answer";
  }
  loadGallery();
}

$("search-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const file = $("file").files[0];
  if (!file) { showError("Choose an image file first (or click a gallery image)."); return; }
  search({ file });
});
$("file").addEventListener("change", () => { if ($("file").files[0]) search({ file: $("file").files[0] }); });
$("k").addEventListener("change", () => { if (lastQuery && $("k").checkValidity()) search(lastQuery); });
$("more").addEventListener("click", loadGallery);
start();
