// clipsearch web page: plain JS, no build step, talks to /indices and /knn of the same server.
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  form: $("search-form"), q: $("q"), file: $("file"), upload: $("upload-btn"), urlBtn: $("url-btn"),
  urlRow: $("url-row"), imageUrl: $("image-url"), urlGo: $("url-go"), index: $("index"), modality: $("modality"),
  mode: $("mode"),
  k: $("k"), safe: $("safe"), dedup: $("dedup"), filterBtn: $("filter-btn"), filterRow: $("filter-row"),
  fCaption: $("f-caption"), fWidth: $("f-width"), fExpr: $("f-expr"), fClear: $("f-clear"), columns: $("columns"),
  status: $("status"), results: $("results"), more: $("more"), chip: $("query-chip"), chipThumb: $("query-thumb"),
  chipLabel: $("query-label"), chipClear: $("chip-clear"), overlay: $("drop-overlay"),
  mlOpt: $("ml-opt"), multilingual: $("multilingual"), aesOpt: $("aes-opt"), aesthetic: $("aesthetic"),
};

// the current query: {kind: "text"|"image"|"image_url"|"id", value, label}
let current = null;
let nextOffset = null;
let searchSeq = 0;    // bumps on every new search: a late answer to an older one is dropped
let inFlight = null;  // AbortController of the search in flight, null when none is
let indices = [];
let thumbUrl = null;

function setStatus(text, isError = false) {
  els.status.textContent = text;
  els.status.classList.toggle("error", isError);
}

function quote(s) {
  return '"' + String(s).replace(/\\/g, "\\\\").replace(/"/g, '\\"') + '"';
}

function filterExpression() {
  const parts = [];
  const cap = els.fCaption.value.trim();
  if (cap) parts.push(`caption contains ${quote(cap)}`);
  const w = els.fWidth.value.trim();
  if (w !== "" && !Number.isNaN(Number(w))) parts.push(`width >= ${Number(w)}`);
  const expr = els.fExpr.value.trim();
  if (expr) parts.push(`(${expr})`);
  return parts.join(" and ");
}

function currentIndex() {
  return indices.find((i) => i.name === els.index.value) || indices[0];
}

function updateFilterFields() {
  const idx = currentIndex();
  const cols = idx ? idx.columns : {};
  els.fCaption.closest("label").hidden = !("caption" in cols);
  els.fWidth.closest("label").hidden = !("width" in cols);
  els.columns.innerHTML = "";
  for (const c of Object.keys(cols)) {
    const o = document.createElement("option");
    o.value = c;
    els.columns.appendChild(o);
  }
  // keyword and hybrid need the index's keyword index (built by `clipsearch index` unless --no-text-index)
  const kw = Boolean(idx && idx.keywords);
  for (const opt of els.mode.options) {
    opt.disabled = opt.value !== "semantic" && !kw;
    opt.title = opt.disabled ? "this index has no keyword index" : "";
  }
  if (!kw) els.mode.value = "semantic";
  els.aesOpt.hidden = !(idx && idx.aesthetic);  // aesthetic nudging needs the index's table
  const mods = idx ? Object.keys(idx.modalities) : ["image"];
  for (const opt of els.modality.options) opt.disabled = !mods.includes(opt.value);
  if (!mods.includes(els.modality.value)) els.modality.value = mods[0];
}

async function loadIndices() {
  try {
    const r = await fetch("/indices");
    const data = await r.json();
    indices = data.indices || [];
    els.index.innerHTML = "";
    for (const i of indices) {
      const o = document.createElement("option");
      o.value = i.name;
      o.textContent = `${i.name} (${i.count.toLocaleString()})`;
      els.index.appendChild(o);
    }
    els.index.closest("label").hidden = indices.length <= 1;
    els.mlOpt.hidden = !(data.multilingual && data.multilingual.length);
    updateFilterFields();
  } catch (e) {
    setStatus("Could not list the indices: " + e, true);
  }
}

function buildRequest(offset) {
  const body = {
    index: els.index.value || undefined,
    modality: els.modality.value,
    k: Number(els.k.value),
    offset,
    deduplicate: els.dedup.checked,
    safety: els.safe.checked,
  };
  const f = filterExpression();
  if (f) body.filter = f;
  if (current.kind === "text") {
    body.text = current.value;
    if (els.mode.value !== "semantic") body.mode = els.mode.value;  // keywords apply to text queries only
    if (!els.mlOpt.hidden && els.multilingual.checked) body.multilingual = true;
  }
  if (!els.aesOpt.hidden && Number(els.aesthetic.value) > 0) {
    body.aesthetic_score = 9;
    body.aesthetic_weight = Number(els.aesthetic.value);
  }
  else if (current.kind === "image_url") body.image_url = current.value;
  else if (current.kind === "id") { body.id = current.value; if (current.index) body.index = current.index; }
  if (current.kind === "image") {
    const fd = new FormData();
    for (const [key, v] of Object.entries(body)) if (v !== undefined) fd.append(key, String(v));
    fd.append("image", current.value, current.value.name || "query.png");
    return { method: "POST", body: fd };
  }
  return { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
}

function errorText(data, status) {
  if (!data || data.detail === undefined) return `HTTP ${status}`;
  if (typeof data.detail === "string") return data.detail;
  if (Array.isArray(data.detail)) return data.detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
  return JSON.stringify(data.detail);
}

async function search(append = false) {
  if (!current) return;
  if (append && inFlight) return;  // "load more" waits for the page it extends
  // A new query wins over the one in flight (a click while results are loading must not be lost).
  if (inFlight) inFlight.abort();
  const seq = ++searchSeq;
  const ctrl = new AbortController();
  inFlight = ctrl;
  els.more.disabled = true;
  const offset = append ? nextOffset || 0 : 0;
  if (!append) setStatus("Searching…");
  const t0 = performance.now();
  try {
    const r = await fetch("/knn", { ...buildRequest(offset), signal: ctrl.signal });
    const data = await r.json().catch(() => null);
    if (seq !== searchSeq) return;
    if (!r.ok) {
      setStatus(errorText(data, r.status), true);
      if (!append) els.results.innerHTML = "";
      els.more.hidden = true;
      return;
    }
    if (!append) els.results.innerHTML = "";
    render(data.results);
    nextOffset = data.next_offset;
    els.more.hidden = nextOffset === null || nextOffset === undefined;
    const shown = els.results.children.length;
    const bits = [`${shown} result${shown === 1 ? "" : "s"}`];
    if (data.filter_matches !== null && data.filter_matches !== undefined) {
      bits.push(`${data.filter_matches.toLocaleString()} match the filter`);
    }
    const rm = [];
    if (data.removed.duplicates) rm.push(`${data.removed.duplicates} duplicate${data.removed.duplicates === 1 ? "" : "s"}`);
    if (data.removed.unsafe) rm.push(`${data.removed.unsafe} unsafe`);
    if (rm.length) bits.push("hid " + rm.join(" and "));
    if (data.notes && data.notes.length) bits.push(data.notes.join("; "));
    bits.push(`${Math.round(performance.now() - t0)} ms`);
    setStatus(shown ? bits.join(" · ") : "No results. Try other words or loosen the filters.");
  } catch (e) {
    if (seq === searchSeq) setStatus("Search failed: " + e, true);
  } finally {
    if (seq === searchSeq) {
      inFlight = null;
      els.more.disabled = false;
    }
  }
}

function render(results) {
  const frag = document.createDocumentFragment();
  for (const hit of results) {
    const card = document.createElement("article");
    card.className = "card";
    card.dataset.id = hit.id;
    const link = document.createElement("a");
    link.className = "thumb";
    link.target = "_blank";
    link.rel = "noopener noreferrer";
    if (hit.url && /^https?:/i.test(hit.url)) link.href = hit.url;
    const img = document.createElement("img");
    img.loading = "lazy";
    img.decoding = "async";
    img.alt = hit.caption || "result " + hit.id;
    img.referrerPolicy = "no-referrer";
    img.onerror = () => {
      img.remove();
      const b = document.createElement("div");
      b.className = "broken";
      b.textContent = "image unavailable";
      link.appendChild(b);
    };
    if (hit.url) img.src = hit.url;
    link.appendChild(img);
    const meta = document.createElement("div");
    meta.className = "meta";
    const cap = document.createElement("div");
    cap.className = "caption" + (hit.caption ? "" : " none");
    if (hit.caption && hit.highlights && hit.highlights.length) appendHighlighted(cap, hit.caption, hit.highlights);
    else cap.textContent = hit.caption || "no caption";
    cap.title = hit.caption || "";
    const row = document.createElement("div");
    row.className = "row";
    const sim = document.createElement("span");
    sim.className = "sim";
    if (hit.keyword_score === undefined) {
      sim.textContent = hit.similarity.toFixed(3);
      sim.title = "cosine similarity";
    } else {
      const parts = [];
      if (hit.similarity !== null) parts.push(hit.similarity.toFixed(3));
      parts.push(hit.keyword_score > 0 ? `kw ${hit.keyword_score.toFixed(1)}` : "kw –");
      sim.textContent = parts.join(" · ");
      sim.title = `cosine similarity and BM25 of the caption; ranked by ${hit.score.toFixed(3)}`;
    }
    const like = document.createElement("button");
    like.type = "button";
    like.className = "like";
    like.textContent = "More like this";
    like.addEventListener("click", () => {
      setQuery({ kind: "id", value: hit.id, index: els.index.value, label: `like #${hit.id}: ${hit.caption || ""}`, thumb: hit.url });
      window.scrollTo({ top: 0, behavior: "smooth" });
      search(false);
    });
    row.append(sim, like);
    meta.append(cap, row);
    card.append(link, meta);
    frag.appendChild(card);
  }
  els.results.appendChild(frag);
}

// matched words in <mark>: spans are [start, end) in code points (the server counts them so)
function appendHighlighted(el, text, spans) {
  const chars = Array.from(text);
  let at = 0;
  for (const [s, e] of spans) {
    if (s > at) el.append(chars.slice(at, s).join(""));
    const m = document.createElement("mark");
    m.textContent = chars.slice(s, e).join("");
    el.append(m);
    at = e;
  }
  if (at < chars.length) el.append(chars.slice(at).join(""));
}

function setQuery(q) {
  current = q;
  nextOffset = null;
  if (thumbUrl) { URL.revokeObjectURL(thumbUrl); thumbUrl = null; }
  if (q.kind === "text") {
    els.chip.hidden = true;
    return;
  }
  let thumb = "";
  if (q.kind === "image") { thumbUrl = URL.createObjectURL(q.value); thumb = thumbUrl; }
  else if (q.kind === "image_url") thumb = q.value;
  else if (q.thumb && /^https?:/i.test(q.thumb)) thumb = q.thumb;
  if (thumb) els.chipThumb.src = thumb; else els.chipThumb.removeAttribute("src");
  els.chipLabel.textContent = q.label;
  els.chip.hidden = false;
}

function searchImageFile(file) {
  if (!file || !file.type.startsWith("image/")) { setStatus("That is not an image file.", true); return; }
  els.q.value = "";
  setQuery({ kind: "image", value: file, label: `image: ${file.name || "pasted image"}` });
  search(false);
}

els.form.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = els.q.value.trim();
  if (text) { setQuery({ kind: "text", value: text }); rememberQuery(text); search(false); }
  else if (current) search(false);
  else els.q.focus();
});
els.upload.addEventListener("click", () => els.file.click());
els.file.addEventListener("change", () => { if (els.file.files[0]) searchImageFile(els.file.files[0]); els.file.value = ""; });
els.urlBtn.addEventListener("click", () => {
  els.urlRow.hidden = !els.urlRow.hidden;
  els.urlBtn.setAttribute("aria-pressed", String(!els.urlRow.hidden));
  if (!els.urlRow.hidden) els.imageUrl.focus();
});
function searchUrl() {
  const u = els.imageUrl.value.trim();
  if (!u) return;
  setQuery({ kind: "image_url", value: u, label: `image URL: ${u}` });
  search(false);
}
els.urlGo.addEventListener("click", searchUrl);
els.imageUrl.addEventListener("keydown", (ev) => { if (ev.key === "Enter") { ev.preventDefault(); searchUrl(); } });
els.more.addEventListener("click", () => search(true));
els.chipClear.addEventListener("click", () => { current = null; els.chip.hidden = true; els.results.innerHTML = ""; els.more.hidden = true; setStatus("Type a description, or search with an image."); els.q.focus(); });
els.filterBtn.addEventListener("click", () => {
  els.filterRow.hidden = !els.filterRow.hidden;
  els.filterBtn.setAttribute("aria-expanded", String(!els.filterRow.hidden));
});
els.fClear.addEventListener("click", () => { els.fCaption.value = ""; els.fWidth.value = ""; els.fExpr.value = ""; search(false); });
for (const el of [els.fCaption, els.fWidth, els.fExpr]) {
  el.addEventListener("keydown", (ev) => { if (ev.key === "Enter") { ev.preventDefault(); search(false); } });
}
for (const el of [els.modality, els.k, els.safe, els.dedup, els.multilingual, els.aesthetic]) el.addEventListener("change", () => search(false));
els.mode.addEventListener("change", () => { if (current && current.kind === "text") rememberQuery(current.value); search(false); });
els.index.addEventListener("change", () => { updateFilterFields(); if (current && current.kind === "id") return; search(false); });

// paste an image anywhere on the page
document.addEventListener("paste", (ev) => {
  const items = ev.clipboardData ? Array.from(ev.clipboardData.items) : [];
  const item = items.find((i) => i.kind === "file" && i.type.startsWith("image/"));
  if (item) { ev.preventDefault(); searchImageFile(item.getAsFile()); }
});
// drag and drop
let dragDepth = 0;
document.addEventListener("dragenter", (ev) => { if (ev.dataTransfer && Array.from(ev.dataTransfer.types).includes("Files")) { dragDepth++; els.overlay.hidden = false; } });
document.addEventListener("dragleave", () => { dragDepth = Math.max(0, dragDepth - 1); if (!dragDepth) els.overlay.hidden = true; });
document.addEventListener("dragover", (ev) => ev.preventDefault());
document.addEventListener("drop", (ev) => {
  ev.preventDefault();
  dragDepth = 0;
  els.overlay.hidden = true;
  const f = ev.dataTransfer && ev.dataTransfer.files[0];
  if (f) searchImageFile(f);
});

// A text search is kept in the address (?q=...&index=...): a results page can be bookmarked, shared or
// reloaded, and opening such an address runs its search.
function rememberQuery(text) {
  const params = new URLSearchParams({ q: text });
  if (indices.length > 1) params.set("index", els.index.value);
  if (els.mode.value !== "semantic") params.set("mode", els.mode.value);
  history.replaceState(null, "", "?" + params.toString());
}

loadIndices().then(() => {
  const params = new URLSearchParams(location.search);
  const wanted = params.get("index");
  if (wanted && indices.some((i) => i.name === wanted)) { els.index.value = wanted; updateFilterFields(); }
  const mode = params.get("mode");
  const opt = Array.from(els.mode.options).find((o) => o.value === mode && !o.disabled);
  if (opt) els.mode.value = mode;
  const q = (params.get("q") || "").trim();
  if (q) { els.q.value = q; setQuery({ kind: "text", value: q }); search(false); }
});
els.q.focus();
