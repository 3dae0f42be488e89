"""StepRunner: steps an exported training graph with onnxruntime, holding what the step
carries (trained tensors, optimizer state, written buffers) as onnxruntime values between
steps. The graph's outputs `<input>_next` become the next step's inputs by reference, through
IO binding: no copy through numpy per step. The manifest beside the model says which input
is the batch, which are carried, and what `skipped` means.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

# Plain file handling only: `import edgetune` loads no compiler (and no torch) until asked.
from edgetune.files import atomic_write
from edgetune.runtime.seeds import seeds_for

MANIFEST = "manifest.json"
BATCH_KINDS = ("input", "target")


class RunnerError(ValueError):
    """A folder, batch or state file this runner cannot use; nothing was changed."""


class StepRunner:
    def __init__(self, folder: str | os.PathLike, providers: list[str] | None = None,
                 session_options: Any = None) -> None:
        import onnxruntime as ort

        self.folder = os.fspath(folder)
        self.manifest = _read_manifest(self.folder)
        self._session_args = (session_options or lean_session_options(ort), providers or ["CPUExecutionProvider"])
        self.session = self._session(self.manifest["model"])
        self._predict_session = None  # made at the first predict()
        inputs = self.manifest["inputs"]
        # The batch in the order step() takes it: the model's inputs, then the targets.
        self.batch_inputs = sorted((i for i in inputs if i["kind"] in BATCH_KINDS), key=lambda i: i["key"])
        self.carried = {i["name"]: i for i in inputs if i["name"] in self.manifest["next_step"].values()}
        # {key: the manifest's "part"} of each weight carried as its trained channels alone
        self.parts = {i["key"]: i["part"] for i in inputs if "part" in i}
        self.lr = float(self.manifest["optimizer"]["lr"])
        self.steps = int(self.manifest.get("steps_done", 0))
        self.last_skipped = 0
        self._values = self._initial_values(ort)

    # -- stepping ---------------------------------------------------------------------------

    def step(self, *batch: np.ndarray) -> float:
        """One training step on `batch` (inputs then targets, shaped as at export); returns the
        loss. Under on_nonfinite="raise", a step whose loss or a gradient is not finite raises
        FloatingPointError and keeps the previous state."""
        arrays = _checked(batch, self.batch_inputs, "step() takes inputs, then targets")
        _refuse_bad_values(arrays, self.batch_inputs, finite=self.manifest["on_nonfinite"] != "apply")
        binding = self.session.io_binding()
        for spec, array in zip(self.batch_inputs, arrays):
            binding.bind_cpu_input(spec["name"], array)
        binding.bind_cpu_input("lr", np.asarray(self.lr, dtype=np.float64))
        for name, value in self._hyper(self.steps + 1).items():
            binding.bind_cpu_input(name, np.asarray(value, dtype=np.int64))
        for name, value in self._values.items():
            binding.bind_ortvalue_input(name, value)
        names = [o["name"] for o in self.manifest["outputs"]]
        for name in names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outputs = dict(zip(names, binding.get_outputs()))
        skipped = int(outputs["skipped"].numpy())
        if skipped and self.manifest["on_nonfinite"] == "raise":
            raise FloatingPointError(f"step {self.steps + 1}: the loss or a gradient is NaN or infinite; nothing was "
                                     "updated (lower the learning rate, or check the batch)")
        for output, carried in self.manifest["next_step"].items():
            self._values[carried] = outputs[output]
        self.steps, self.last_skipped = self.steps + 1, skipped
        return float(outputs["loss"].numpy())

    def _hyper(self, step: int) -> dict[str, int]:
        """The step's integer hyperparameters: its count, or a MeZO step's seeds."""
        opt = self.manifest["optimizer"]
        if opt["name"] != "MeZO":
            return {"step": step}
        seeds = seeds_for(step, opt["seed"], opt["directions"], opt["seeds"])
        self.last_seeds = seeds
        return {f"zo_seed{d}": s for d, s in enumerate(seeds)}

    def predict(self, *inputs: np.ndarray) -> np.ndarray:
        """The model's output (eval mode: norms use their running statistics, no dropout) on
        `inputs`, with the weights as trained so far. Any number of rows: the graph takes the
        export's batch size, so rows go through in batches of that size, the last one padded
        (eval mode treats each row on its own; the padding's outputs are dropped)."""
        spec = self.manifest.get("predict")
        if spec is None:
            raise RunnerError(f"{self.folder} has no inference graph: export it again with this edgetune "
                              "(Trainer.export_onnx writes predict.onnx)")
        if self._predict_session is None:
            self._predict_session = self._session(spec["model"])
        batch = [i for i in spec["inputs"] if i["kind"] == "input"]
        arrays, rows = _rows(inputs, batch, "predict() takes the model's inputs")
        _refuse_bad_values(arrays, batch, finite=False)
        size = batch[0]["shape"][0]
        if rows != size and spec["output"]["shape"][:1] != [size]:
            raise RunnerError(f"this model's output {spec['output']['shape']} does not have the batch first: "
                              f"predict() takes exactly {size} rows here")
        outputs = []
        for start in range(0, rows, size):
            chunk = [_padded(a[start:start + size], size) for a in arrays]
            outputs.append(self._predict_batch(spec, batch, chunk)[:rows - start])
        return np.concatenate(outputs)

    def _predict_batch(self, spec: dict, batch: list[dict], arrays: list[np.ndarray]) -> np.ndarray:
        binding = self._predict_session.io_binding()
        for i, array in zip(batch, arrays):
            binding.bind_cpu_input(i["name"], array)
        for i in spec["inputs"]:
            if i["carried_as"]:
                binding.bind_ortvalue_input(i["name"], self._values[i["carried_as"]])
        binding.bind_output(spec["output"]["name"], "cpu")
        self._predict_session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def _session(self, model_file: str) -> Any:
        import onnxruntime as ort

        options, providers = self._session_args
        try:
            return ort.InferenceSession(os.path.join(self.folder, model_file), options, providers=providers)
        except Exception as err:  # onnxruntime's own classes: a kernel it lacks, a file it cannot read
            said = str(err).strip()
            hint = (": its CPU kernels are mostly float32 (float64 Conv or Erf have none), so export the step from "
                    "a float32 model (model.float())" if "NOT_IMPLEMENTED" in said else "")
            raise RunnerError(f"onnxruntime cannot run {model_file} of {self.folder}{hint}. It said: {said}") from None

    # -- state --------------------------------------------------------------------------------

    def state(self) -> dict[str, np.ndarray]:
        """The carried tensors by their model names ("head.weight", "head.weight:exp_avg"), copied.
        A partially trained weight is its trained channels only (the manifest input's "part"
        says which; `put_part` puts them back into the whole weight)."""
        return {self.carried[name]["key"]: value.numpy().copy() for name, value in self._values.items()}

    def save(self, path: str | os.PathLike) -> None:
        """The carried tensors, step count and lr as one safetensors file, written atomically."""
        from safetensors.numpy import save_file

        metadata = {"steps": str(self.steps), "lr": repr(self.lr), "model": self.manifest["model"]}
        atomic_write(os.fspath(path), lambda tmp: save_file(self.state(), tmp, metadata=metadata))

    def load(self, path: str | os.PathLike) -> None:
        """A file of save(): every carried tensor, names, shapes and dtypes checked first."""
        import onnxruntime as ort
        from safetensors import SafetensorError, safe_open

        path = os.fspath(path)
        try:
            with safe_open(path, "np") as f:  # one reader for tensors and metadata
                metadata = f.metadata() or {}
                arrays = {key: f.get_tensor(key) for key in f.keys()}
        except (SafetensorError, OSError) as err:
            raise RunnerError(f"{path} is not a runner state file ({err}): give a file StepRunner.save wrote") from None
        by_key = {spec["key"]: name for name, spec in self.carried.items()}
        _check_arrays(path, arrays, {key: self.carried[name] for key, name in by_key.items()})
        self._values = {by_key[key]: ort.OrtValue.ortvalue_from_numpy(np.asarray(a, order="C"))
                        for key, a in arrays.items()}
        self.steps, self.lr = int(metadata.get("steps", self.steps)), float(metadata.get("lr", self.lr))

    def _initial_values(self, ort: Any) -> dict[str, Any]:
        from safetensors.numpy import load_file

        state_file = self.manifest.get("state")
        arrays = load_file(os.path.join(self.folder, state_file)) if state_file else {}
        _check_arrays(os.path.join(self.folder, str(state_file)), arrays, self.carried)
        return {name: ort.OrtValue.ortvalue_from_numpy(np.asarray(a, order="C")) for name, a in arrays.items()}


def put_part(weight: np.ndarray, trained: np.ndarray, part: dict) -> np.ndarray:
    """`weight` with the channels a partially trained input holds (`trained`, as the runner's
    state keeps it; `part` from its manifest input) put in their place: a copy."""
    out = np.array(weight, copy=True)
    where = [slice(None)] * out.ndim
    where[part["axis"]] = part["channels"]
    out[tuple(where)] = trained
    return out


def trained_weights(folder: str | os.PathLike, state: str | os.PathLike,
                    weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model's weights as a runner state file holds them trained (StepRunner.save, or the
    browser's downloadWeights), put back into `weights` (the model's state dict as numpy arrays,
    e.g. its pretrained weights): every trained parameter whole, and the buffers the step
    writes (a train-mode BatchNorm's running statistics); the frozen ones untouched. A
    partially trained weight gets its trained channels put in place. Optimizer state is left
    out. Load the result into the model the step was exported from."""
    from safetensors.numpy import load_file

    manifest = _read_manifest(os.fspath(folder))
    arrays = load_file(os.fspath(state))
    carried = set(manifest["next_step"].values())
    params = {i["key"]: i for i in manifest["inputs"] if i["kind"] in ("param", "buffer") and i["name"] in carried}
    out = dict(weights)
    for key, spec in params.items():
        if key not in arrays:
            raise RunnerError(f"{state} holds no {key!r}: give a state of this export (StepRunner.save)")
        if key not in weights:
            raise RunnerError(f"the model has no {key!r}, which the step trains: give the state dict of the "
                              "model this folder was exported from")
        part = spec.get("part")
        out[key] = put_part(weights[key], arrays[key], part) if part else arrays[key]
        if out[key].shape != weights[key].shape:
            raise RunnerError(f"{key}: the state's {out[key].shape} does not fit the model's {weights[key].shape}")
    return out


def lean_session_options(ort: Any) -> Any:
    """onnxruntime's defaults less its CPU arena and memory patterns, which raise a training
    step's peak by 13-37% (BENCHMARKS.md, the onnxruntime section), and less its workers'
    spinning between runs. Where a step's large intermediates page-fault at every step
    (MobileNetV2 128x128 from batch 4 on), the arena makes it 1.4-1.9x faster: pass
    StepRunner options with `enable_cpu_mem_arena = True` there (edgetune's onnxruntime
    backend measures the faults and does so itself)."""
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    # onnxruntime's workers spin-wait for work for a while after each run by default: 27-30 ms
    # of a core within the 50 ms after every step here, taken from whatever runs next in the
    # process or on the machine (torch's own threads in edgetune's onnxruntime backend, where
    # MobileNetV2-0.35 TTE at batch 1 and 2 threads took 7.9-11.9 ms a step instead of 4.2).
    # Spinning within a run, where it pays, is kept.
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


def _checked(batch: tuple, specs: list[dict], what: str) -> list[np.ndarray]:
    """The arrays of `batch` as the graph takes them, or a RunnerError naming the one that differs."""
    if len(batch) != len(specs):
        raise RunnerError(f"{what}: {len(specs)} arrays ({[i['name'] for i in specs]}), got {len(batch)}")
    arrays = []
    for spec, array in zip(specs, batch):
        array = np.asarray(array, order="C")  # not ascontiguousarray: it makes a 0-d array 1-d
        if list(array.shape) != spec["shape"] or array.dtype != np.dtype(spec["dtype"]):
            raise RunnerError(f"{spec['name']} is {array.dtype}{list(array.shape)}, the graph was exported for "
                              f"{spec['dtype']}{spec['shape']}: export again with an example batch of this shape")
        arrays.append(array)
    return arrays


def _refuse_bad_values(arrays: list[np.ndarray], specs: list[dict], finite: bool) -> None:
    """RunnerError before anything runs, as the Trainer refuses such a batch: an index outside
    the table it indexes (the exported Gather reads a negative one from the end: label -1
    would train as the last class), or, where `finite`, a NaN or inf in a float array (the
    step's guard would skip its updates but count the step; an attention mask's -inf is not)."""
    for position, (spec, array) in enumerate(zip(specs, arrays)):
        what = f"array {position} ({spec['kind']} {spec['name']})"
        for table in spec.get("indexes", ()):
            _refuse_out_of_range(array, what, table)
        if finite and array.dtype.kind == "f" and not np.isfinite(array.sum(dtype=np.float64)):
            # an attention mask holds -inf where a query may not look
            bad = (np.isnan(array) | np.isposinf(array)) if spec.get("attention_mask") else ~np.isfinite(array)
            if bad.any():  # else only the sum overflowed, or a mask's -inf
                raise RunnerError(f"{what} has {int(bad.sum())} NaN or infinite entries of {array.size}, the "
                                  f"first at {np.argwhere(bad)[0].tolist()}; nothing was run: clean the batch "
                                  "(a step exported with on_nonfinite='apply' lets it through)")


def _refuse_out_of_range(array: np.ndarray, what: str, table: dict) -> None:
    if array.size == 0 or (array.min() >= 0 and array.max() < table["size"]):
        return
    bad = (array < 0) | (array >= table["size"])
    for value in table["ignored"]:
        bad &= array != value
    if bad.any():
        where = np.argwhere(bad)[0]
        ignored = "".join(f" or {v} (ignored)" for v in table["ignored"])
        raise RunnerError(f"{what} holds {array[tuple(where)]} at {where.tolist()}, out of range for {table['table']}: "
                          f"values must be in [0, {table['size']}){ignored}; nothing was run")


def _rows(inputs: tuple, specs: list[dict], what: str) -> tuple[list[np.ndarray], int]:
    """The arrays of `inputs` and their common number of rows; each as its spec past the first
    dimension, or a RunnerError naming the one that differs."""
    if len(inputs) != len(specs):
        raise RunnerError(f"{what}: {len(specs)} arrays ({[i['name'] for i in specs]}), got {len(inputs)}")
    arrays = [np.asarray(a, order="C") for a in inputs]
    rows = {a.shape[0] if a.ndim else None for a in arrays}
    for spec, array in zip(specs, arrays):
        if list(array.shape[1:]) != spec["shape"][1:] or array.ndim != len(spec["shape"]) or \
                array.dtype != np.dtype(spec["dtype"]):
            raise RunnerError(f"{spec['name']} is {array.dtype}{list(array.shape)}; the graph takes "
                              f"{spec['dtype']}[rows, {', '.join(map(str, spec['shape'][1:]))}]")
    if len(rows) != 1 or 0 in rows:
        raise RunnerError(f"{what}: the arrays must have the same number of rows, at least one "
                          f"(got {[a.shape[0] for a in arrays]})")
    return arrays, rows.pop()


def _padded(rows: np.ndarray, size: int) -> np.ndarray:
    """`rows` filled up to `size` rows with copies of its last one (values the model can take)."""
    if len(rows) == size:
        return rows
    return np.concatenate([rows, np.repeat(rows[-1:], size - len(rows), axis=0)])


def _read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise RunnerError(f"{folder} holds no {MANIFEST}: give the folder Trainer.export_onnx wrote")
    with open(path) as f:
        manifest = json.load(f)
    missing = {"model", "inputs", "outputs", "next_step", "optimizer", "on_nonfinite"} - set(manifest)
    if missing:
        raise RunnerError(f"{path} lacks {sorted(missing)}: export the step again with this edgetune")
    return manifest


def _check_arrays(path: str, arrays: dict[str, np.ndarray], want: dict[str, dict]) -> None:
    if set(arrays) != set(want):
        raise RunnerError(f"{path} does not fit this step: missing {sorted(set(want) - set(arrays))[:5]}, "
                          f"unexpected {sorted(set(arrays) - set(want))[:5]}")
    for key, a in arrays.items():
        spec = want[key]
        if list(a.shape) != spec["shape"] or a.dtype != np.dtype(spec["dtype"]):
            raise RunnerError(f"{path}: {key!r} is {a.dtype}{list(a.shape)}, the step takes "
                              f"{spec['dtype']}{spec['shape']}")
