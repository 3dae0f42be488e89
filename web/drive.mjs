// Drives an exported edgetune page in headless Chromium (Debian's /usr/bin/chromium, through
// playwright-core) for the browser tests and benchmarks. Python serves the folder and checks
// what this writes; this script only runs the page and reports.
//
//   node web/drive.mjs check URL OUT [--steps 20] [--keep 5,10]   train on the test batch, save, reload, resume
//   node web/drive.mjs bench URL OUT [--steps 20] [--warmup 3] [--threads N]   time steps, read the tab's memory
//   node web/drive.mjs fit   URL OUT [--epochs 5] [--seed 0] [--lr 0.01] [--order FILE] [--schedule cosine]
//                                                   fine-tune on the packaged digits
//   node web/drive.mjs gpu   URL OUT [--steps 2]      steps with onnxruntime-web's WebGPU provider (SwiftShader)
//   node web/drive.mjs demo  URL OUT                 click through the demo page as a user would (sample digits)
//   node web/drive.mjs draw  URL OUT                 draw two symbols on the pad, train, ask for a prediction
//
// The batch comes from URL/test/batch.json (+ the .bin files it names), written by the test.
// OUT gets results.json, the downloaded state, screenshots; the browser's console goes into
// results.json and, on a failure, to stderr.
import { chromium } from "playwright-core";
import { mkdirSync, readFileSync, writeFileSync, readdirSync } from "node:fs";
import { join } from "node:path";

const [mode, url, out, ...rest] = process.argv.slice(2);
const option = (name, fallback) => {
  const at = rest.indexOf(`--${name}`);
  return at >= 0 ? rest[at + 1] : fallback;
};
const steps = Number(option("steps", 20));
const threads = Number(option("threads", 0)) || undefined;
const warmup = Number(option("warmup", 3));
mkdirSync(out, { recursive: true });

// The flags a closed network needs: without them Chromium keeps trying to reach Google's hosts.
// WebGPU (mode gpu) runs on SwiftShader, Chromium's software Vulkan: no GPU is needed.
const gpu = ["--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader", "--enable-features=Vulkan",
  "--use-vulkan=swiftshader", "--use-angle=swiftshader"];
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", ...(mode === "gpu" ? gpu : ["--disable-gpu"])],
});
const consoleLines = [];
const results = { mode, console: consoleLines };
let failed = false;
try {
  const context = await browser.newContext({ acceptDownloads: true, viewport: { width: 1100, height: 900 } });
  const page = await context.newPage();
  page.on("console", (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => consoleLines.push(`pageerror: ${e.stack || e}`));
  page.setDefaultTimeout(300_000);
  await page.addInitScript(defineTestBatch);
  await openPage(page, url + (threads ? `?threads=${threads}` : ""));
  if (mode === "check") await check(page);
  else if (mode === "bench") await bench(page);
  else if (mode === "fit") Object.assign(results, await page.evaluate(fitSamples, {
    epochs: Number(option("epochs", 5)), seed: Number(option("seed", 0)), lr: Number(option("lr", 0)) || undefined,
    order: option("order", null), cosine: option("schedule", "constant") === "cosine",
  }));
  else if (mode === "gpu") Object.assign(results, await page.evaluate(stepOnWebGpu, steps));
  else if (mode === "demo") await demo(page);
  else if (mode === "draw") await draw(page);
  else throw new Error(`unknown mode ${mode}: check, bench, fit, gpu, demo or draw`);
} catch (err) {
  failed = true;
  results.error = String(err.stack || err);
} finally {
  writeFileSync(join(out, "results.json"), JSON.stringify(results, null, 1));
  if (failed) process.stderr.write(`${results.error}\n--- browser console ---\n${consoleLines.join("\n")}\n`);
  await browser.close();
}
process.exit(failed ? 1 : 0);

// window.edgetuneTestBatch(): the test's batch, from test/batch.json ({arrays: [{file, dtype,
// shape, kind}], lr}) and the raw files it names: {batch} in step()'s order, {inputs} (the
// model's inputs, for predict()), rows, lr.
function defineTestBatch() {
  const types = { float32: Float32Array, int64: BigInt64Array, uint8: Uint8Array };
  window.edgetuneTestBatch = async () => {
    const spec = await (await fetch("test/batch.json")).json();
    const read = async ({ file, dtype }) => new types[dtype](await (await fetch(`test/${file}`)).arrayBuffer());
    const batch = await Promise.all(spec.arrays.map(read));
    const inputs = batch.filter((_, k) => spec.arrays[k].kind === "input");
    return { batch, inputs, rows: spec.arrays[0].shape[0], lr: spec.lr };
  };
}

async function openPage(page, address) {
  await page.goto(address);
  await page.waitForFunction(() => window.edgetune && (window.edgetune.trainer || window.edgetune.error));
  const error = await page.evaluate(() => window.edgetune.error);
  if (error) throw new Error(`the page could not load its model: ${error}`);
}

// Steps on the test's batch, keeping the state after some steps (for Python to step from), predicts,
// saves the state in IndexedDB; then a reload must resume.
async function check(page) {
  const keep = option("keep", "").split(",").filter(Boolean).map(Number);
  Object.assign(results, await page.evaluate(trainOnTestBatch, { steps, keep }));
  for (const [step, state] of Object.entries(results.states)) {
    writeFileSync(join(out, `state-${step}.safetensors`), Buffer.from(state, "base64"));
  }
  delete results.states;
  await page.screenshot({ path: join(out, "after-training.png"), fullPage: true });
  await page.reload();
  await openPage(page, page.url());
  results.afterReload = await page.evaluate(async () => {
    const { trainer, resumed } = window.edgetune;
    const { inputs, rows } = await window.edgetuneTestBatch();
    return { resumed, steps: trainer.steps, logits: Array.from((await trainer.predict(...inputs)).data), rows };
  });
}

async function trainOnTestBatch({ steps, keep }) {
  const { trainer } = window.edgetune;
  const { batch, inputs, lr } = await window.edgetuneTestBatch();
  if (lr !== undefined) trainer.lr = lr;
  const base64 = (bytes) => {
    let binary = "";
    for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
    return btoa(binary);
  };
  const losses = [];
  const states = {};
  for (let s = 1; s <= steps; s++) {
    losses.push(await trainer.step(...batch));
    if (keep.includes(s) || s === steps) states[s] = base64(trainer.stateBytes());
  }
  const logits = Array.from((await trainer.predict(...inputs)).data);
  await trainer.saveState();
  return { losses, logits, states, device: trainer.device, threads: trainer.threads, steps: trainer.steps };
}

// The page's model loaded again with device "webgpu", stepped on the test batch.
async function stepOnWebGpu(steps) {
  const { Trainer } = await import("./edgetune-web.js");
  const trainer = await Trainer.load("./model/", { device: "webgpu" });
  const { batch, lr } = await window.edgetuneTestBatch();
  if (lr !== undefined) trainer.lr = lr;
  const losses = [];
  for (let s = 0; s < steps; s++) losses.push(await trainer.step(...batch));
  return { device: trainer.device, losses };
}

// Per-step times after warm-up steps, and the tab's memory (its renderer's resident set).
async function bench(page) {
  Object.assign(results, await page.evaluate(async ({ steps, warmup }) => {
    const { trainer } = window.edgetune;
    const { batch } = await window.edgetuneTestBatch();
    const warmupMs = [];
    for (let s = 0; s < warmup; s++) {
      const start = performance.now();
      await trainer.step(...batch);
      warmupMs.push(performance.now() - start);
    }
    const times = [];
    for (let s = 0; s < steps; s++) {
      const start = performance.now();
      await trainer.step(...batch);
      times.push(performance.now() - start);
    }
    return { times_ms: times, warmup_ms: warmupMs, device: trainer.device, threads: trainer.threads,
      isolated: crossOriginIsolated };
  }, { steps, warmup }));
  results.renderers = renderersMemory(process.pid); // Chromium runs as this process's child
}

// The renderer processes under the browser's: [{pid, rss_kb, hwm_kb}] from /proc.
function renderersMemory(root) {
  const children = new Map();
  for (const pid of readdirSync("/proc").filter((p) => /^\d+$/.test(p))) {
    try {
      const ppid = Number(readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1].split(" ")[1]);
      children.set(Number(pid), ppid);
    } catch { /* exited */ }
  }
  const under = (pid) => { for (let p = pid; p > 1; p = children.get(p) || 0) if (p === root) return true; return false; };
  const found = [];
  for (const pid of children.keys()) {
    if (pid === root || !under(pid)) continue;
    try {
      const cmd = readFileSync(`/proc/${pid}/cmdline`, "utf8");
      if (!cmd.includes("--type=renderer")) continue;
      const status = readFileSync(`/proc/${pid}/status`, "utf8");
      const kb = (key) => Number((status.match(new RegExp(`${key}:\\s+(\\d+)`)) || [0, 0])[1]);
      found.push({ pid, rss_kb: kb("VmRSS"), hwm_kb: kb("VmHWM") });
    } catch { /* exited */ }
  }
  return found;
}

// Fine-tunes on the demo's packaged training digits (no augmentation, each epoch in a seeded
// shuffled order, the last partial batch dropped, as \`edgetune finetune\` does), with the held-out
// digits' accuracy before and after: the browser's half of experiments.web_accuracy. \`order\`: a
// file of the site with the batches to take instead (lists of sample indices), e.g. finetune's.
// \`cosine\`: the rate decays as edgetune.apps.finetune.learning_rate's cosine schedule does.
async function fitSamples({ epochs, seed, lr, order, cosine }) {
  const { trainer } = window.edgetune;
  const demo = trainer.manifest.web.demo;
  const s = demo.samples;
  const images = new Uint8Array(await (await fetch(s.file)).arrayBuffer());
  const pixels = s.size * s.size;
  const inputs = (indices) => {
    const x = new Float32Array(indices.length * 3 * pixels);
    indices.forEach((image, row) => {
      for (let c = 0; c < 3; c++) {
        const at = (row * 3 + c) * pixels;
        for (let p = 0; p < pixels; p++) x[at + p] = (images[image * pixels + p] / 255 - demo.mean[c]) / demo.std[c];
      }
    });
    return x;
  };
  const accuracy = async () => {
    const { data, dims } = await trainer.predict(inputs(s.test));
    let right = 0;
    s.test.forEach((image, row) => {
      const logits = data.subarray(row * dims[1], (row + 1) * dims[1]);
      if (logits.indexOf(Math.max(...logits)) === s.labels[image]) right += 1;
    });
    return right / s.test.length;
  };
  if (lr) trainer.lr = lr;
  const before = await accuracy();
  let state = seed + 0x9e3779b9;
  const random = () => { // mulberry32: a seeded generator, so a run can be repeated
    state = (state + 0x6d2b79f5) >>> 0;
    let t = Math.imul(state ^ (state >>> 15), 1 | state);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const losses = [];
  const started = performance.now();
  const b = trainer.batchSize;
  const batches = order ? await (await fetch(order)).json() : [];
  for (let epoch = 0; epoch < epochs && !order; epoch++) {
    const shuffled = [...s.train];
    for (let i = shuffled.length - 1; i > 0; i--) {
      const j = Math.floor(random() * (i + 1));
      [shuffled[i], shuffled[j]] = [shuffled[j], shuffled[i]];
    }
    for (let at = 0; at + b <= shuffled.length; at += b) batches.push(shuffled.slice(at, at + b));
  }
  const base = trainer.lr;
  for (const [step, batch] of batches.entries()) {
    if (cosine) trainer.lr = base * 0.5 * (1 + Math.cos(Math.PI * Math.min(step / Math.max(1, batches.length), 1)));
    losses.push(await trainer.step(inputs(batch), batch.map((i) => s.labels[i])));
  }
  const seconds = (performance.now() - started) / 1000;
  return { before, after: await accuracy(), losses, seconds, steps: losses.length, lr: trainer.lr,
    train: s.train.length, test: s.test.length, threads: trainer.threads };
}

// A user's path through the demo page: the sample data, train, the accuracy after, download.
async function demo(page) {
  await page.click("#use-samples");
  await page.waitForFunction(() => window.edgetune.lastAccuracy !== null); // measured on the held-out digits
  results.before = await page.evaluate(() => window.edgetune.lastAccuracy ?? null);
  await page.click("#train");
  await page.waitForFunction(() => window.edgetune.training === false && window.edgetune.trainedSteps > 0);
  Object.assign(results, await page.evaluate(() => ({
    after: window.edgetune.lastAccuracy, steps: window.edgetune.trainedSteps, losses: window.edgetune.losses,
  })));
  const download = page.waitForEvent("download");
  await page.click("#download");
  await (await download).saveAs(join(out, "downloaded.safetensors"));
  await page.screenshot({ path: join(out, "demo.png"), fullPage: true });
}

// A user's path with their own drawings: two classes renamed "O" and "X", four drawings of
// each (the fourth is held out), 10 steps, then the pad's new drawing classified.
async function draw(page) {
  const pad = await page.locator("#pad").boundingBox();
  const stroke = async (points) => {
    await page.mouse.move(pad.x + points[0][0] * pad.width, pad.y + points[0][1] * pad.height);
    await page.mouse.down();
    for (const [x, y] of points.slice(1)) await page.mouse.move(pad.x + x * pad.width, pad.y + y * pad.height, { steps: 3 });
    await page.mouse.up();
  };
  const circle = (r, jitter) => Array.from({ length: 25 }, (_, i) =>
    [0.5 + jitter + r * Math.cos((i / 24) * 2 * Math.PI), 0.5 - jitter + r * Math.sin((i / 24) * 2 * Math.PI)]);
  const cross = async (j) => {
    await stroke([[0.25 + j, 0.25], [0.75 + j, 0.75]]);
    await stroke([[0.75 + j, 0.25], [0.25 + j, 0.75]]);
  };
  const rows = page.locator("#classes tbody tr");
  for (const [k, name] of [[0, "O"], [1, "X"]]) {
    await rows.nth(k).locator("input.name").fill(name);
    await rows.nth(k).locator("input[type=radio]").check();
    for (let i = 0; i < 4; i++) {
      await page.click("#clear");
      if (name === "O") await stroke(circle(0.25 + 0.03 * i, 0.02 * (i - 2)));
      else await cross(0.02 * (i - 2));
      await page.click("#add");
    }
  }
  await page.fill("#steps", "10");
  await page.click("#train");
  await page.waitForFunction(() => window.edgetune.training === false && window.edgetune.trainedSteps > 0);
  await page.click("#clear");
  await stroke(circle(0.3, 0));
  await page.click("#predict");
  await page.waitForFunction(() => document.querySelectorAll("#top3 li").length > 0);
  Object.assign(results, await page.evaluate(() => ({
    steps: window.edgetune.trainedSteps, losses: window.edgetune.losses, after: window.edgetune.lastAccuracy,
    top3: Array.from(document.querySelectorAll("#top3 li"), (li) => li.textContent),
    status: document.querySelector("#status").textContent,
  })));
  await page.screenshot({ path: join(out, "draw.png"), fullPage: true });
}
