// The page of serve.py: each image is sent to POST /predict on its own (the server batches those that arrive
// together) with a low score threshold, and the slider filters the answers here, without asking again.
"use strict";

const LOWEST_SCORE = 0.05;  // the slider's minimum: the detections asked for
const slider = document.getElementById("threshold");
const results = document.getElementById("results");

function colour(classId) {
  return `hsl(${(classId * 137.5) % 360}, 75%, 40%)`;
}

function element(tag, attributes = {}, text = "") {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  node.textContent = text;
  return node;
}

async function describeModel() {
  const model = await (await fetch("/model")).json();
  document.getElementById("model-name").textContent = model.name;
  document.getElementById("model-details").textContent =
    `${model.backbone ?? "?"} backbone, ${model.image_size} px input, ${model.runtime} on ${model.device} ` +
    `(${model.dtype}), ${model.class_names.length} classes: ${model.class_names.join(", ")}`;
}

// Boxes are VOC pixels (1-based, inclusive): the box covers pixels x1..x2, so its left edge is at x1 - 1.
function draw(card) {
  const threshold = Number(slider.value);
  const answer = card.answer;
  const kept = answer.detections.filter((d) => d.score >= threshold);
  card.querySelectorAll(".box").forEach((box) => box.remove());
  const frame = card.querySelector(".frame");
  for (const d of kept) {
    const box = element("div", {class: "box", "data-class": d.class_name});
    box.style.left = `${(100 * (d.x1 - 1)) / answer.width}%`;
    box.style.top = `${(100 * (d.y1 - 1)) / answer.height}%`;
    box.style.width = `${(100 * (d.x2 - d.x1 + 1)) / answer.width}%`;
    box.style.height = `${(100 * (d.y2 - d.y1 + 1)) / answer.height}%`;
    box.style.borderColor = colour(d.class_id);
    const label = element("span", {}, `${d.class_name} ${d.score.toFixed(2)}`);
    label.style.background = colour(d.class_id);
    box.append(label);
    frame.append(box);
  }
  const body = card.querySelector("tbody");
  body.replaceChildren(...kept.map((d) => {
    const row = element("tr");
    row.append(element("td", {}, d.class_name), element("td", {}, d.score.toFixed(3)),
               ...[d.x1, d.y1, d.x2, d.y2].map((value) => element("td", {}, value.toFixed(1))));
    return row;
  }));
  card.querySelector(".count").textContent = `${kept.length} of ${answer.detections.length} detections`;
}

async function detect(file) {
  const card = element("section", {class: "result"});
  const title = element("h2", {}, file.name);
  const timing = element("span", {class: "timing"}, " detecting...");
  title.append(timing);
  const frame = element("div", {class: "frame"});
  const image = element("img", {alt: file.name});
  image.src = URL.createObjectURL(file);
  frame.append(image);
  card.append(title, frame);
  results.prepend(card);

  const form = new FormData();
  form.append("image", file);
  const started = performance.now();
  try {
    const response = await fetch(`/predict?score_threshold=${LOWEST_SCORE}`, {method: "POST", body: form});
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.detail ?? response.statusText);
    card.answer = answer;
  } catch (error) {
    timing.textContent = "";
    card.append(element("p", {class: "error"}, `error: ${error.message}`));
    return;
  }
  const roundTrip = performance.now() - started;
  timing.textContent = ` ${card.answer.width} x ${card.answer.height}, ${card.answer.milliseconds} ms on the ` +
    `server (batch of ${card.answer.batch_size}), ${roundTrip.toFixed(0)} ms in all`;
  const table = element("table", {class: "detections"});
  const head = element("tr");
  for (const name of ["class", "score", "x1", "y1", "x2", "y2"]) head.append(element("th", {}, name));
  table.append(element("thead"), element("tbody"));
  table.tHead.append(head);
  const caption = element("caption", {class: "count"});
  table.prepend(caption);
  card.append(table);
  card.classList.add("done");
  draw(card);
}

function detectAll(files) {
  for (const file of files) detect(file);
}

function showThreshold() {
  document.getElementById("threshold-value").textContent = Number(slider.value).toFixed(2);
}

slider.addEventListener("input", () => {
  showThreshold();
  document.querySelectorAll(".result.done").forEach(draw);
});
document.getElementById("files").addEventListener("change", (event) => detectAll(event.target.files));
const drop = document.getElementById("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  detectAll(event.dataTransfer.files);
});
showThreshold();
describeModel().catch((error) => {
  document.getElementById("model-details").textContent = `cannot read the model's description: ${error.message}`;
});
