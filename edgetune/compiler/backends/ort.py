"""onnxruntime backend: the scheduled step lowered to ONNX (backends.onnx) and run by an
onnxruntime session, called as the torch backend's CompiledStep is: the same arguments (the
Trainer's tensors, in the graph's input order), the same outputs, written tensors updated in
place. No Python runs between kernels.

Frozen tensors (weights and buffers no step writes) are the model's initializers, copied
into the session when it is built: as constants onnxruntime folds them and prepacks the
convolutions' weights, which makes a MobileNetV2 step 1.2-1.6x faster than binding them as
inputs (BENCHMARKS.md), for one more copy of the frozen weights in memory. They reach the
session as onnxruntime values (SessionOptions.add_external_initializers), not serialized
into the model. Trainer.load of a checkpoint that carries frozen weights builds the session
again (BackendChoice.frozen_changed); a frozen weight changed in place by other means is not
seen: compile again. Everything else is an input, bound by pointer (IO binding): the session
reads the Trainer's tensors where they live. A written tensor comes back as the output
`<input>_next`, into a buffer held here, and is then copied into the Trainer's tensor: ONNX
is functional, and binding an output to its own input's memory is unsafe, as onnxruntime may
run a reader of the old value after the node that writes the new one. The copy moves the
written bytes only (what the scheme trains, its optimizer state, train-mode norm
statistics); the buffers hold as much again. The session's memory arena is on only where
the first steps page-fault without it (choice.FAULTS_FOR_ARENA).

A "raise" step (compile(on_nonfinite="raise")) that skipped its writes raises before any
copy, so nothing changes, as in the torch backend. Dropout draws its masks from onnxruntime's
generator, not torch's: the same seed gives other masks than the torch backend.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from edgetune.compiler.backends.onnx import to_onnx
from edgetune.compiler.backends.torch import NonFiniteError
from edgetune.compiler.ir.graph import Graph
from edgetune.runtime.runner import lean_session_options


# A frozen tensor at least this large reaches the session as an onnxruntime value beside the
# model; a smaller one is simply a constant inside it.
SHARED_BYTES = 1024


class BackendUnavailable(RuntimeError):
    """onnxruntime cannot run the exported step here (a kernel it lacks for an op or dtype)."""


class OrtStep:
    def __init__(self, graph: Graph, device: torch.device, threads: int | None = None,
                 frozen: dict[str, torch.Tensor] | None = None, arena: bool = False) -> None:
        if device.type != "cpu":
            raise ValueError(f"backend='onnxruntime' runs steps on CPU tensors; the model is on {device}: "
                             "use backend='torch' there")
        import onnxruntime as ort

        frozen = frozen or {}
        shared = {name for name, t in frozen.items() if t.nbytes >= SHARED_BYTES and t.dtype in _NUMPY}
        exported = to_onnx(graph, frozen, outside=shared)
        self.inputs = graph.inputs
        self.outputs = list(graph.outputs)
        self.on_nonfinite = exported.manifest["on_nonfinite"]
        self.arena = arena
        options = session_options(ort, threads)
        options.enable_cpu_mem_arena = arena
        names = [spec["name"] for spec in exported.manifest["frozen"] if spec["name"] in shared]
        if names:  # onnxruntime copies them in: a non-contiguous one may as well be made contiguous here
            values = [ort.OrtValue.ortvalue_from_numpy(frozen[n].detach().contiguous().numpy()) for n in names]
            options.add_external_initializers(names, values)
        try:
            self.session = _session(ort, exported.model, options)
        except Exception as err:  # onnxruntime's own classes; most often a kernel it lacks (float64 Conv)
            raise BackendUnavailable(f"onnxruntime cannot run this step: {str(err).strip()}; use backend='torch'"
                                     " (float64 steps often need it: onnxruntime's CPU kernels are mostly float32)"
                                     ) from None
        fed = {i["name"] for i in exported.manifest["inputs"]}
        self._fed = [(k, n) for k, n in enumerate(graph.inputs) if n.name in fed]  # the rest are initializers
        position = {n.name: k for k, n in enumerate(graph.inputs)}
        specs = exported.manifest["outputs"]
        # Each output's buffer, bound by pointer at every step; `_next` pairs a written
        # input's new value with its position among the arguments.
        self._buffers = {o["name"]: torch.empty(o["shape"], dtype=_dtype(o["dtype"])) for o in specs}
        self._next = [(self._buffers[o["name"]], position[o["feeds"]]) for o in specs if o["feeds"]]

    def __call__(self, *args: Any) -> dict[str, Any]:
        binding = self.session.io_binding()
        keep = []  # what is bound must outlive the run: converted scalars, contiguous copies
        for k, node in self._fed:
            t = torch.as_tensor(args[k], dtype=node.dtype).contiguous()
            keep.append(t)
            _bind(binding.bind_input, node.name, t)
        for name, buffer in self._buffers.items():
            _bind(binding.bind_output, name, buffer)
        self.session.run_with_iobinding(binding)
        skipped = int(self._buffers["skipped"])
        if skipped and self.on_nonfinite == "raise":
            raise NonFiniteError("the loss or a gradient is not finite")
        with torch.no_grad():
            for new, k in self._next:
                args[k].copy_(new)
        return {**{key: self._buffers[key].clone() for key in self.outputs}, "skipped": skipped}


def _session(ort: Any, model: Any, options: Any) -> Any:
    """A session over `model`, from a file: onnxruntime checks that the file its placeholder
    initializers name exists, even though add_external_initializers supplies their data (an empty
    file, then, which it never reads)."""
    import tempfile

    from edgetune.compiler.backends.onnx import PLACEHOLDER_LOCATION

    with tempfile.TemporaryDirectory(prefix="edgetune-ort-") as folder:
        path = os.path.join(folder, "step.onnx")
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
        open(os.path.join(folder, PLACEHOLDER_LOCATION), "wb").close()
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def session_options(ort: Any, threads: int | None = None) -> Any:
    """One step at a time, on as many threads as torch uses (so backends compare on equal
    terms); the graph optimized fully; no memory patterns and (unless the step asks for it,
    see choice.py) no CPU arena, as the runner's sessions (lean_session_options: on
    MobileNetV2 128x128 they raise the peak by 13-37%; bench/ort_options.py, BENCHMARKS.md)."""
    options = lean_session_options(ort)
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about unused initializers are not the user's concern
    return options


def available() -> str | None:
    """None where this backend can run here, else why not."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (pip install 'edgetune[onnx]')"
    return None


_NUMPY = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16", torch.int64: "int64",
          torch.int32: "int32", torch.int16: "int16", torch.int8: "int8", torch.uint8: "uint8", torch.bool: "bool"}


def _bind(bind: Any, name: str, t: torch.Tensor) -> None:
    import numpy as np

    if t.dtype not in _NUMPY:
        raise ValueError(f"backend='onnxruntime' cannot bind {name!r} of dtype {t.dtype}; use backend='torch'")
    bind(name, "cpu", 0, np.dtype(_NUMPY[t.dtype]), list(t.shape), t.data_ptr())


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)
