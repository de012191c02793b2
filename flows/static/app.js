// digitflow's page: draw or drop an image, POST it to /predict, show the answer.
// Plain browser JavaScript, served by the app itself (no CDN, no build step).
"use strict";

const canvas = document.getElementById("canvas");
const ctx = canvas.getContext("2d");
const INK_WIDTH = 18; // px on the 280 px canvas: MNIST-like strokes once scaled down
const PREDICT_DELAY_MS = 150; // after the last stroke, so one drawing is one request
let drawing = false;
let last = null;
let timer = null;
let lastImage = null; // {blob, name}: what the label buttons store

function clearCanvas() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
}

function point(event) {
  const r = canvas.getBoundingClientRect();
  return {
    x: ((event.clientX - r.left) * canvas.width) / r.width,
    y: ((event.clientY - r.top) * canvas.height) / r.height,
  };
}

function stroke(from, to) {
  ctx.strokeStyle = "#000";
  ctx.lineWidth = INK_WIDTH;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(from.x, from.y);
  ctx.lineTo(to.x, to.y);
  ctx.stroke();
}

// Pointer events cover mouse, pen and touch alike.
canvas.addEventListener("pointerdown", (e) => {
  drawing = true;
  last = point(e);
  stroke(last, last);
  canvas.setPointerCapture(e.pointerId);
  clearTimeout(timer);
});
canvas.addEventListener("pointermove", (e) => {
  if (!drawing) return;
  const p = point(e);
  stroke(last, p);
  last = p;
});
function endStroke() {
  if (!drawing) return;
  drawing = false;
  clearTimeout(timer);
  timer = setTimeout(predictCanvas, PREDICT_DELAY_MS);
}
canvas.addEventListener("pointerup", endStroke);
canvas.addEventListener("pointercancel", endStroke);

document.getElementById("clear").addEventListener("click", () => {
  clearCanvas();
  showRow(null);
});

function predictCanvas() {
  canvas.toBlob((blob) => predict(blob, "canvas.png"), "image/png");
}

// A photo: dropped on the canvas or picked with the file input.
canvas.addEventListener("dragover", (e) => {
  e.preventDefault();
  canvas.classList.add("drop");
});
canvas.addEventListener("dragleave", () => canvas.classList.remove("drop"));
canvas.addEventListener("drop", (e) => {
  e.preventDefault();
  canvas.classList.remove("drop");
  const file = e.dataTransfer.files[0];
  if (file) usePhoto(file);
});
document.getElementById("file").addEventListener("change", (e) => {
  const file = e.target.files[0];
  if (file) usePhoto(file);
});

function usePhoto(file) {
  const url = URL.createObjectURL(file);
  const img = new Image();
  img.onload = () => {
    // shown on the canvas (fitted, centred); the file itself is what is classified
    clearCanvas();
    const s = Math.min(canvas.width / img.width, canvas.height / img.height);
    const w = img.width * s;
    const h = img.height * s;
    ctx.drawImage(img, (canvas.width - w) / 2, (canvas.height - h) / 2, w, h);
    URL.revokeObjectURL(url);
  };
  img.onerror = () => URL.revokeObjectURL(url);
  img.src = url;
  predict(file, file.name || "photo");
}

async function predict(blob, name) {
  lastImage = { blob, name };
  setStatus("");
  const form = new FormData();
  form.append("files", blob, name);
  let response;
  try {
    response = await fetch("/predict?input=true", { method: "POST", body: form });
  } catch (err) {
    setStatus("the server did not answer: " + err);
    return;
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    showRow(null);
    setStatus((body && body.detail) || "HTTP " + response.status);
    return;
  }
  showRow(body[0]);
}

function setStatus(text) {
  document.getElementById("status").textContent = text;
}

function showRow(row) {
  const digit = document.getElementById("digit");
  const confidence = document.getElementById("confidence");
  const input = document.getElementById("input-img");
  const bars = document.getElementById("bars");
  bars.textContent = "";
  if (!row) {
    digit.textContent = "–";
    confidence.textContent = "";
    input.removeAttribute("src");
    document.body.dataset.state = "idle";
    return;
  }
  if (row.input_png) input.src = "data:image/png;base64," + row.input_png;
  else input.removeAttribute("src");
  if (row.status !== "ok") {
    digit.textContent = "?";
    confidence.textContent = "";
    setStatus(row.message);
    document.body.dataset.state = row.status;
    return;
  }
  digit.textContent = String(row.label);
  confidence.textContent = (100 * row.confidence).toFixed(1) + " %";
  for (let i = 0; i < 10; i++) {
    const p = row["p" + i];
    const li = document.createElement("li");
    li.dataset.digit = String(i);
    if (String(i) === String(row.label)) li.className = "top";
    li.innerHTML =
      '<span>' + i + '</span><span class="bar"><span class="fill"></span></span>' +
      '<span class="value"></span>';
    li.querySelector(".fill").style.width = (100 * p).toFixed(1) + "%";
    li.querySelector(".value").textContent = (100 * p).toFixed(1) + " %";
    bars.appendChild(li);
  }
  document.body.dataset.state = "ok";
}

async function storeLabel(label) {
  if (!lastImage) return;
  const status = document.getElementById("label-status");
  const response = await fetch("/label?label=" + label, {
    method: "POST",
    body: lastImage.blob,
    headers: { "Content-Type": lastImage.blob.type || "application/octet-stream" },
  });
  const body = await response.json().catch(() => null);
  status.textContent = response.ok ? "stored as " + label + ", thank you" : (body && body.detail) || "HTTP " + response.status;
}

async function init() {
  clearCanvas();
  showRow(null);
  const health = await (await fetch("/health")).json();
  const m = health.model;
  document.getElementById("model").textContent =
    "model " + m.sha256.slice(0, 12) + (m.champion ? " (" + m.champion + ")" : "");
  if (health.accept_labels) {
    const buttons = document.getElementById("label-buttons");
    for (let i = 0; i < 10; i++) {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = String(i);
      b.addEventListener("click", () => storeLabel(i));
      buttons.appendChild(b);
    }
    document.getElementById("labels").hidden = false;
  }
  document.body.dataset.ready = "1";
}

init();
