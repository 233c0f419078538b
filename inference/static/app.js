// Upload the picked or dropped images to /predict in one request and show the top 3 classes.
"use strict";

const TOP_K = 3;
const drop = document.getElementById("drop");
const input = document.getElementById("files");
const statusLine = document.getElementById("status");
const results = document.getElementById("results");
const template = document.getElementById("result-template");
const versionLabel = document.getElementById("model-version");

function setStatus(text, failed = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("failed", failed);
}

async function showModel() {
  try {
    const response = await fetch("/model");
    const info = await response.json();
    versionLabel.textContent = info.version || "none yet (run the trainer)";
  } catch {
    versionLabel.textContent = "unknown (server unreachable)";
  }
}

function bar(entry) {
  const item = document.createElement("li");
  item.className = "bar";
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = entry.category;
  const track = document.createElement("span");
  track.className = "track";
  const fill = document.createElement("span");
  fill.className = "fill";
  fill.style.display = "block";
  fill.style.width = `${(entry.probability * 100).toFixed(1)}%`;
  track.append(fill);
  const pct = document.createElement("span");
  pct.className = "pct";
  pct.textContent = `${(entry.probability * 100).toFixed(1)}%`;
  item.append(label, track, pct);
  return item;
}

function card(file, prediction, version) {
  const node = template.content.firstElementChild.cloneNode(true);
  const img = node.querySelector("img");
  img.addEventListener("error", () => { img.style.visibility = "hidden"; });
  img.src = URL.createObjectURL(file);
  img.alt = file.name;
  // textContent everywhere: file names and messages are never parsed as HTML.
  node.querySelector(".filename").textContent = prediction.filename || file.name;
  if (prediction.error) {
    node.querySelector(".error").textContent = prediction.error.message;
  } else {
    const bars = node.querySelector(".bars");
    for (const entry of prediction.top_k) bars.append(bar(entry));
  }
  node.querySelector(".version").textContent = `model ${version}`;
  return node;
}

async function classify(fileList) {
  const files = Array.from(fileList);
  if (files.length === 0) return;
  const form = new FormData();
  for (const file of files) form.append("file", file, file.name);
  setStatus(`Classifying ${files.length} image${files.length > 1 ? "s" : ""}…`);
  let body;
  let response;
  try {
    response = await fetch(`/predict?top_k=${TOP_K}`, { method: "POST", body: form });
    body = await response.json();
  } catch (error) {
    setStatus(`Request failed: ${error}`, true);
    return;
  }
  if (body.predictions) {
    results.replaceChildren(
      ...body.predictions.map((p, i) => card(files[i], p, body.model_version)),
    );
    versionLabel.textContent = body.model_version;
  } else {
    results.replaceChildren();
  }
  if (response.ok) {
    const done = body.predictions.filter((p) => !p.error).length;
    const of = done === files.length ? "" : ` of ${files.length}`;
    setStatus(`${done}${of} image${files.length > 1 ? "s" : ""} classified.`);
  } else {
    setStatus(body.error ? body.error.message : `HTTP ${response.status}`, true);
  }
}

input.addEventListener("change", () => {
  classify(input.files);
  input.value = "";
});
drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  classify(event.dataTransfer.files);
});

showModel();
