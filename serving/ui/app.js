// medzoo upload page: vanilla JavaScript, no dependencies, talks only to the server that served it.
"use strict";

const ENSEMBLE = "pathology_ensemble";
const $ = (sel, root = document) => root.querySelector(sel);
const state = { models: null, files: [], previews: new WeakMap() };

function setStatus(text) { $("#status").textContent = text; }

function pct(p) { return `${(100 * p).toFixed(1)} %`; }

// The level 1 - alpha of a prediction set: 0.1 -> "90 %", 0.025 -> "97.5 %".
function level(alpha) { return `${Number((100 * (1 - alpha)).toFixed(1))} %`; }

async function readJson(response) {
  try { return await response.json(); } catch { return { error: `${response.status} ${response.statusText}` }; }
}

// ------------------------------------------------------------------ models

function describeModel(value) {
  if (!state.models) return "";
  if (value === ENSEMBLE) {
    const ens = state.models.ensemble;
    return `ensemble of ${ens.members.length} ${ens.arch} models (mean of logits)`;
  }
  const m = state.models.models.find((t) => t.task === value);
  return m ? `${m.id} — ${m.arch}, ${m.labels.length} classes` : "";
}

function addOption(select, value, text, ok, why) {
  const opt = document.createElement("option");
  opt.value = value;
  opt.textContent = ok ? text : `${text} (unavailable)`;
  opt.disabled = !ok;
  if (!ok && why) opt.title = why;
  select.append(opt);
}

async function loadModels() {
  const select = $("#task");
  try {
    const response = await fetch("../models");
    const body = await readJson(response);
    if (!response.ok) throw new Error(body.error || response.statusText);
    state.models = body;
  } catch (err) {
    select.innerHTML = "<option disabled selected>no models</option>";
    setStatus(`Could not read the models: ${err.message}`);
    return;
  }
  select.innerHTML = "";
  for (const m of state.models.models) {
    addOption(select, m.task, m.status === "ok" ? `${m.task} (${m.dataset || m.arch})` : m.task, m.status === "ok", m.message);
  }
  const ens = state.models.ensemble;
  addOption(select, ENSEMBLE, "pathology ensemble", ens.status === "ok", ens.message);
  const first = [...select.options].find((o) => !o.disabled);
  if (first) select.value = first.value;
  $("#model-info").textContent = describeModel(select.value);
  updateButton();
}

// ------------------------------------------------------------------ files

function setFiles(list) {
  state.files = [...list].filter((f) => f.size > 0);
  const n = state.files.length;
  $(".drop-title").textContent = n ? `${n} image${n > 1 ? "s" : ""} ready: ${state.files.map((f) => f.name).join(", ")}` : "Drop images here";
  updateButton();
}

function updateButton() {
  $("#run").disabled = !(state.files.length && $("#task").value);
}

function wireDrop() {
  const drop = $("#drop");
  for (const ev of ["dragenter", "dragover"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const ev of ["dragleave", "drop"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => setFiles(e.dataTransfer.files));
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("#files").click(); } });
  $("#files").addEventListener("change", (e) => setFiles(e.target.files));
}

// ------------------------------------------------------------------ results

function formData(files, options = {}) {
  const fd = new FormData();
  for (const f of files) fd.append("images", f, f.name);
  for (const [name, value] of Object.entries(options)) fd.append(name, value);
  return fd;
}

// The browser shows PNG, JPEG and BMP itself; a file it cannot show (DICOM, TIFF) is replaced by the
// image the model saw, which the server decoded once and sends back (preview_png).
function showDecoded(card) {
  const png = state.previews.get(card);
  if (!card.dataset.unshown || !png) return;
  const fig = $(".original", card);
  $("img", fig).src = `data:image/png;base64,${png}`;
  fig.classList.add("decoded");
  $("figcaption", fig).textContent = "image as the model saw it (decoded by the server)";
}

function makeCard(file) {
  const card = $("#card-template").content.firstElementChild.cloneNode(true);
  $(".filename", card).textContent = file.name;
  const img = $(".original img", card);
  img.addEventListener("error", () => { card.dataset.unshown = "1"; showDecoded(card); }, { once: true });
  img.src = URL.createObjectURL(file);
  $("#results").append(card);
  return card;
}

function showError(card, text) {
  const p = $(".error", card);
  p.textContent = text;
  p.hidden = false;
}

function showClasses(card, result) {
  if (result.error) { showError(card, result.error); return; }
  const list = $(".classes", card);
  list.innerHTML = "";
  for (const t of result.top) {
    const li = document.createElement("li");
    li.dataset.label = t.label;
    const name = document.createElement("strong");
    name.textContent = t.label;
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = pct(t.prob).replace(" ", "");
    bar.append(fill);
    li.append(name, ` ${pct(t.prob)}`, bar);
    list.append(li);
  }
  showSet(card, result);
  showOod(card, result);
  if (result.preview_png) { state.previews.set(card, result.preview_png); showDecoded(card); }
}

// Filled once the model carries conformal scores (prediction_set, alpha); absent fields show nothing.
function showSet(card, result) {
  if (!Array.isArray(result.prediction_set) || typeof result.alpha !== "number") return;
  const p = $(".plausible", card);
  // "; " between labels when a label holds a comma ("normal, benign"), so the set reads unambiguously
  const sep = result.prediction_set.some((label) => label.includes(",")) ? "; " : ", ";
  p.textContent = `plausible at ${level(result.alpha)}: `;
  const last = result.prediction_set.length - 1;
  result.prediction_set.forEach((label, i) => {
    const chip = document.createElement("span");
    chip.className = "set-label";
    chip.textContent = label;
    const item = document.createElement("span");
    item.className = "set-item"; // the label and its separator stay on one line
    item.append(chip, i < last ? sep.trim() : "");
    p.append(item, i < last ? " " : "");
  });
  p.title = `conformal prediction set: for images like the model's validation images, the true class is ` +
    `in this set at least ${level(result.alpha)} of the time`;
  p.hidden = false;
}

// Filled once the model carries an out-of-distribution detector: absent fields show nothing.
function showOod(card, result) {
  if (result.in_distribution !== false) return;
  const p = $(".ood", card);
  const score = typeof result.ood_score === "number" ? ` (score ${result.ood_score.toFixed(2)})` : "";
  p.textContent = `This image looks unlike the images the model was trained on${score}: treat the answer with caution.`;
  p.hidden = false;
}

function showOverlay(card, result, method) {
  const fig = $(".overlay", card);
  $("img", fig).src = `data:image/png;base64,${result.overlay_png}`;
  const what = result.explained ? `${result.explained.label} (${pct(result.explained.prob)})` : "the predicted class";
  $("figcaption", fig).textContent = `${method === "saliency" ? "saliency" : "Grad-CAM"} for ${what}`;
  fig.hidden = false;
  $(".explain-state", card).textContent = "";
  showOod(card, result);
}

async function post(url, files, options = {}) {
  const response = await fetch(url, { method: "POST", body: formData(files, options) });
  return { ok: response.ok, body: await readJson(response) };
}

async function classify(task, files, cards) {
  const { ok, body } = await post(`../${task}`, files, { preview: "true" });
  if (!body.results) throw new Error(body.error || "no answer");
  for (const r of body.results) showClasses(cards[r.index], r);
  return ok;
}

async function explain(task, files, cards) {
  for (const card of cards) $(".explain-state", card).textContent = "computing the heat map…";
  const { body } = await post(`../${task}/explain`, files);
  if (!body.results || !body.results.length) {
    for (const card of cards) $(".explain-state", card).textContent = `no heat map: ${body.error || "no answer"}`;
    return "";
  }
  for (const r of body.results) {
    if (r.overlay_png) showOverlay(cards[r.index], r, body.method);
    else $(".explain-state", cards[r.index]).textContent = `no heat map: ${r.error}`;
  }
  return body.note || "";
}

async function run(event) {
  event.preventDefault();
  const task = $("#task").value;
  const files = state.files;
  $("#results").innerHTML = "";
  const cards = files.map(makeCard);
  $("#run").disabled = true;
  try {
    setStatus(`Classifying ${files.length} image(s) with ${task}…`);
    await classify(task, files, cards);
    let note = "";
    if ($("#explain").checked) {
      setStatus("Classified. Computing the heat maps…");
      note = await explain(task, files, cards);
    }
    setStatus(note ? `Done. Note: ${note}` : "Done.");
  } catch (err) {
    setStatus(`The server could not answer: ${err.message}`);
  } finally {
    updateButton();
  }
}

document.addEventListener("DOMContentLoaded", () => {
  wireDrop();
  $("#task").addEventListener("change", (e) => { $("#model-info").textContent = describeModel(e.target.value); updateButton(); });
  $("#form").addEventListener("submit", run);
  loadModels();
});
