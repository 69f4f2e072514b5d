// The draw-a-digit page: pointer events (mouse, touch and pen alike) draw on #pad; the drawing is
// posted to /predict as a PNG while you draw, one request at a time, the latest drawing winning. Where the
// server keeps feedback (/readyz says so), "Right" or "Wrong? It was: N" sends the image last read to /feedback.
"use strict";

const pad = document.getElementById("pad");
const ctx = pad.getContext("2d");
const digit = document.getElementById("digit");
const confidence = document.getElementById("confidence");
const top3 = document.getElementById("top3");
const error = document.getElementById("error");
const model = document.getElementById("model");
const feedback = document.getElementById("feedback");
const thanks = document.getElementById("thanks");

let feedbackOn = false;  // the server keeps feedback (serve --feedback on)
let lastRead = null;     // {image, digit, version}: the image the shown answer is of

let drawing = false;   // a stroke is in progress
let dirty = false;     // the pad changed since the last request was sent
let inFlight = false;  // a request is on its way
let empty = true;

function clearPad() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, pad.width, pad.height);
  empty = true;
  dirty = false;
  digit.textContent = "–";
  confidence.textContent = "Draw on the pad, or upload a photo of a digit.";
  top3.replaceChildren();
  error.textContent = "";
  lastRead = null;
  feedback.hidden = true;
}

function point(event) {
  const box = pad.getBoundingClientRect();
  return [(event.clientX - box.left) * pad.width / box.width, (event.clientY - box.top) * pad.height / box.height];
}

pad.addEventListener("pointerdown", (event) => {
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  drawing = true;
  const [x, y] = point(event);
  ctx.lineWidth = pad.width / 12;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.strokeStyle = "#000";
  ctx.beginPath();
  ctx.moveTo(x, y);
  ctx.lineTo(x, y);
  ctx.stroke();
  empty = false;
  changed();
});

pad.addEventListener("pointermove", (event) => {
  if (!drawing) return;
  event.preventDefault();
  const [x, y] = point(event);
  ctx.lineTo(x, y);
  ctx.stroke();
  changed();
});

for (const kind of ["pointerup", "pointercancel"]) {
  pad.addEventListener(kind, () => {
    if (drawing) changed();
    drawing = false;
  });
}
// no scrolling or zooming while a finger draws (touch-action: none covers most browsers)
pad.addEventListener("touchmove", (event) => event.preventDefault(), { passive: false });

function changed() {
  dirty = true;
  if (!inFlight) send();
}

function send() {
  if (!dirty || empty) return;
  dirty = false;
  inFlight = true;
  pad.toBlob((blob) => post(blob, "image/png", blob).finally(() => {
    inFlight = false;
    if (dirty) send();
  }), "image/png");
}

async function post(body, type, image) {
  try {
    // a FormData body sets its own multipart Content-Type
    const response = await fetch("/predict", { method: "POST", headers: type ? { "Content-Type": type } : {}, body });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
    show(answer);
    lastRead = { image, digit: answer.predictions[0].digit, version: answer.checkpoint.version };
    thanks.textContent = "";
    feedback.hidden = !feedbackOn;
  } catch (exc) {
    error.textContent = exc.message;
  }
}

function show(answer) {
  const result = answer.predictions[0];
  error.textContent = "";
  digit.textContent = String(result.digit);
  confidence.textContent = `${(result.confidence * 100).toFixed(1)}% sure (epoch ${answer.checkpoint.epoch})`;
  const ranked = result.probabilities.map((p, d) => [d, p]).sort((a, b) => b[1] - a[1]).slice(0, 3);
  top3.replaceChildren(...ranked.map(([d, p]) => {
    const row = document.createElement("li");
    row.innerHTML = `<span>${d}</span><span class="track"><span class="fill"></span></span>` +
                    `<span class="value">${(p * 100).toFixed(1)}%</span>`;
    row.querySelector(".fill").style.width = `${Math.max(p * 100, 0.5)}%`;
    return row;
  }));
}

document.getElementById("clear").addEventListener("click", clearPad);

document.getElementById("upload").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (!file) return;
  const form = new FormData();
  form.append("file", file);
  clearPad();
  post(form, null, file);
  event.target.value = "";
  // show it on the pad, fitted (the prediction is of the original file, sent as it is)
  createImageBitmap(file).then((bitmap) => {
    const scale = Math.min(pad.width / bitmap.width, pad.height / bitmap.height);
    const [w, h] = [bitmap.width * scale, bitmap.height * scale];
    ctx.drawImage(bitmap, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
    empty = false;
  }).catch(() => {});  // a format the browser cannot show: the server's answer says what is wrong
});

async function loadModel() {
  try {
    const response = await fetch("/readyz");
    const info = await response.json();
    if (response.ok) {
      feedbackOn = info.feedback === true;
      if (!feedbackOn) feedback.hidden = true;
      const version = info.checkpoint.version ? `version ${info.checkpoint.version}, ` : "";
      model.textContent = `Model: ${version}epoch ${info.checkpoint.epoch}, test accuracy ` +
                          `${(info.accuracy * 100).toFixed(2)}% (checkpoint ${info.checkpoint.sha256.slice(0, 12)})`;
    } else {
      model.textContent = `Not ready: ${info.error}`;
    }
  } catch (exc) {
    model.textContent = `The server does not answer (${exc.message}).`;
  }
}

async function tell(label) {
  if (!lastRead) return;
  const form = new FormData();
  form.append("file", lastRead.image, "drawing.png");
  form.append("label", String(label));
  const query = lastRead.version ? `?version=${lastRead.version}` : "";
  try {
    const response = await fetch(`/feedback${query}`, { method: "POST", body: form });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
    thanks.textContent = `Thank you: kept as ${label} for review (${answer.id.slice(0, 12)}).`;
  } catch (exc) {
    thanks.textContent = `Not kept: ${exc.message}`;
  }
}

const digits = document.getElementById("digits");
for (let d = 0; d < 10; d++) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = String(d);
  button.dataset.digit = String(d);
  button.addEventListener("click", () => tell(d));
  digits.append(button);
}
document.getElementById("right").addEventListener("click", () => { if (lastRead) tell(lastRead.digit); });

document.getElementById("curl").textContent = `curl -F file=@digit.png ${location.origin}/predict`;
clearPad();
loadModel();
setInterval(loadModel, 5000);  // the server follows new checkpoints; so does this line
