// edgetune-web.js: fine-tunes a model inside a web page. It steps the training graph that
// `edgetune export --web` wrote (forward, sparse backward and update as one plain ONNX graph)
// with onnxruntime-web, the way edgetune.runtime.StepRunner does in Python, and keeps what the
// step carries (trained tensors, optimizer state) in the page. Nothing leaves the page.
//
//   import { Trainer } from "./edgetune-web.js";
//   const trainer = await Trainer.load("./model/");      // WASM; {device: "webgpu"} where offered
//   await trainer.restoreState();                         // resume from IndexedDB, if saved
//   const loss = await trainer.step(images, labels);      // Float32Array [B,...], integer labels
//   trainer.lr = 0.005;
//   const {data, dims} = await trainer.predict(images);   // any number of rows
//   await trainer.saveState();                            // IndexedDB: a reload resumes
//   trainer.downloadWeights();                            // safetensors that StepRunner.load reads

// onnxruntime-web's WASM-only build, and its build with the JS WebGPU provider (WASM for the
// ops WebGPU lacks). Its other WebGPU build (ort.webgpu.min.mjs, 1.31.1) cannot create a session
// for a training step: it leaves the optimizer's Cast nodes without a provider.
const ORT_BUILDS = { wasm: "./ort/ort.wasm.min.mjs", webgpu: "./ort/ort.min.mjs" };
const DB_NAME = "edgetune";
const DB_STORE = "states";

export class TrainerError extends Error {}

export class Trainer {
  // The exported folder at `url` (manifest.json, step.onnx, state.safetensors, ...).
  // device: "wasm" (default) or "webgpu" (falls back to WASM where the browser has no WebGPU).
  // threads: WASM threads; default: up to 4 where the page is cross-origin isolated, else 1.
  static async load(url, { device = "wasm", threads } = {}) {
    const base = new URL(url.endsWith("/") ? url : url + "/", location.href);
    const manifest = await fetchJson(new URL("manifest.json", base));
    const useGpu = device === "webgpu" && await hasWebGpu();
    const ort = await import(new URL(ORT_BUILDS[useGpu ? "webgpu" : "wasm"], import.meta.url).href);
    ort.env.wasm.wasmPaths = new URL("./ort/", import.meta.url).href;
    ort.env.wasm.numThreads = threads ?? (globalThis.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1);
    const web = manifest.web;
    if (!web) throw new TrainerError(`${base} was not exported for the web: export it with \`edgetune export --web\``);
    const options = { executionProviders: useGpu ? ["webgpu", "wasm"] : ["wasm"], graphOptimizationLevel: "all" };
    const dataFiles = await fetchDataFiles(base, web.external_data);
    const step = await createSession(ort, base, manifest.model, dataFiles, web.external_data, options);
    const state = manifest.state ? readSafetensors(await fetchBytes(new URL(manifest.state, base))).tensors : {};
    const trainer = new Trainer(ort, base, manifest, step, state, { dataFiles, options });
    trainer.device = useGpu ? "webgpu" : "wasm";
    // without cross-origin isolation onnxruntime-web runs one thread, whatever was asked
    trainer.threads = globalThis.crossOriginIsolated ? ort.env.wasm.numThreads : 1;
    return trainer;
  }

  constructor(ort, base, manifest, session, state, sessionArgs) {
    this.ort = ort;
    this.base = base;
    this.manifest = manifest;
    this.session = session;
    this._sessionArgs = sessionArgs;
    this._predictSession = null;
    this._queue = Promise.resolve(); // one session run at a time: a step never sees a half-updated state
    const inputs = manifest.inputs;
    // The batch as step() takes it: the model's inputs, then the targets (by their position).
    this.batchInputs = inputs.filter((i) => i.kind === "input" || i.kind === "target").sort((a, b) => a.key - b.key);
    const carriedNames = new Set(Object.values(manifest.next_step));
    this.carried = Object.fromEntries(inputs.filter((i) => carriedNames.has(i.name)).map((i) => [i.name, i]));
    this.lr = Number(manifest.optimizer.lr);
    this.steps = Number(manifest.steps_done || 0);
    this.lastSkipped = 0;
    this._values = {};
    for (const [name, spec] of Object.entries(this.carried)) {
      const t = state[name];
      if (!t) throw new TrainerError(`${manifest.state} lacks ${name}: export the folder again`);
      checkTensor(name, t, spec);
      this._values[name] = new ort.Tensor(t.dtype, t.data, t.dims);
    }
  }

  // The batch size and input shapes the graph was exported for.
  get batchSize() { return this.batchInputs[0].shape[0]; }

  // One training step on (inputs..., targets...), each a typed array or plain array of the
  // exported shape (flat, row-major); returns the loss. With on_nonfinite "raise", a step whose
  // loss or a gradient is not finite throws and keeps the previous state; with "skip" it keeps
  // the previous state and sets lastSkipped.
  step(...batch) {
    return this._exclusive(() => this._step(batch));
  }

  async _step(batch) {
    const feeds = this._batchFeeds(batch, this.batchInputs, "step() takes inputs, then targets");
    refuseBadValues(this.batchInputs.map((spec) => feeds[spec.name].data), this.batchInputs,
      this.manifest.on_nonfinite !== "apply");
    feeds.lr = new this.ort.Tensor("float64", Float64Array.of(this.lr), []);
    for (const [name, value] of Object.entries(this._hyper(this.steps + 1))) {
      feeds[name] = new this.ort.Tensor("int64", BigInt64Array.of(BigInt(value)), []);
    }
    Object.assign(feeds, this._values);
    const out = await this.session.run(feeds);
    const skipped = Number(out.skipped.data[0]);
    if (skipped && this.manifest.on_nonfinite === "raise") {
      throw new TrainerError(`step ${this.steps + 1}: the loss or a gradient is NaN or infinite; nothing was updated ` +
        "(lower the learning rate, or check the batch)");
    }
    for (const [output, carried] of Object.entries(this.manifest.next_step)) this._values[carried] = out[output];
    this.steps += 1;
    this.lastSkipped = skipped;
    return Number(out.loss.data[0]);
  }

  // The step's integer inputs: its count, or a MeZO step's seeds (as edgetune.runtime.seeds).
  _hyper(step) {
    const opt = this.manifest.optimizer;
    if (opt.name !== "MeZO") return { step };
    const seeds = seedsFor(step, opt.seed, opt.directions, opt.seeds);
    return Object.fromEntries(seeds.map((s, d) => [`zo_seed${d}`, s]));
  }

  // The model's output in eval mode, with the weights as trained so far, for `rows` rows of
  // inputs (each input flat, row-major). Rows go through in batches of the export's size, the
  // last one padded with copies of its last row. Returns {data, dims}.
  predict(...inputs) {
    return this._exclusive(() => this._predict(inputs));
  }

  async _predict(inputs) {
    const spec = this.manifest.predict;
    if (!spec) throw new TrainerError("this export has no inference graph: export it again with this edgetune");
    if (!this._predictSession) {
      const { dataFiles, options } = this._sessionArgs;
      this._predictSession = await createSession(this.ort, this.base, spec.model, dataFiles,
        this.manifest.web.external_data, options);
    }
    const batch = spec.inputs.filter((i) => i.kind === "input");
    if (inputs.length !== batch.length) throw new TrainerError(`predict() takes ${batch.length} arrays, got ${inputs.length}`);
    const size = batch[0].shape[0];
    const rowLength = batch.map((i) => i.shape.slice(1).reduce((a, b) => a * b, 1));
    const rows = inputs[0].length / rowLength[0];
    inputs.forEach((a, k) => {
      if (a.length !== rows * rowLength[k] || !Number.isInteger(rows) || rows < 1) {
        throw new TrainerError(`${batch[k].name}: ${a.length} values are not a whole number of rows of ` +
          `[${batch[k].shape.slice(1)}]`);
      }
    });
    const outRow = spec.output.shape.slice(1).reduce((a, b) => a * b, 1);
    const result = new Float32Array(rows * outRow);
    for (let start = 0; start < rows; start += size) {
      const n = Math.min(size, rows - start);
      const feeds = {};
      batch.forEach((i, k) => {
        const chunk = padRows(inputs[k], start, n, size, rowLength[k]);
        feeds[i.name] = makeTensor(this.ort, i, chunk);
      });
      for (const i of spec.inputs) if (i.carried_as) feeds[i.name] = this._values[i.carried_as];
      const out = await this._predictSession.run(feeds);
      result.set(out[spec.output.name].data.subarray(0, n * outRow), start * outRow);
    }
    return { data: result, dims: [rows, ...spec.output.shape.slice(1)] };
  }

  // Runs `fn` after every call queued before it (steps and predictions interleaved by a page's
  // event handlers would otherwise read the carried state while a step replaces it).
  _exclusive(fn) {
    const run = this._queue.then(fn);
    this._queue = run.catch(() => {});
    return run;
  }

  _batchFeeds(batch, specs, what) {
    if (batch.length !== specs.length) {
      throw new TrainerError(`${what}: ${specs.length} arrays (${specs.map((i) => i.name)}), got ${batch.length}`);
    }
    return Object.fromEntries(specs.map((spec, k) => [spec.name, makeTensor(this.ort, spec, batch[k])]));
  }

  // -- state ----------------------------------------------------------------------------------

  // The carried tensors by their model names ("head.weight", "head.weight:momentum_buffer"), as
  // {dtype, dims, data}. A partially trained weight is its trained channels only (the
  // manifest input's "part" says which).
  state() {
    return Object.fromEntries(Object.entries(this._values).map(([name, t]) =>
      [this.carried[name].key, { dtype: t.type, dims: t.dims, data: t.data }]));
  }

  // The state as one safetensors file, in the format edgetune.runtime.StepRunner.save writes
  // (tensors by model name; steps, lr and model in the metadata): StepRunner.load reads it.
  stateBytes() {
    return writeSafetensors(this.state(), { steps: String(this.steps), lr: String(this.lr), model: this.manifest.model });
  }

  // Offers the state as a file download (safetensors; see stateBytes).
  downloadWeights(filename = "edgetune-weights.safetensors") {
    const url = URL.createObjectURL(new Blob([this.stateBytes()], { type: "application/octet-stream" }));
    const a = Object.assign(document.createElement("a"), { href: url, download: filename });
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  // Saves the state in the browser's IndexedDB (one transaction: a saved state is whole or not
  // there), under this export's fingerprint, so that restoreState() after a reload resumes.
  async saveState(name = "default") {
    const record = { steps: this.steps, lr: this.lr, tensors: this.state() };
    await idb("readwrite", (store) => store.put(record, this._stateKey(name)));
  }

  // Restores what saveState() saved for this export; returns false where nothing was saved.
  async restoreState(name = "default") {
    const record = await idb("readonly", (store) => store.get(this._stateKey(name)));
    if (!record) return false;
    const values = {};
    for (const [key, t] of Object.entries(record.tensors)) {
      const name_ = Object.keys(this.carried).find((n) => this.carried[n].key === key);
      if (!name_) throw new TrainerError(`the saved state holds ${key}, which this step does not carry`);
      checkTensor(key, t, this.carried[name_]);
      values[name_] = new this.ort.Tensor(t.dtype, t.data, t.dims);
    }
    const missing = Object.keys(this.carried).filter((n) => !(n in values));
    if (missing.length) throw new TrainerError(`the saved state lacks ${missing.slice(0, 3)}: clearState() and train again`);
    this._values = values;
    this.steps = record.steps;
    this.lr = record.lr;
    return true;
  }

  // Forgets the saved state (the next reload starts from the export's state).
  async clearState(name = "default") {
    await idb("readwrite", (store) => store.delete(this._stateKey(name)));
  }

  _stateKey(name) { return `${this.manifest.web.fingerprint}/${name}`; }
}

// -- loading ------------------------------------------------------------------------------------

// navigator.gpu can be there without an adapter behind it (no GPU, or one the browser blocks).
async function hasWebGpu() {
  try {
    return Boolean(globalThis.navigator?.gpu && await navigator.gpu.requestAdapter());
  } catch {
    return false;
  }
}

async function fetchBytes(url) {
  const response = await fetch(url);
  if (!response.ok) throw new TrainerError(`${url}: ${response.status} ${response.statusText}`);
  return new Uint8Array(await response.arrayBuffer());
}

async function fetchJson(url) {
  const response = await fetch(url);
  if (!response.ok) throw new TrainerError(`${url}: ${response.status} ${response.statusText}: give the folder that ` +
    "`edgetune export --web` wrote");
  return response.json();
}

// Each external data file once, shared by the step and the inference graph.
async function fetchDataFiles(base, externalData) {
  const names = new Set(Object.values(externalData).flat());
  const entries = await Promise.all([...names].map(async (n) => [n, await fetchBytes(new URL(n, base))]));
  return Object.fromEntries(entries);
}

async function createSession(ort, base, model, dataFiles, externalData, options) {
  const bytes = await fetchBytes(new URL(model, base));
  const externals = (externalData[model] || []).map((path) => ({ path, data: dataFiles[path] }));
  return ort.InferenceSession.create(bytes, { ...options, externalData: externals });
}

// -- tensors ------------------------------------------------------------------------------------

const ARRAYS = {
  float32: Float32Array, float64: Float64Array, int64: BigInt64Array, int32: Int32Array,
  int8: Int8Array, uint8: Uint8Array, bool: Uint8Array, float16: Uint16Array,
};

function makeTensor(ort, spec, array) {
  const count = spec.shape.reduce((a, b) => a * b, 1);
  if (array instanceof ort.Tensor) array = array.data;
  if (!array || array.length !== count) {
    throw new TrainerError(`${spec.name} takes ${count} values ([${spec.shape}]), got ${array ? array.length : array}: ` +
      "export again with an example batch of this shape");
  }
  const Type = ARRAYS[spec.dtype];
  let data = array;
  if (!(array instanceof Type)) {
    data = spec.dtype === "int64" ? BigInt64Array.from(array, (v) => BigInt(v)) : Type.from(array);
  }
  return new ort.Tensor(spec.dtype, data, spec.shape);
}

// Refuses a batch before the session runs, as the Python runner and the Trainer do: an index
// outside the table it indexes (ONNX's Gather takes -1 as the last row), and, where `finite`, a
// NaN or infinite value in a float array (the step's guard would skip its updates and still
// count the step). `arrays`: the batch's flat data, in the order of `specs`.
export function refuseBadValues(arrays, specs, finite) {
  specs.forEach((spec, position) => {
    const data = arrays[position];
    const what = `array ${position} (${spec.kind} ${spec.name})`;
    for (const table of spec.indexes || []) {
      const ignored = new Set(table.ignored.map(Number));
      for (let k = 0; k < data.length; k++) {
        const v = Number(data[k]);
        if ((v < 0 || v >= table.size) && !ignored.has(v)) {
          const also = table.ignored.map((i) => ` or ${i} (ignored)`).join("");
          throw new TrainerError(`${what} holds ${v} at flat position ${k}, out of range for ${table.table}: ` +
            `values must be in [0, ${table.size})${also}; nothing was run`);
        }
      }
    }
    if (finite && spec.dtype.startsWith("float") && spec.dtype !== "float16") {
      for (let k = 0; k < data.length; k++) {
        // an attention mask holds -inf where a query may not look
        if (!Number.isFinite(data[k]) && !(spec.attention_mask && data[k] === -Infinity)) {
          throw new TrainerError(`${what} has a NaN or infinite value at flat position ${k}; nothing was run: ` +
            "clean the batch (a step exported with on_nonfinite 'apply' lets it through)");
        }
      }
    }
  });
}

function checkTensor(name, t, spec) {
  if (t.dtype !== spec.dtype || String(t.dims) !== String(spec.shape)) {
    throw new TrainerError(`${name} is ${t.dtype}[${t.dims}], the step takes ${spec.dtype}[${spec.shape}]`);
  }
}

function padRows(array, start, n, size, rowLength) {
  const chunk = array.subarray ? array.subarray(start * rowLength, (start + n) * rowLength)
    : array.slice(start * rowLength, (start + n) * rowLength);
  if (n === size) return chunk;
  const padded = new chunk.constructor(size * rowLength);
  padded.set(chunk);
  const last = chunk.slice((n - 1) * rowLength, n * rowLength);
  for (let r = n; r < size; r++) padded.set(last, r * rowLength);
  return padded;
}

// -- safetensors: an 8-byte header length, a JSON header, then raw little-endian tensors --------

const ST_DTYPES = { float32: "F32", float64: "F64", int64: "I64", int32: "I32", int8: "I8", uint8: "U8", bool: "BOOL", float16: "F16" };
const ST_NAMES = Object.fromEntries(Object.entries(ST_DTYPES).map(([k, v]) => [v, k]));

export function readSafetensors(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerLength = Number(view.getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + headerLength)));
  const tensors = {};
  for (const [key, info] of Object.entries(header)) {
    if (key === "__metadata__") continue;
    const dtype = ST_NAMES[info.dtype];
    if (!dtype) throw new TrainerError(`safetensors dtype ${info.dtype} of ${key} is not supported here`);
    const [begin, end] = info.data_offsets;
    const raw = bytes.slice(8 + headerLength + begin, 8 + headerLength + end); // a copy: aligned
    tensors[key] = { dtype, dims: info.shape, data: new ARRAYS[dtype](raw.buffer) };
  }
  return { tensors, metadata: header.__metadata__ || {} };
}

export function writeSafetensors(tensors, metadata = {}) {
  const header = { __metadata__: metadata };
  let offset = 0;
  const keys = Object.keys(tensors).sort();
  for (const key of keys) {
    const t = tensors[key];
    header[key] = { dtype: ST_DTYPES[t.dtype], shape: t.dims, data_offsets: [offset, offset + t.data.byteLength] };
    offset += t.data.byteLength;
  }
  let json = JSON.stringify(header);
  json += " ".repeat((8 - ((8 + json.length) % 8)) % 8); // the data starts 8-byte aligned
  const encoded = new TextEncoder().encode(json);
  const out = new Uint8Array(8 + encoded.length + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(encoded.length), true);
  out.set(encoded, 8);
  let at = 8 + encoded.length;
  for (const key of keys) {
    const d = tensors[key].data;
    out.set(new Uint8Array(d.buffer, d.byteOffset, d.byteLength), at);
    at += d.byteLength;
  }
  return out;
}

// -- IndexedDB ----------------------------------------------------------------------------------

function idb(mode, action) {
  return new Promise((resolve, reject) => {
    const open = indexedDB.open(DB_NAME, 1);
    open.onupgradeneeded = () => open.result.createObjectStore(DB_STORE);
    open.onerror = () => reject(open.error);
    open.onsuccess = () => {
      const db = open.result;
      const tx = db.transaction(DB_STORE, mode);
      const request = action(tx.objectStore(DB_STORE));
      tx.oncomplete = () => { db.close(); resolve(request.result); };
      tx.onerror = tx.onabort = () => { db.close(); reject(tx.error); };
    };
  });
}

// -- MeZO's seeds (edgetune.runtime.seeds, in 32-bit integer arithmetic) -----------------------

function mix32(x) {
  x = (x ^ (x >>> 16)) >>> 0;
  x = Math.imul(x, 0x7feb352d) >>> 0;
  x = (x ^ (x >>> 15)) >>> 0;
  x = Math.imul(x, 0x846ca68b) >>> 0;
  return (x ^ (x >>> 16)) >>> 0;
}

export function seedsFor(step, seed, directions, pool) {
  const drawn = [];
  for (let d = 0; d < directions; d++) {
    // step * directions + d mod 2**32, exact for steps below 2**53 / directions
    const index = Number(BigInt(step * directions + d) & 0xffffffffn);
    drawn.push((mix32(seed >>> 0) ^ mix32(index)) >>> 0);
  }
  const mixed = drawn.map(mix32);
  return pool && pool.length ? mixed.map((h) => pool[h % pool.length]) : mixed;
}
