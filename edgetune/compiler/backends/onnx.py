"""ONNX backend: the whole scheduled training step as one plain ONNX graph.

Standard ops only, default domain, opset 18: the step runs on any ONNX runtime as an
ordinary inference graph. Each op's lowering lives in its `register(..., onnx=...)` call
beside its kernel and VJP; this module walks the scheduled graph and calls them through a
`LoweringContext`, which names values uniquely and holds the constants.

The IR updates tensors in place (an effect's `mutates`); ONNX is functional. So the
exporter keeps, for each mutable graph input, the name of its current value: an update's
lowering returns the new value of each tensor it writes, and later readers see that. The
model's outputs are the loss, `skipped`, and the new value of every mutable input
(`<input>_next`): the next step feeds them back (the manifest says which feeds which).

Guards (`attrs["guarded"]`, condition as the last input): each written tensor becomes
`If(cond, new, old)`, and `skipped` counts the false conditions. "raise" lowers the same
way: in that mode every effect waits on one shared condition, so a step with `skipped > 0`
changed nothing, and a runner raises there (the manifest's `on_nonfinite` says so).

Inputs that no effect writes and that are held across steps (frozen weights, eval-mode
buffers) become initializers when their values are given; large ones are stored as external
data beside the model. `onnx` is imported only here, and only when exporting.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from edgetune.compiler.backends.onnx_parts import partial_weights, split_parts
from edgetune.compiler.inputs import KINDS, Bindings, StepInput, index_uses, mask_inputs, step_inputs
from edgetune.compiler.ir.builder import UniqueNames
from edgetune.compiler.ir.graph import Graph, Node
from edgetune.compiler.ir.ops import OPS, is_effect, mutated_inputs, storage_of

OPSET = 18
# Model IR version 9 (onnx 1.14+): old enough for the runtimes that run opset 18.
IR_VERSION = 9
# An initializer at least this large is written to `step.onnx.data` beside the model, so the
# model file stays small and the weights can be mapped rather than parsed.
EXTERNAL_DATA_BYTES = 1 << 16
MODEL_FILE, DATA_FILE, MANIFEST_FILE, STATE_FILE = "step.onnx", "step.onnx.data", "manifest.json", "state.safetensors"
# Where a placeholder initializer says its data are: nowhere; the session is given them.
PLACEHOLDER_LOCATION = "supplied-by-the-session"
# The forward-only graph: frozen weights read from the step's data file, trained ones fed by the runner.
PREDICT_FILE, PREDICT_DATA_FILE = "predict.onnx", "predict.onnx.data"

_ELEM_TYPES = {torch.float32: "FLOAT", torch.float64: "DOUBLE", torch.float16: "FLOAT16",
               torch.bfloat16: "BFLOAT16", torch.int64: "INT64", torch.int32: "INT32", torch.int16: "INT16",
               torch.int8: "INT8", torch.uint8: "UINT8", torch.uint32: "UINT32", torch.bool: "BOOL"}


class ExportError(ValueError):
    """The step cannot be written as standard ONNX; the message names the op and its module."""


NOT_EXPORTED = ("the step runs on the torch backend (compile(..., backend='torch')) but not as ONNX; a model "
                "without that layer exports")


class LoweringContext:
    """What an op's `onnx` lowering writes through: ONNX nodes with fresh value names, and
    constants (initializers). Lowerings never import onnx themselves."""

    def __init__(self, onnx: Any) -> None:
        self.onnx = onnx
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._names = UniqueNames()
        self.base = "v"  # the IR node being lowered: its values are named after it

    def fresh(self, base: str | None = None) -> str:
        return self._names.claim(base or self.base)

    def reserve(self, name: str) -> str:
        """Claim an exact name (a graph input or output); it must still be free."""
        if name in self._names:
            raise ExportError(f"ONNX value name {name!r} is used twice")
        self._names.add(name)
        return name

    # -- nodes ------------------------------------------------------------------------------

    def op(self, op_type: str, *inputs: str, outputs: int = 1, name: str | None = None, **attrs: Any):
        """Add one node; returns its output's name (a list of them when `outputs` > 1). `name`
        gives the output a name reserved beforehand (a graph output's)."""
        outs = [name or self.fresh(f"{self.base}_{op_type.lower()}") for _ in range(outputs)]
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), outs, name=self.fresh(f"{outs[0]}_node"),
                                                     **attrs))
        return outs[0] if outputs == 1 else outs

    def choose(self, condition: str, then: str, otherwise: str, dtype: torch.dtype, shape) -> str:
        """`then` where the scalar `condition` holds, else `otherwise`: an If whose branches pass
        one value through. Not Where: onnxruntime's Where broadcasts a scalar condition entry
        by entry, about 50x slower than If on a 960x160 weight (0.15 against 8-11 ms here)."""
        def branch(value: str, label: str):
            out = self.fresh(f"{self.base}_{label}")
            node = self.onnx.helper.make_node("Identity", [value], [out], name=self.fresh(f"{out}_node"))
            info = self.onnx.helper.make_tensor_value_info(out, self.elem_type(dtype), list(shape))
            return self.onnx.helper.make_graph([node], self.fresh(f"{self.base}_{label}_graph"), [], [info])

        return self.op("If", condition, then_branch=branch(then, "then"), else_branch=branch(otherwise, "else"))

    def cast(self, x: str, dtype: torch.dtype) -> str:
        return self.op("Cast", x, to=self.elem_type(dtype))

    def convert(self, x: str, have: torch.dtype, want: torch.dtype) -> str:
        """x in dtype `want`: ONNX ops do not promote operands as torch does."""
        return x if have == want else self.cast(x, want)

    def reduce(self, op_type: str, x: str, axes, keepdims: bool) -> str:
        """A Reduce* over `axes` (opset 18 takes them as an input); empty axes: all of them."""
        return self.op(op_type, x, self.ints(axes), keepdims=int(keepdims))

    def full(self, shape, value: float | int | bool, dtype: torch.dtype) -> str:
        """A tensor of `shape` filled with `value`, made at run time (not stored in the model)."""
        fill = self.onnx.numpy_helper.from_array(torch.full((1,), value, dtype=dtype).numpy())
        return self.op("ConstantOfShape", self.ints(shape), value=fill)

    # -- constants --------------------------------------------------------------------------

    def const(self, value: Any, dtype: torch.dtype | None = None, name: str | None = None) -> str:
        """An initializer holding `value` (a tensor or a Python number)."""
        tensor = torch.as_tensor(value, dtype=dtype).detach().cpu().contiguous()
        name = self.reserve(name) if name else self.fresh(f"{self.base}_const")
        self.initializers.append(self.onnx.numpy_helper.from_array(tensor.numpy(), name))
        return name

    def placeholder(self, value: torch.Tensor, dtype: torch.dtype, name: str) -> str:
        """An initializer of `value`'s shape and dtype whose data are in no file: whoever runs
        the model supplies them (PLACEHOLDER_LOCATION says so)."""
        t = self.onnx.TensorProto(name=self.reserve(name), data_type=self.elem_type(dtype), dims=list(value.shape),
                                  data_location=self.onnx.TensorProto.EXTERNAL)
        for key, entry in (("location", PLACEHOLDER_LOCATION), ("offset", "0"), ("length", str(value.nbytes))):
            t.external_data.add(key=key, value=entry)
        self.initializers.append(t)
        return name

    def scalar(self, value: float | int | bool, dtype: torch.dtype) -> str:
        return self.const(value, dtype)

    def ints(self, values) -> str:
        """A 1-D int64 constant: a shape, axes, starts or ends."""
        return self.const(torch.tensor(list(values), dtype=torch.int64))

    def elem_type(self, dtype: torch.dtype) -> int:
        if dtype not in _ELEM_TYPES:
            raise ExportError(f"no ONNX element type for {dtype}")
        return getattr(self.onnx.TensorProto, _ELEM_TYPES[dtype])


@dataclass
class Exported:
    """The step as ONNX: the model, and the manifest that says how to feed and chain it."""

    model: Any  # onnx.ModelProto
    manifest: dict[str, Any]
    # The values of the inputs that carry from step to step (trained tensors, optimizer state,
    # written buffers), by input name, where they were given: what the first step takes.
    carried: dict[str, torch.Tensor] = field(default_factory=dict)


def to_onnx(graph: Graph, values: dict[str, torch.Tensor] | None = None, outside: set[str] = frozenset()) -> Exported:
    """The scheduled `graph` as one ONNX model. `values` (by input name) makes the held inputs
    that no effect writes initializers; an input without a value stays a model input. Those
    named in `outside` become initializers without data (external, in no file): a session
    is given their values (onnxruntime: SessionOptions.add_external_initializers)."""
    import onnx

    values = values or {}
    ctx = LoweringContext(onnx)
    written = _written_inputs(graph)
    current: dict[Node, str] = {}
    inputs, frozen = [], []
    for i, n in zip(step_inputs(graph), graph.inputs):
        if n in written or i.per_step or i.name not in values:
            current[n] = ctx.reserve(i.name)
            inputs.append(i)
        else:
            make = ctx.placeholder if i.name in outside else ctx.const
            current[n] = make(values[i.name], i.dtype, name=i.name)
            frozen.append(i)
    for name in [*graph.outputs, "skipped", *(f"{n.name}_next" for n in graph.inputs if n in written)]:
        ctx.reserve(name)  # the interface's names first: nothing made up later may take them
    for n in graph.nodes:  # every leaf named before any lowering makes up names
        if n.op == "const":
            current[n] = ctx.const(n.attrs["value"], n.dtype, name=n.name)
    guards = _Guards(graph)
    for n in graph.nodes:
        if n.op not in ("input", "const"):
            ctx.base = n.name
            _lower(ctx, n, current, guards)
    outputs = _outputs(ctx, graph, current, written, guards)
    model = _without_unused_initializers(_same_rank_scalars(onnx, _model(onnx, ctx, inputs, outputs)))
    kept = {t.name for t in model.graph.initializer}
    manifest = _io_manifest(inputs, [i for i in frozen if i.name in kept], outputs, guards.mode)
    _describe_indexes(manifest["inputs"], graph)
    carried = {i.name: values[i.name] for i in inputs if i.name in values and not i.per_step}
    return Exported(model, manifest, carried)


def _written_inputs(graph: Graph) -> set[Node]:
    """The graph inputs some effect writes: they carry from one step to the next."""
    written = set()
    for n in graph.nodes:
        if not is_effect(n):
            continue
        for k in mutated_inputs(n):
            target = storage_of(n.inputs[k])
            if target.op != "input" or _whole_view_of(n.inputs[k]) is not target:
                raise ExportError(f"op '{n.op}'{_where(n)} writes {n.inputs[k]!r}, which is not a graph input; "
                                  "ONNX export carries only whole graph inputs from step to step")
            written.add(target)
    return written


def _lower(ctx: LoweringContext, n: Node, current: dict[Node, str], guards: "_Guards") -> None:
    lowering = OPS[n.op].onnx
    if lowering is None:
        raise ExportError(f"op '{n.op}'{_where(n)} has no ONNX lowering: {NOT_EXPORTED} (to edgetune's developers: "
                          "add `onnx=` to its register call)")
    guarded = n.attrs.get("guarded")
    operands = n.inputs[:-1] if guarded else n.inputs
    names = [current[i] for i in operands]
    try:
        out = lowering(ctx, n, names)
    except NotImplementedError as e:
        raise ExportError(f"op '{n.op}'{_where(n)}: {e}: {NOT_EXPORTED}") from None
    if not is_effect(n):
        current[n] = out
        return
    news = (out,) if isinstance(out, str) else tuple(out)
    targets = [n.inputs[k] for k in mutated_inputs(n)]
    if len(news) != len(targets):
        raise ExportError(f"the ONNX lowering of '{n.op}' gave {len(news)} values for {len(targets)} written tensors")
    condition = current[n.inputs[-1]] if guarded else None
    for target, new in zip(targets, news):
        current[target] = guards.apply(ctx, n, condition, new, current[target], target)
        current[_whole_view_of(target)] = current[target]  # a write through an in-place view is the input's


# Views that stand for their whole input, moved in place (the graph reads the input's new
# value through them): writing one writes the input.
WHOLE_VIEWS = ("zo_perturb_inplace",)


def _whole_view_of(node: Node) -> Node:
    while node.op in WHOLE_VIEWS:
        node = node.inputs[0]
    return node


@dataclass
class _Guards:
    """The guarded effects' conditions, lowered: `Where` per written tensor and the count of
    false conditions (the step's `skipped`)."""

    graph: Graph
    mode: str = "apply"
    skipped: list[str] = field(default_factory=list)
    _counted: set[Node] = field(default_factory=set)

    def __post_init__(self) -> None:
        modes = {n.attrs["guarded"] for n in self.graph.nodes if n.attrs.get("guarded")}
        if len(modes) > 1:
            raise ExportError(f"a step mixes guard modes {sorted(modes)}")
        self.mode = modes.pop() if modes else "apply"
        conditions = {n.inputs[-1] for n in self.graph.nodes if n.attrs.get("guarded")}
        if self.mode == "raise" and len(conditions) > 1:
            # Sound only where one condition holds every effect back: then skipped > 0 means
            # nothing changed, and a runner can raise as the torch backend does.
            raise ExportError("on_nonfinite='raise' with more than one condition cannot be exported")

    def apply(self, ctx: LoweringContext, n: Node, condition: str | None, new: str, old: str, target: Node) -> str:
        if condition is None:
            return new
        if n not in self._counted:  # one count per effect, however many tensors it writes
            self._counted.add(n)
            self.skipped.append(ctx.op("Cast", ctx.op("Not", condition), to=ctx.elem_type(torch.int64)))
        return ctx.choose(condition, new, old, target.dtype, target.shape)

    def count(self, ctx: LoweringContext) -> str:
        """The number of effects skipped by their guard (0 in a step without guards)."""
        total = ctx.scalar(0, torch.int64)
        for term in self.skipped:
            total = ctx.op("Add", total, term)
        return ctx.op("Identity", total, name="skipped")


@dataclass(frozen=True)
class _Output:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    feeds: str | None = None  # the input this output becomes at the next step


def _outputs(ctx: LoweringContext, graph: Graph, current: dict[Node, str], written: set[Node],
             guards: _Guards) -> list[_Output]:
    ctx.base = "output"
    outs = []
    for key, node in graph.outputs.items():
        name = ctx.op("Identity", current[node], name=key)
        outs.append(_Output(name, tuple(node.shape), node.dtype))
    guards.count(ctx)
    outs.append(_Output("skipped", (), torch.int64))
    for n in graph.inputs:
        if n in written:
            name = ctx.op("Identity", current[n], name=f"{n.name}_next")
            outs.append(_Output(name, tuple(n.shape), n.dtype, feeds=n.name))
    return outs


def _model(onnx: Any, ctx: LoweringContext, inputs: list[StepInput], outputs: list[_Output]) -> Any:
    h = onnx.helper
    graph = h.make_graph(
        ctx.nodes, "edgetune_step",
        [h.make_tensor_value_info(i.name, ctx.elem_type(i.dtype), list(i.shape)) for i in inputs],
        [h.make_tensor_value_info(o.name, ctx.elem_type(o.dtype), list(o.shape)) for o in outputs],
        ctx.initializers)
    from edgetune.version import __version__

    model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)], producer_name="edgetune",
                         producer_version=__version__)
    model.ir_version = IR_VERSION
    return model


# Elementwise ops whose operands broadcast: onnxruntime's CPU kernels take a slow path
# (an inner loop as long as the last dimension) when a one-entry operand has a lower rank
# than the output and the output's last dimensions are 1, as a 1x1 conv weight's are:
# Mul([576, 96, 1, 1], 0-d) takes 1.5 ms, Mul([576, 96, 1, 1], [1, 1, 1, 1]) 0.03 ms.
_BROADCASTING = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Equal", "Less", "Greater",
                 "LessOrEqual", "GreaterOrEqual", "And", "Or"}


def _same_rank_scalars(onnx: Any, model: Any) -> Any:
    """Give every one-entry operand of a broadcasting op the output's rank: a constant is
    stored reshaped, a computed value gets a Reshape. Same values, onnxruntime's fast path."""
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in
             [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
             if v.type.tensor_type.HasField("shape")}
    sizes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in
             [*inferred.graph.value_info, *inferred.graph.input] if v.type.tensor_type.HasField("shape")}
    constants = {t.name: t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL}
    for t in model.graph.initializer:
        sizes[t.name], ranks[t.name] = list(t.dims), len(t.dims)
    nodes, shapes = [], {}
    for node in model.graph.node:
        rank = ranks.get(node.output[0])
        if node.op_type in _BROADCASTING and rank and rank >= 2:
            for k, name in enumerate(node.input):
                if name in sizes and ranks[name] < rank and all(d == 1 for d in sizes[name]):
                    node.input[k] = _as_rank(onnx, model, name, rank, constants, nodes, shapes)
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _without_unused_initializers(model: Any) -> Any:
    """Drop the initializers no node reads: held tensors the step does not need (a folded
    norm's counter), constants a lowering made and then bypassed. Runtimes warn of each one."""
    used = _names_read(model.graph) | {o.name for o in model.graph.output}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model


def _names_read(graph: Any) -> set[str]:
    """The values the nodes of `graph` read, their subgraphs' (an If's branches) included."""
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g, *attr.graphs]:
                names |= _names_read(sub) | {o.name for o in sub.output}
    return names


def _as_rank(onnx: Any, model: Any, name: str, rank: int, constants: dict, nodes: list, shapes: dict) -> str:
    new = f"{name}_rank{rank}"
    if new in shapes or new in constants:
        return new
    if name in constants:  # a stored scalar: store it once more, reshaped
        array = onnx.numpy_helper.to_array(constants[name]).reshape([1] * rank)
        constants[new] = onnx.numpy_helper.from_array(array, new)
        model.graph.initializer.append(constants[new])
        return new
    shape = f"{new}_shape"
    model.graph.initializer.append(onnx.numpy_helper.from_array(torch.ones(rank, dtype=torch.int64).numpy(), shape))
    nodes.append(onnx.helper.make_node("Reshape", [name, shape], [new], name=f"{new}_node"))
    shapes[new] = rank
    return new


def _describe_indexes(entries: list[dict[str, Any]], graph: Graph) -> None:
    """Each batch tensor that indexes a table (token ids, class labels) gets "indexes": the
    table's size and the values it may also hold (an ignore_index). ONNX's Gather takes a
    negative index from the end (label -1 would train as the last class), so a runner checks
    the values itself before a step (runtime/runner.py, web/static/edgetune-web.js), as the
    Trainer does. One read only as an attention mask gets "attention_mask": its -inf entries
    are not refused as bad data."""
    uses: dict[int, list[dict[str, Any]]] = {}
    for use in index_uses(graph):
        uses.setdefault(use.position, []).append({"size": use.size, "ignored": sorted(use.ignored),
                                                  "table": use.table})
    masks = mask_inputs(graph)
    for entry in entries:
        if entry["kind"] in ("input", "target") and entry["key"] in uses:
            entry["indexes"] = uses[entry["key"]]
        if entry["kind"] in ("input", "target") and entry["key"] in masks:
            entry["attention_mask"] = True  # may hold -inf (inputs.mask_inputs)


def _io_manifest(inputs: list[StepInput], frozen: list[StepInput], outputs: list[_Output], mode: str) -> dict[str, Any]:
    dtype = lambda d: str(d).removeprefix("torch.")  # noqa: E731
    return {
        "opset": OPSET,
        "inputs": [{"name": i.name, "kind": i.kind, "key": i.key, "shape": list(i.shape), "dtype": dtype(i.dtype),
                    "meaning": KINDS[i.kind].meaning} for i in inputs],
        # Held tensors no step writes, stored in the model as initializers of these names.
        "frozen": [{"name": i.name, "kind": i.kind, "key": i.key} for i in frozen],
        "outputs": [{"name": o.name, "shape": list(o.shape), "dtype": dtype(o.dtype), "feeds": o.feeds}
                    for o in outputs],
        "next_step": {o.name: o.feeds for o in outputs if o.feeds},
        "on_nonfinite": mode,
        "skipped": {"apply": "always 0: the step has no guards",
                    "skip": "guarded writes skipped this step (each kept its old value)",
                    "raise": "> 0 means the loss or a gradient was not finite and nothing changed: raise"}[mode],
    }


def _where(n: Node) -> str:
    module = n.meta.get("module")
    return f" (module '{module}')" if module else " (module unknown)"


# -- a Trainer's step, written to a folder ----------------------------------------------------

def export_step(trainer_or_graph: Any, path: str | os.PathLike, *,
                external_data_bytes: int = EXTERNAL_DATA_BYTES) -> Any:
    """Write the step into folder `path`: `step.onnx` (+ `step.onnx.data` when an initializer
    is large), `manifest.json`, and `state.safetensors` (the carried tensors' current values,
    what step 1 takes); from a Trainer also `predict.onnx`, the model's forward in eval mode
    (the manifest's "predict"). Returns the step's ModelProto (with its weights inline)."""
    exported = _export(trainer_or_graph)
    os.makedirs(path, exist_ok=True)
    _save_model(exported.model, os.path.join(path, MODEL_FILE), DATA_FILE, external_data_bytes)
    if not isinstance(trainer_or_graph, Graph):
        exported.manifest["predict"] = export_predict(trainer_or_graph, exported.manifest, path, external_data_bytes)
    if exported.carried:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in exported.carried.items()},
                  os.path.join(path, STATE_FILE))
    from edgetune.files import write_json

    write_json(os.path.join(path, MANIFEST_FILE), exported.manifest)
    return exported.model


def _export(source: Any) -> Exported:
    if isinstance(source, Graph):
        return to_onnx(source)
    # A Trainer, told by what the export reads of it: importing the class here would make the
    # trainer (which calls this module) and this module import each other.
    if not all(hasattr(source, a) for a in ("graph", "rules", "optimizer", "examples")):
        raise TypeError(f"export_step takes a Trainer or a Graph, not {type(source).__name__}")
    return trainer_export(source)


def trainer_export(trainer: Any) -> Exported:
    """A Trainer's step with its held tensors: frozen ones as initializers, carried ones as the
    first step's inputs; the manifest adds the scheme, the optimizer and the version."""
    held = held_values(trainer)
    parts = partial_weights(trainer.graph)
    graph, split = split_parts(trainer.graph, parts, trainer.held()["param"])
    held.update({name: value for name, value, _ in split.values()})
    exported = to_onnx(graph, held)
    _describe_parts(exported.manifest, parts, split, dict(trainer.model.named_parameters()))
    from edgetune.version import __version__
    from edgetune.compiler import scheme as schemes

    exported.manifest.update({
        "edgetune_version": __version__,
        "model": MODEL_FILE,
        "state": STATE_FILE if exported.carried else None,
        "scheme": schemes.as_mapping(trainer.rules),
        "optimizer": {"name": type(trainer.optimizer).__name__,
                      **{k: v for k, v in dataclasses.asdict(trainer.optimizer).items() if k != "op"},
                      "lr": float(trainer.lr)},
        "steps_done": trainer.steps,
    })
    return exported


def _describe_parts(manifest: dict, parts: dict, split: dict, params: dict[str, torch.Tensor]) -> None:
    """Each trained slice's input says which channels of the weight (of which shape) it holds,
    and which initializer holds the frozen rest."""
    for i in manifest["inputs"]:
        if i["kind"] == "param" and i["key"] in split:
            i["part"] = {**parts[i["key"]].manifest(), "shape": list(params[i["key"]].shape),
                         "frozen": split[i["key"]][2]}


def held_values(trainer: Any) -> dict[str, torch.Tensor]:
    """The tensor the Trainer binds to each held input, by input name."""
    batch = list(trainer.examples[0]) + list(trainer.examples[1])
    arguments = trainer._arguments(batch, step=trainer.steps + 1)
    return {i.name: a for i, a in zip(step_inputs(trainer.graph), arguments) if not i.per_step}


def _save_model(model: Any, path: str, data_file: str, external_data_bytes: int) -> None:
    """Save `model` with each large initializer's bytes in `data_file` beside it. Integer tensors
    stay inline whatever their size: they are shapes and indices, which runtimes read while
    loading the model (onnxruntime refuses a Reshape whose shape is external)."""
    import onnx
    from onnx.external_data_helper import set_external_data

    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # saving with external data rewrites the proto it is given
    data = os.path.join(os.path.dirname(path), data_file)
    if os.path.exists(data):
        os.remove(data)  # onnx appends to an existing data file
    inline = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}
    for t in copy.graph.initializer:
        if t.HasField("raw_data") and len(t.raw_data) >= external_data_bytes and t.data_type not in inline:
            set_external_data(t, data_file)
    onnx.save_model(copy, path)


# -- the forward-only graph beside the step ------------------------------------------------------

def prediction_graph(trainer: Any) -> Graph:
    """The model's forward in eval mode on the example inputs, its output "output", holding the
    weights as the step does: LoRA adapters attached, frozen linears as int8 where the step
    holds them so (the same rule picks the same weights)."""
    from edgetune.compiler import lora
    from edgetune.compiler.frontend.torch import export
    from edgetune.compiler.passes.dce import dce
    from edgetune.compiler.passes.int8 import int8_frozen_linears

    model, was_training = trainer.model, trainer.model.training
    try:
        model.eval()
        with trainer.dequantized():  # torch.export reads float weights
            forward = export(model, _prediction, trainer.examples[0], (), prediction=True,
                             input_names=trainer.input_names)
    finally:
        model.train(was_training)
    graph, _ = lora.attach(forward.graph, forward.params, trainer.rules)
    if trainer.int8:
        trained = {forward.params[n] for n, r in trainer.rules.items() if n in forward.params and not r.lora}
        graph = int8_frozen_linears(graph, trained)
    return dce(Graph(graph.nodes, {"output": graph.outputs["output"]}))


def _prediction(out: Any) -> Any:
    """The prediction in what a model returns: the tensor, a Hugging Face output's logits, or
    the first tensor of a tuple."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return next(t for t in out if isinstance(t, torch.Tensor))
    return out


def export_predict(trainer: Any, step_manifest: dict[str, Any], folder: str | os.PathLike,
                   external_data_bytes: int = EXTERNAL_DATA_BYTES) -> dict[str, Any]:
    """Write `predict.onnx` into `folder`, beside the step already written there: what the step
    carries (trained tensors, written buffers, adapters) are its inputs, fed by the runner's
    current values; frozen tensors are initializers that read the step's own data file where
    the step stores the same tensor, so the weights are on disk once. Returns the manifest's
    "predict" entry."""
    import onnx

    graph, split = split_parts(prediction_graph(trainer), partial_weights(trainer.graph), trainer.held()["param"])
    carried = {(i["kind"], i["key"]): i["name"] for i in step_manifest["inputs"] if i["name"] in
               step_manifest["next_step"].values()}
    specs = step_inputs(graph)
    arguments = Bindings(specs, trainer.held()).arguments({"input": list(trainer.examples[0])})
    values = {i.name: a for i, a in zip(specs, arguments) if not i.per_step and (i.kind, i.key) not in carried}
    exported = to_onnx(graph, values)
    model = exported.model
    step_rests = {i["key"]: i["part"]["frozen"] for i in step_manifest["inputs"] if "part" in i}
    same = {rest: step_rests[key] for key, (_, _, rest) in split.items()}  # a weight's frozen rest
    _share_step_data(onnx, model, specs, step_manifest, folder, same)
    _save_model(model, os.path.join(folder, PREDICT_FILE), PREDICT_DATA_FILE, external_data_bytes)
    dtype = lambda d: str(d).removeprefix("torch.")  # noqa: E731
    out = graph.outputs["output"]
    indexes = {e["name"]: {"indexes": e["indexes"]} for e in exported.manifest["inputs"] if "indexes" in e}
    return {"model": PREDICT_FILE,
            "inputs": [{"name": i.name, "kind": i.kind, "key": i.key, "shape": list(i.shape), "dtype": dtype(i.dtype),
                        "carried_as": carried.get((i.kind, i.key)), **indexes.get(i.name, {})}
                       for i in specs if i.per_step or (i.kind, i.key) in carried],
            "output": {"name": "output", "shape": list(out.shape), "dtype": dtype(out.dtype)}}


def _share_step_data(onnx: Any, model: Any, specs: list[StepInput], step_manifest: dict, folder: str,
                     same: dict[str, str]) -> None:
    """Point each initializer of `model` that the step stores in its data file (the same tensor:
    same kind and key, or named in `same` (ours: the step's), dtype and dims) at the step's bytes
    instead of a second copy."""
    path = os.path.join(folder, MODEL_FILE)
    step = onnx.load(path, load_external_data=False)
    external = {t.name: t for t in step.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    step_name = {(f["kind"], f["key"]): f["name"] for f in step_manifest["frozen"]}
    by_name = {i.name: (i.kind, i.key) for i in specs}
    for t in model.graph.initializer:
        theirs = external.get(same.get(t.name) or step_name.get(by_name.get(t.name), ""))
        if theirs is None or list(theirs.dims) != list(t.dims) or theirs.data_type != t.data_type:
            continue
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        del t.external_data[:]
        t.external_data.extend(theirs.external_data)
