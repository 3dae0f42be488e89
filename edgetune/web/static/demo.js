// demo.js: the edgetune web demo. A pretrained model (its manifest's web.demo says which) is
// fine-tuned in this tab on examples the user draws, picks from disk, or takes from the packaged
// sample digits. Everything stays in the page: the model, the examples, the trained weights.
//
// The page keeps window.edgetune up to date for web/drive.mjs (the browser tests):
//   {trainer, resumed}      set once the model loaded ({error} where it could not)
//   training                true while a training run (its steps and its accuracy after) goes on
//   trainedSteps, losses    the steps this page trained since it loaded, and their losses
//   lastAccuracy            held-out accuracy (0..1) last measured, null without a held-out set
import { Trainer } from "./edgetune-web.js";

const $ = (id) => document.getElementById(id);
const HOLD_OUT_EVERY = 4;   // every 4th example added to a class is held out
const PAD_STROKE = 18;      // px on the 192 px pad: about as thick as the sample digits' strokes
const EVAL_CHUNK = 64;      // rows per predict() while measuring: keeps the page responsive
const THUMBS = 6;           // thumbnails shown per class
const WEIGHTS_FILE = "edgetune-weights.safetensors";

const api = { training: false, trainedSteps: 0, losses: [], lastAccuracy: null };

const app = {
  trainer: null,
  demo: null,              // manifest.web.demo
  size: 0,                 // model input side, px
  classes: [],             // [{name, train: [example], test: [example], added, recent: [{example, heldOut}]}]
  selected: 0,
  heldOutVersion: 0,       // bumped whenever the examples change: a cached accuracy is then stale
  accuracy: { key: null, value: null },
  before: null, after: null, afterSteps: 0,
  samples: null,           // {bytes} once samples/digits.bin was fetched
  measuring: false,
  stop: false,
  stepTimes: [],
  runStarts: [],           // indices into api.losses where each run began (drawn as dashed lines)
  plannedEnd: 0,           // the loss curve's x axis reaches the end of the current run
  resumedSteps: 0,
  padDirty: false,
};

// -- status and errors: every failure is said in the page ----------------------------------------

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function showError(what, err) {
  console.error(what, err);
  setStatus(`${what}: ${err && err.message ? err.message : err}`, true);
}

window.addEventListener("error", (e) => showError("Error", e.error || e.message));
window.addEventListener("unhandledrejection", (e) => showError("Error", e.reason));

// -- model calls one at a time: a step and a predict must not run on the runtime together ---------

let modelQueue = Promise.resolve();
function withModel(fn) {
  const run = modelQueue.then(fn);
  modelQueue = run.catch(() => {});
  return run;
}

// -- start --------------------------------------------------------------------------------------

async function main() {
  const params = new URLSearchParams(location.search);
  const threads = Number(params.get("threads")) || undefined;
  const device = params.get("device") === "webgpu" ? "webgpu" : "wasm";
  let trainer;
  try {
    trainer = await Trainer.load("./model/", { device, threads });
  } catch (err) {
    showError("Could not load the model", err);
    window.edgetune = { error: String(err.stack || err) };
    return;
  }
  let resumed = false;
  try {
    resumed = await trainer.restoreState();
  } catch (err) {
    showError("Could not resume the state saved in this browser, starting from the pretrained model", err);
  }
  if (!trainer.manifest.web.demo) { // not an image classifier: the trainer is there for a page of one's own
    window.edgetune = Object.assign(api, { trainer, resumed });
    setStatus("This model is not an image classifier (input [B, 3, S, S], output [B, classes]), so this page " +
      "cannot draw for it. Its trainer is loaded: window.edgetune.trainer; edgetune-web.js steps it from any page.");
    return;
  }
  app.trainer = trainer;
  app.demo = trainer.manifest.web.demo;
  app.size = app.demo.size;
  app.classes = makeClasses(app.demo.classes);
  app.resumedSteps = resumed ? trainer.steps : 0;
  window.edgetune = Object.assign(api, { trainer, resumed });

  setupPad();
  setupClasses();
  setupButtons();
  $("lr").value = trainer.lr;
  renderCard();
  drawLoss();
  showAccuracy();
  updateButtons();
  if (!$("status").classList.contains("error")) {
    setStatus(resumed ? `Ready: resumed the training saved in this browser (step ${trainer.steps}).`
      : "Ready: draw an example, or use the sample digits.");
  }
  const s = app.demo.samples;
  $("samples-note").textContent = s ? `${fmt(s.train.length)} to train on and ${fmt(s.test.length)} held out, from ` +
    `${s.source}. They replace your examples.` : "This build has no sample digits.";
}

// -- examples and classes -------------------------------------------------------------------------

function makeClasses(names) {
  return names.map((name) => ({ name: String(name), train: [], test: [], added: 0, recent: [] }));
}

// An example is {canvas} (a drawing or a picked file, grey ink bright on black, any size) or
// {pixels, side} (a sample: raw uint8 grey, side×side).
function addExample(k, example) {
  const cls = app.classes[k];
  cls.added += 1;
  const heldOut = cls.added % HOLD_OUT_EVERY === 0;
  (heldOut ? cls.test : cls.train).push(example);
  cls.recent = [...cls.recent, { example, heldOut }].slice(-THUMBS);
  examplesChanged([k]);
}

function examplesChanged(rows) {
  app.heldOutVersion += 1;
  app.before = app.after = null; // measured again at the next run, on the examples as they are now
  $("top3").replaceChildren();    // its classes may be gone
  rows.forEach(renderClassRow);
  showAccuracy();
  updateButtons();
}

// Indices of the classes that have training examples: the only ones the model may answer with.
function activeClasses() {
  return app.classes.flatMap((c, k) => (c.train.length ? [k] : []));
}

const trainingPool = () => app.classes.flatMap((c, k) => c.train.map((example) => ({ example, label: k })));
const heldOutSet = () => app.classes.flatMap((c, k) => c.test.map((example) => ({ example, label: k })));

function setupClasses() {
  const body = document.querySelector("#classes tbody");
  app.classes.forEach((_, k) => {
    const row = document.createElement("tr");
    row.innerHTML = `<td><input type="radio" name="class" aria-label="select"></td>
      <td><input type="text" class="name" maxlength="16" aria-label="class name"></td>
      <td class="n-train"></td><td class="n-test"></td><td class="thumbs"></td>
      <td><button class="remove" title="Remove this class's examples">×</button></td>`;
    const radio = row.querySelector("input[type=radio]");
    radio.checked = k === app.selected;
    radio.addEventListener("change", () => selectClass(k));
    const name = row.querySelector(".name");
    name.value = app.classes[k].name;
    name.addEventListener("focus", () => { radio.checked = true; selectClass(k); });
    name.addEventListener("input", () => {
      app.classes[k].name = name.value.trim() || String(k);
      updateAddLabel();
    });
    row.querySelector(".remove").addEventListener("click", () => {
      Object.assign(app.classes[k], { train: [], test: [], added: 0, recent: [] });
      examplesChanged([k]);
    });
    body.appendChild(row);
    renderClassRow(k);
  });
  updateAddLabel();
}

function selectClass(k) {
  app.selected = k;
  updateAddLabel();
}

function updateAddLabel() {
  $("add").textContent = `Add as “${app.classes[app.selected].name}”`;
  $("files-label").firstChild.textContent = `Pick images for “${app.classes[app.selected].name}”…`;
}

function renderClassRow(k) {
  const cls = app.classes[k];
  const row = document.querySelectorAll("#classes tbody tr")[k];
  row.querySelector(".name").value = cls.name;
  row.querySelector(".n-train").textContent = cls.train.length;
  row.querySelector(".n-test").textContent = cls.test.length;
  const thumbs = row.querySelector(".thumbs");
  thumbs.replaceChildren(...cls.recent.map(({ example, heldOut }) => thumbnail(example, heldOut)));
  const more = cls.train.length + cls.test.length - cls.recent.length;
  if (more > 0) thumbs.append(Object.assign(document.createElement("span"), { textContent: `+${more}` }));
}

function thumbnail(example, heldOut) {
  const c = Object.assign(document.createElement("canvas"), { width: 24, height: 24 });
  c.getContext("2d").drawImage(sourceOf(example), 0, 0, 24, 24);
  if (heldOut) { c.classList.add("held-out"); c.title = "held out"; }
  return c;
}

// -- the sample digits ----------------------------------------------------------------------------

// Fetched when asked for, not at load: the page does nothing at load beyond loading the model,
// so that the tests and benchmarks that drive its trainer directly have the tab to themselves.
async function fetchSamples() {
  const s = app.demo.samples;
  if (app.samples) return;
  setStatus("Fetching the sample digits…");
  const response = await fetch(s.file);
  if (!response.ok) throw new Error(`${s.file}: ${response.status} ${response.statusText}`);
  const bytes = new Uint8Array(await response.arrayBuffer());
  if (bytes.length !== s.count * s.size * s.size) throw new Error(`${s.file} holds ${bytes.length} bytes, not ${s.count} images`);
  app.samples = { bytes };
}

function sampleExample(i) {
  const { size } = app.demo.samples;
  return { pixels: app.samples.bytes.subarray(i * size * size, (i + 1) * size * size), side: size };
}

// Replaces the examples with the sample digits (the manifest's split) and measures the model on
// their held-out set: the accuracy "before".
function useSamples() {
  if (busy() || !app.demo.samples) return;
  const s = app.demo.samples;
  runExclusive(async () => {
    try {
      await fetchSamples();
    } catch (err) {
      showError("Could not fetch the sample digits", err);
      return;
    }
    app.classes = makeClasses(app.demo.classes.map(String));
    s.train.forEach((i) => app.classes[s.labels[i]].train.push(sampleExample(i)));
    s.test.forEach((i) => app.classes[s.labels[i]].test.push(sampleExample(i)));
    for (const cls of app.classes) {
      cls.added = cls.train.length + cls.test.length;
      cls.recent = cls.train.slice(0, THUMBS).map((example) => ({ example, heldOut: false }));
    }
    examplesChanged(app.classes.map((_, k) => k));
    updateAddLabel();
    app.before = await measure("before training");
    setStatus(`Loaded ${fmt(s.train.length)} sample digits to train on and ${fmt(s.test.length)} held out. Now train.`);
  });
}

// -- images: every example becomes the model's input the same way -------------------------------

const scratch = document.createElement("canvas");
let scratchContext = null;

// The example as a canvas (samples get one on first use: the canvas transform augments them).
function sourceOf(example) {
  if (!example.canvas) {
    const { pixels, side } = example;
    const c = Object.assign(document.createElement("canvas"), { width: side, height: side });
    const image = new ImageData(side, side);
    for (let i = 0; i < pixels.length; i++) {
      image.data[4 * i] = image.data[4 * i + 1] = image.data[4 * i + 2] = pixels[i];
      image.data[4 * i + 3] = 255;
    }
    c.getContext("2d").putImageData(image, 0, 0);
    example.canvas = c;
  }
  return example.canvas;
}

// The example as size×size uint8 grey; with `rng`, randomly shifted (±8%), scaled (0.9–1.1) and
// rotated (±10°) about the centre, so a few examples per class go further.
function rasterize(example, rng = null) {
  const S = app.size;
  if (!rng && example.pixels && example.side === S) return example.pixels;
  if (!scratchContext) {
    Object.assign(scratch, { width: S, height: S });
    scratchContext = scratch.getContext("2d", { willReadFrequently: true });
  }
  const ctx = scratchContext;
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, S, S);
  if (rng) {
    const shift = () => (rng() * 2 - 1) * 0.08 * S;
    const scale = 0.9 + rng() * 0.2;
    const angle = (rng() * 2 - 1) * (10 * Math.PI / 180);
    ctx.translate(S / 2 + shift(), S / 2 + shift());
    ctx.rotate(angle);
    ctx.scale(scale, scale);
    ctx.translate(-S / 2, -S / 2);
  }
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(sourceOf(example), 0, 0, S, S);
  return luminance(ctx.getImageData(0, 0, S, S).data);
}

function luminance(rgba) {
  const grey = new Uint8Array(rgba.length / 4);
  for (let i = 0; i < grey.length; i++) {
    grey[i] = Math.round(0.299 * rgba[4 * i] + 0.587 * rgba[4 * i + 1] + 0.114 * rgba[4 * i + 2]);
  }
  return grey;
}

// Grey images → the model's float32 [n, 3, S, S]: the grey in all three channels, normalized
// with the ImageNet mean and std the model was pretrained with.
function toInput(greys) {
  const plane = app.size * app.size;
  const { mean, std } = app.demo;
  const tables = [0, 1, 2].map((c) => Float32Array.from({ length: 256 }, (_, v) => (v / 255 - mean[c]) / std[c]));
  const x = new Float32Array(greys.length * 3 * plane);
  greys.forEach((grey, r) => {
    for (let c = 0; c < 3; c++) {
      const table = tables[c];
      const offset = (r * 3 + c) * plane;
      for (let i = 0; i < plane; i++) x[offset + i] = table[grey[i]];
    }
  });
  return x;
}

// A picked file as a 192×192 canvas like the pad's: fitted and centred, grey, ink bright. A
// mostly bright picture (dark ink on paper) is inverted. Transparency counts as paper (white).
function fileToCanvas(bitmap) {
  const side = 192;
  const scale = side / Math.max(bitmap.width, bitmap.height);
  const w = Math.max(1, Math.round(bitmap.width * scale));
  const h = Math.max(1, Math.round(bitmap.height * scale));
  const tmp = Object.assign(document.createElement("canvas"), { width: w, height: h });
  const t = tmp.getContext("2d", { willReadFrequently: true });
  t.fillStyle = "#fff";
  t.fillRect(0, 0, w, h);
  t.drawImage(bitmap, 0, 0, w, h);
  const image = t.getImageData(0, 0, w, h);
  const grey = luminance(image.data);
  const invert = grey.reduce((a, v) => a + v, 0) / grey.length > 127;
  grey.forEach((v, i) => {
    const g = invert ? 255 - v : v;
    image.data[4 * i] = image.data[4 * i + 1] = image.data[4 * i + 2] = g;
    image.data[4 * i + 3] = 255;
  });
  t.putImageData(image, 0, 0);
  const out = Object.assign(document.createElement("canvas"), { width: side, height: side });
  const o = out.getContext("2d");
  o.fillStyle = "#000";
  o.fillRect(0, 0, side, side);
  o.drawImage(tmp, (side - w) / 2, (side - h) / 2);
  return out;
}

async function addFiles(files) {
  let added = 0;
  for (const file of files) {
    try {
      const bitmap = await createImageBitmap(file);
      addExample(app.selected, { canvas: fileToCanvas(bitmap) });
      bitmap.close();
      added += 1;
    } catch (err) {
      showError(`${file.name} is not an image this browser reads`, err);
    }
  }
  if (added) setStatus(`Added ${added} picked image${added > 1 ? "s" : ""} as “${app.classes[app.selected].name}”.`);
}

// -- the drawing pad ------------------------------------------------------------------------------

function setupPad() {
  const pad = $("pad");
  const ctx = pad.getContext("2d");
  clearPad();
  let last = null;
  const point = (e) => {
    const r = pad.getBoundingClientRect();
    return { x: (e.clientX - r.left) * pad.width / r.width, y: (e.clientY - r.top) * pad.height / r.height };
  };
  pad.addEventListener("pointerdown", (e) => {
    pad.setPointerCapture(e.pointerId);
    last = point(e);
    ctx.fillStyle = "#fff";
    ctx.beginPath();
    ctx.arc(last.x, last.y, PAD_STROKE / 2, 0, 2 * Math.PI);
    ctx.fill();
    app.padDirty = true;
  });
  pad.addEventListener("pointermove", (e) => {
    if (!last) return;
    const p = point(e);
    Object.assign(ctx, { strokeStyle: "#fff", lineWidth: PAD_STROKE, lineCap: "round", lineJoin: "round" });
    ctx.beginPath();
    ctx.moveTo(last.x, last.y);
    ctx.lineTo(p.x, p.y);
    ctx.stroke();
    last = p;
  });
  const end = () => { last = null; };
  pad.addEventListener("pointerup", end);
  pad.addEventListener("pointercancel", end);
}

function clearPad() {
  const pad = $("pad");
  const ctx = pad.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, pad.width, pad.height);
  app.padDirty = false;
}

function addDrawing() {
  if (!app.padDirty) { setStatus("Draw something on the pad first.", true); return; }
  const pad = $("pad");
  const copy = Object.assign(document.createElement("canvas"), { width: pad.width, height: pad.height });
  copy.getContext("2d").drawImage(pad, 0, 0);
  addExample(app.selected, { canvas: copy });
  const cls = app.classes[app.selected];
  const held = cls.added % HOLD_OUT_EVERY === 0;
  setStatus(`Added to “${cls.name}”${held ? " (held out, to measure accuracy)" : ""}: ${cls.train.length} to train on, ` +
    `${cls.test.length} held out.`);
  clearPad();
}

// -- measuring ------------------------------------------------------------------------------------

const accuracyKey = () => `${app.trainer.steps}|${app.heldOutVersion}`;

// Accuracy on `set` ([{example, label}]), the model's answer being its best among `classes`.
// Returns null where a training step ran meanwhile (the number would mix two models).
async function evaluate(set, classes, onProgress = () => {}) {
  const steps = app.trainer.steps;
  let correct = 0;
  for (let start = 0; start < set.length; start += EVAL_CHUNK) {
    const rows = set.slice(start, start + EVAL_CHUNK);
    const x = toInput(rows.map((r) => rasterize(r.example)));
    const out = await withModel(() => (app.trainer.steps === steps ? app.trainer.predict(x) : null));
    if (!out) return null;
    const width = out.dims[1];
    rows.forEach((r, i) => {
      const best = classes.reduce((a, k) => (out.data[i * width + k] > out.data[i * width + a] ? k : a), classes[0]);
      if (best === r.label) correct += 1;
    });
    onProgress(start + rows.length);
  }
  return correct / set.length;
}

// Held-out accuracy of the model as it is now (cached until a step or the examples change).
async function measure(when) {
  const set = heldOutSet();
  if (!set.length || !activeClasses().length) { showAccuracy(); return null; }
  const key = accuracyKey();
  if (app.accuracy.key !== key) {
    const value = await evaluate(set, activeClasses(),
      (done) => setStatus(`Measuring held-out accuracy ${when}: ${done} of ${set.length}…`));
    app.accuracy = { key, value };
  }
  api.lastAccuracy = app.accuracy.value;
  return app.accuracy.value;
}

function showAccuracy() {
  const n = heldOutSet().length;
  const el = $("accuracy");
  if (!n) {
    el.textContent = "Held-out accuracy: no held-out examples yet (every 4th example added to a class is held out).";
  } else if (app.before === null && app.after === null) {
    el.textContent = `Held-out accuracy on ${fmt(n)} examples: measured when you train.`;
  } else if (app.after === null) {
    el.innerHTML = `Held-out accuracy on ${fmt(n)} examples: <b>${pct(app.before)}</b> before training.`;
  } else {
    el.innerHTML = `Held-out accuracy on ${fmt(n)} examples: <b>${pct(app.before)}</b> before → ` +
      `<b>${pct(app.after)}</b> after ${fmt(app.afterSteps)} steps.`;
  }
}

// -- training -------------------------------------------------------------------------------------

// A small seeded PRNG (mulberry32): the same run draws the same batches and augmentations.
function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// Indices 0..n-1 in a new random order each epoch.
function sampler(n, rng) {
  let order = [];
  return () => {
    if (!order.length) {
      order = Array.from({ length: n }, (_, i) => i);
      for (let i = n - 1; i > 0; i--) {
        const j = Math.floor(rng() * (i + 1));
        [order[i], order[j]] = [order[j], order[i]];
      }
    }
    return order.pop();
  };
}

// Lets the browser paint (the loss curve, the status) between steps; rAF does not fire in a
// hidden tab, so there a timeout alone keeps training going.
const nextFrame = () => new Promise((resolve) => {
  if (document.hidden) setTimeout(resolve, 0);
  else requestAnimationFrame(() => setTimeout(resolve, 0));
});

function readRunSettings() {
  const steps = Number($("steps").value);
  const lr = Number($("lr").value);
  if (!Number.isInteger(steps) || steps < 1) throw new Error("steps: give a whole number of at least 1");
  if (!Number.isFinite(lr) || lr <= 0) throw new Error("learning rate: give a positive number");
  return { steps, lr };
}

const SAVE_EVERY = 20; // steps between saves to IndexedDB while training (a save takes a few ms)

async function train() {
  if (busy()) return;
  let settings;
  try {
    settings = readRunSettings();
  } catch (err) { showError("Cannot train", err); return; }
  const pool = trainingPool();
  if (activeClasses().length < 2) {
    setStatus("Add examples to at least two classes first (or use the sample digits).", true);
    return;
  }
  api.training = true;
  app.stop = false;
  updateButtons();
  const trainer = app.trainer;
  trainer.lr = settings.lr;
  let done = 0;
  try {
    app.before = await measure("before training");
    app.after = null;
    showAccuracy();
    app.runStarts.push(api.losses.length);
    app.plannedEnd = api.losses.length + settings.steps;
    done = await runSteps(pool, settings.steps);
  } catch (err) {
    showError(`Training stopped at step ${trainer.steps}`, err);
  }
  try {
    if (done > 0) {
      app.after = await measure("after training");
      app.afterSteps = done;
      await trainer.saveState();
      if (!$("status").classList.contains("error")) {
        setStatus(`Trained ${done} steps${app.stop ? " (stopped)" : ""}; saved in this browser, so a reload resumes.`);
      }
    }
  } catch (err) {
    showError("Could not finish the run", err);
  } finally {
    app.plannedEnd = api.losses.length;
    $("top3").replaceChildren(); // said by the model before this run
    api.training = false;
    showAccuracy();
    renderCard();
    drawLoss();
    updateButtons();
  }
}

// `count` steps of batches drawn from `pool`, augmented; returns how many ran.
async function runSteps(pool, count) {
  const trainer = app.trainer;
  const rng = mulberry32(0x5eed + trainer.steps); // a resumed run draws new batches
  const next = sampler(pool.length, rng);
  const B = trainer.batchSize;
  const base = trainer.lr;
  let done = 0;
  let skipped = 0;
  while (done < count && !app.stop) {
    const rows = Array.from({ length: B }, () => pool[next()]);
    const x = toInput(rows.map((r) => rasterize(r.example, rng)));
    const y = BigInt64Array.from(rows, (r) => BigInt(r.label));
    // Cosine decay to zero over the run, as `edgetune finetune` does by default: a run's last
    // steps then settle instead of landing wherever a constant rate leaves them
    // (experiments.web_accuracy: 86-96% over seeds at a constant rate, 93-94% with the decay).
    trainer.lr = base * 0.5 * (1 + Math.cos(Math.PI * done / count));
    const loss = await withModel(async () => {
      const start = performance.now();
      const value = await trainer.step(x, y);
      app.stepTimes.push(performance.now() - start);
      return value;
    });
    if (trainer.lastSkipped) skipped += 1;
    done += 1;
    api.losses.push(loss);
    api.trainedSteps += 1;
    setStatus(`Training: step ${done} of ${count}, loss ${loss.toFixed(3)}` +
      (skipped ? ` (${skipped} steps skipped: not finite; lower the learning rate)` : ""));
    drawLoss();
    renderCard();
    // Saved as it goes: closing the tab mid-run keeps all but the last few steps.
    if (done % SAVE_EVERY === 0) { // saved with the run's rate, not the decayed one
      const decayed = trainer.lr;
      trainer.lr = base;
      await trainer.saveState();
      trainer.lr = decayed;
    }
    await nextFrame();
  }
  trainer.lr = base; // the rate the next run starts from (and the one a saved state keeps)
  return done;
}

// -- trying it --------------------------------------------------------------------------------------

async function predictDrawing() {
  if (!app.padDirty) { setStatus("Draw something on the pad first.", true); return; }
  const x = toInput([rasterize({ canvas: $("pad") })]);
  const out = await withModel(() => app.trainer.predict(x));
  let classes = activeClasses();
  const note = classes.length ? "" : " (no examples yet: over all outputs of the untrained head)";
  if (!classes.length) classes = app.classes.map((_, k) => k);
  const logits = classes.map((k) => out.data[k]);
  const top = Math.max(...logits);
  const exps = logits.map((v) => Math.exp(v - top));
  const total = exps.reduce((a, b) => a + b, 0);
  const ranked = classes.map((k, i) => ({ k, p: exps[i] / total })).sort((a, b) => b.p - a.p).slice(0, 3);
  $("top3").replaceChildren(...ranked.map(({ k, p }) => {
    const li = document.createElement("li");
    li.innerHTML = `<span class="label"></span><span class="bar"><span style="width:${(100 * p).toFixed(1)}%"></span></span>` +
      `<span class="p">${pct(p)}</span>`;
    li.querySelector(".label").textContent = app.classes[k].name;
    return li;
  }));
  setStatus(`The model says “${app.classes[ranked[0].k].name}”${note}.`);
}

// -- the loss curve ---------------------------------------------------------------------------------

function drawLoss() {
  const c = $("loss");
  const dpr = window.devicePixelRatio || 1;
  const w = c.clientWidth, h = c.clientHeight;
  if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
    c.width = Math.round(w * dpr);
    c.height = Math.round(h * dpr);
  }
  const ctx = c.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.font = "12px system-ui, sans-serif";
  ctx.fillStyle = "#666";
  const losses = api.losses;
  if (!losses.length) {
    ctx.fillText("The training loss appears here, step by step.", 12, h / 2);
    return;
  }
  const m = { left: 58, right: 12, top: 10, bottom: 26 };
  const pw = w - m.left - m.right, ph = h - m.top - m.bottom;
  const xmax = Math.max(app.plannedEnd, losses.length, 2);
  const ymax = niceCeil(Math.max(...losses.filter(Number.isFinite), 1e-6));
  const X = (i) => m.left + (i / (xmax - 1)) * pw;
  const Y = (v) => m.top + ph - (Math.min(v, ymax) / ymax) * ph;
  axes(ctx, m, pw, ph, xmax, ymax);
  ctx.strokeStyle = "#bbb";
  ctx.setLineDash([4, 4]);
  for (const s of app.runStarts.slice(1)) line(ctx, [[X(s), m.top], [X(s), m.top + ph]]);
  ctx.setLineDash([]);
  ctx.lineWidth = 1;
  ctx.strokeStyle = "#9ec5ee";
  line(ctx, losses.map((v, i) => [X(i), Y(v)]));
  ctx.lineWidth = 2; // the trend: the mean of the last few steps, since batches of 8 are noisy
  ctx.strokeStyle = "#1565c0";
  line(ctx, losses.map((_, i) => [X(i), Y(mean(losses.slice(Math.max(0, i - 5), i + 1)))]));
  ctx.lineWidth = 1;
}

function axes(ctx, m, pw, ph, xmax, ymax) {
  ctx.strokeStyle = "#888";
  line(ctx, [[m.left, m.top], [m.left, m.top + ph], [m.left + pw, m.top + ph]]);
  ctx.fillStyle = "#555";
  ctx.textAlign = "right";
  for (const v of [0, ymax / 2, ymax]) ctx.fillText(String(+v.toPrecision(3)), m.left - 6, m.top + ph - (v / ymax) * ph + 4);
  ctx.textAlign = "center";
  ctx.fillText("1", m.left, m.top + ph + 16);
  ctx.fillText(String(xmax), m.left + pw, m.top + ph + 16);
  ctx.fillText("step", m.left + pw / 2, m.top + ph + 16);
  ctx.save();
  ctx.translate(12, m.top + ph / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.fillText("loss", 0, 0);
  ctx.restore();
  ctx.textAlign = "left";
}

function line(ctx, points) {
  ctx.beginPath();
  points.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
  ctx.stroke();
}

const mean = (a) => a.reduce((x, y) => x + y, 0) / a.length;

function niceCeil(v) {
  const p = 10 ** Math.floor(Math.log10(v));
  return [1, 2, 2.5, 5, 10].map((f) => f * p).find((n) => n >= v);
}

// -- the model card ---------------------------------------------------------------------------------

function renderCard() {
  const { demo, trainer } = app;
  const times = [...app.stepTimes].sort((a, b) => a - b);
  const median = times.length ? times[Math.floor((times.length - 1) / 2)] : null;
  const rows = [
    ["Model", demo.model],
    ["What trains", `scheme ${demo.scheme}: ${fmt(demo.trainable_params)} of ${fmt(demo.total_params)} parameters`],
    ["Training memory", `${(demo.predicted_peak_bytes / 1e6).toFixed(1)} MB (edgetune's prediction for one step)`],
    ["Input", `${app.size}×${app.size} grey, batches of ${trainer.batchSize}`],
    ["Runs on", `${trainer.device === "webgpu" ? "WebGPU" : "WebAssembly"}, ${trainer.threads} thread${trainer.threads > 1 ? "s" : ""}`],
    ["Step time", median === null ? "measured when you train" : `${median.toFixed(0)} ms (median of ${times.length} steps)`],
    ["Steps done", `${fmt(trainer.steps)}` + (app.resumedSteps ? ` (${fmt(app.resumedSteps)} resumed from this browser)` : "")],
  ];
  $("card").replaceChildren(...rows.flatMap(([k, v]) => [
    Object.assign(document.createElement("dt"), { textContent: k }),
    Object.assign(document.createElement("dd"), { textContent: v }),
  ]));
}

// -- buttons ----------------------------------------------------------------------------------------

const busy = () => api.training || app.measuring;

// Runs `fn` with the page's buttons off, its errors said in the status line.
async function runExclusive(fn) {
  app.measuring = true;
  updateButtons();
  try {
    await fn();
  } catch (err) {
    showError("Error", err);
  } finally {
    app.measuring = false;
    showAccuracy();
    updateButtons();
  }
}

function updateButtons() {
  const off = busy();
  for (const id of ["add", "files", "train", "download", "reset"]) $(id).disabled = off;
  $("use-samples").disabled = off || !app.demo.samples;
  $("stop").disabled = !api.training;
  $("predict").disabled = !app.trainer;
  for (const b of document.querySelectorAll("#classes button")) b.disabled = off;
}

function setupButtons() {
  $("clear").addEventListener("click", clearPad);
  $("add").addEventListener("click", addDrawing);
  $("files").addEventListener("change", async (e) => {
    await addFiles([...e.target.files]);
    e.target.value = ""; // the same file may be picked again
  });
  $("use-samples").addEventListener("click", useSamples);
  $("train").addEventListener("click", train);
  $("stop").addEventListener("click", () => { app.stop = true; });
  $("predict").addEventListener("click", () => predictDrawing().catch((err) => showError("Could not predict", err)));
  $("download").addEventListener("click", () => {
    app.trainer.downloadWeights(WEIGHTS_FILE);
    setStatus(`Downloaded ${WEIGHTS_FILE}: the weights after ${fmt(app.trainer.steps)} steps.`);
  });
  $("reset").addEventListener("click", () => runExclusive(async () => {
    await app.trainer.clearState();
    location.reload();
  }));
  window.addEventListener("resize", drawLoss);
}

const fmt = (n) => Number(n).toLocaleString("en-US");
const pct = (v) => `${(100 * v).toFixed(1)}%`;

main();
