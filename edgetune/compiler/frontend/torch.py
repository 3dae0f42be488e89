"""torch.export of model + loss -> core ATen graph -> edgetune IR (the forward graph).

Parameters, buffers, inputs and targets become `input` nodes (attrs["kind"] says which).
The graph's outputs are the loss (`"loss"`) and the new value of every buffer the step
mutates (`"buffer:<name>"`, e.g. BatchNorm running statistics in train mode).
"""
from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.export.graph_signature import InputKind, OutputKind

from edgetune.compiler.ir.builder import Builder
from edgetune.compiler.ir.ops.attention import fused_attention_applies
from edgetune.compiler.ir.ops.recurrent import fused_rnn_applies
from edgetune.compiler.ir.graph import Graph, Node
from edgetune.compiler.ir.ops import ATEN, ATEN_NAMED
from edgetune.compiler.passes.dce import dce
from edgetune.compiler.passes.vocab_loss import fuse_vocab_log_prob

_PREFIX = "model."


class UnsupportedOpError(NotImplementedError):
    """An ATen op (or a variant of one) that edgetune cannot compile."""


class TraceError(RuntimeError):
    """torch.export could not trace the model and its loss: what it said, and what to change."""


@dataclass
class ForwardGraph:
    graph: Graph
    params: dict[str, Node]  # parameter name (as model.named_parameters) -> input node
    buffers: dict[str, Node]
    inputs: list[Node]
    targets: list[Node]


class _WithLoss(torch.nn.Module):
    """model + loss as one module of positional tensors; `input_names` passes the model's
    inputs by keyword instead (a model whose forward takes a cache second, e.g. GPT-2)."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, n_inputs: int,
                 input_names: tuple[str, ...] | None = None) -> None:
        super().__init__()
        self.model, self.loss_fn, self.n_inputs, self.input_names = model, loss_fn, n_inputs, input_names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        inputs = args[: self.n_inputs]
        out = self.model(**dict(zip(self.input_names, inputs))) if self.input_names else self.model(*inputs)
        return self.loss_fn(out, *args[self.n_inputs:])


def export(model: torch.nn.Module, loss_fn: Callable, inputs: tuple, targets: tuple,
           prediction: bool = False, input_names: tuple[str, ...] | None = None,
           linear_kept: frozenset[str] = frozenset()) -> ForwardGraph:
    """Trace model + loss once, in the module's current train()/eval() mode. `prediction`:
    loss_fn picks the model's prediction (any shape) instead, the graph's output "output".
    `input_names`: the model takes `inputs` by these keywords. `linear_kept`: weights whose
    linear must stay one (a LoRA rule's), not fused with the loss (passes/vocab_loss.py)."""
    wrapped = _WithLoss(model, loss_fn, len(inputs), input_names)
    targets = _unaliased(inputs, targets)
    device = _device_of(inputs)
    with warnings.catch_warnings():
        # torch.export's own notice about its pytree internals: not ours to fix, noise to users.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        # nn.LSTM/GRU set their _flat_weights list in forward; torch.export warns of it, and the
        # list holds the module's own parameters, which it traces as parameters all the same.
        warnings.filterwarnings("ignore", message=".*_flat_weights.*were assigned during export")
        try:
            program = torch.export.export(wrapped, tuple(inputs) + tuple(targets), strict=False)
            _detach_no_grad_regions(program)
            program = program.run_decompositions(_decompositions())
        except Exception as err:  # noqa: BLE001 -- torch's tracing errors, said in the user's terms
            if not _is_trace_failure(err):
                raise  # the model's or the loss's own error (a shape mismatch, a ValueError): as eager raises it
            raise TraceError(_trace_failure(err)) from err
    aliases = _param_aliases(model)
    kept = frozenset(aliases.get(name, name) for name in linear_kept)
    return _Converter(program, len(inputs), device, aliases, prediction).run(kept)


# What a trace failure usually means in a model's code, by what torch.export raised.
_TRACE_HINTS = (
    (("GuardOnDataDependentSymNode", "data-dependent"),
     "The model or the loss reads a tensor's value to decide something in Python (an `if` on a "
     "tensor, float(t) or t.item(), a BatchNorm with momentum=None, which divides by its batch "
     "counter), and a step compiled ahead of time has no values to read. Compute it with tensor "
     "ops (torch.where instead of the `if`) or give it a fixed setting (BatchNorm momentum=0.1)."),
    (("fake tensor in the exported program",),
     "The forward reads a parameter or buffer through `.data`, which hides it from the trace: "
     "use `.detach()` instead (the same values, no gradient)."),
    (("FakeTensor",),
     "The model hands a tensor to Python code that needs a number or a size from its values (a "
     "packed sequence: nn.utils.rnn.pack_padded_sequence reads its lengths; a shape computed from "
     "a tensor), and a step compiled ahead of time has no values to read. Pad the sequences to "
     "one length instead, and leave the padded steps out of the loss with a mask (or read each "
     "sequence's last valid step with gather)."),
    (("DynamicOutputShapeException", "dynamic output shape"),
     "An op's output shape depends on the data (ctc_loss, nonzero, boolean-mask indexing): "
     "edgetune compiles steps of fixed shapes. Use an op of fixed shape (a mask multiplied in, "
     "torch.where) where one exists."),
)


def _is_trace_failure(err: Exception) -> bool:
    """Raised by torch's tracing machinery (or matching a known failure of it), not by the
    model's code running under the trace."""
    return type(err).__module__.startswith("torch") or _hint(f"{type(err).__name__}: {err}") is not None


def _hint(said: str) -> str | None:
    return next((h for keys, h in _TRACE_HINTS if any(k in said for k in keys)), None)


def _trace_failure(err: Exception) -> str:
    said = f"{type(err).__name__}: {err}".strip()
    lines = said.splitlines()
    shown = "\n".join(lines[:6]) + ("\n..." if len(lines) > 6 else "")
    hint = _hint(said)
    return ("torch.export could not trace the model and its loss, and edgetune compiles what it traces.\n"
            + (hint + "\n" if hint else "") + f"torch.export said: {shown}")


def _detach_no_grad_regions(program: Any) -> None:
    """A `with torch.no_grad():` (or `set_grad_enabled(False)`) block of the forward is one
    call of wrap_with_set_grad_enabled(False, ...) in torch.export's graph; decomposing inlines
    it into plain ops, whose values would then pass gradient. Each of its results is detached
    first, as eager's no_grad leaves it (detach survives the decompositions)."""
    graph = program.graph_module.graph
    regions = [n for n in graph.nodes if n.op == "call_function" and n.args and n.args[0] is False
               and n.target is torch.ops.higher_order.wrap_with_set_grad_enabled]
    for region in regions:
        for result in [u for u in region.users if u.target is operator.getitem]:
            with graph.inserting_after(result):
                detached = graph.call_function(torch.ops.aten.detach.default, (result,))
            detached.meta = dict(result.meta)
            result.replace_all_uses_with(detached, delete_user_cb=lambda user, d=detached: user is not d)
    if regions:
        program.graph_module.recompile()


def _unaliased(inputs: tuple, targets: tuple) -> tuple:
    """torch.export makes one placeholder of a tensor passed twice (labels = input_ids), but
    the step binds each argument by position: give each target its own tensor."""
    seen = {id(t) for t in inputs}
    return tuple(t.clone() if isinstance(t, torch.Tensor) and id(t) in seen else t for t in targets)


def _param_aliases(model: torch.nn.Module) -> dict[str, str]:
    """{every parameter name: the name named_parameters() gives it}. torch.export lists a tied
    parameter once per name (and may read it under either), so all names must share one node."""
    first: dict[int, str] = {}
    return {name: first.setdefault(id(p), name) for name, p in model.named_parameters(remove_duplicate=False)}


def _decompositions() -> dict:
    """Core ATen, except ops whose decomposition changes their meaning for training:
    detach would become an alias (and pass gradient); hardswish's decomposition uses clamp,
    whose gradient at the kinks (x = -3, 3) differs from hardswish's own. A call of an op that
    edgetune runs as one fused kernel (attention.py, recurrent.py, lstm_proj.py, gru.py,
    simple_rnn.py) stays whole where that kernel applies to it, call by call (a decomposition
    that returns NotImplemented keeps the call), and is decomposed elsewhere."""
    table = torch.export.default_decompositions()
    for op in (torch.ops.aten.detach.default, torch.ops.aten.hardswish.default):
        table.pop(op, None)
    for op, fits in _FUSED.items():
        if op in table:
            table[op] = _whole_where_it_fits(fits, table[op])
    for op in _RECURRENT:
        if op in table:
            table[op] = _dropout_between_layers(op, table[op])
    return table


def _dropout_between_layers(op: Any, whole: Callable) -> Callable:
    """A recurrent call with dropout between its layers in train mode becomes one call a layer
    with the dropout between them, as ATen's kernels apply it to each layer's output but the
    last (torch's own decomposition of the whole call leaves the dropout out). Each layer's call
    is then kept whole where the fused op fits, or decomposed."""
    def decomposition(x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
        if not (train and dropout > 0 and num_layers > 1):
            return whole(x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
        several = isinstance(hx, (list, tuple))  # an LSTM's (h, c); one tensor for a GRU or an RNN
        states = list(hx) if several else [hx]
        directions, per_layer = (2 if bidirectional else 1), len(params) // num_layers
        finals: list[list] = [[] for _ in states]
        for layer in range(num_layers):
            mine = [s[layer * directions:(layer + 1) * directions] for s in states]
            out = op(x, mine if several else mine[0], params[layer * per_layer:(layer + 1) * per_layer], has_biases,
                     1, 0.0, train, bidirectional, batch_first)
            x = out[0] if layer == num_layers - 1 else torch.nn.functional.dropout(out[0], dropout, training=True)
            for kept, final in zip(finals, out[1:]):
                kept.append(final)
        return (x, *(torch.cat(kept) for kept in finals))
    return decomposition


def _whole_where_it_fits(fits: Callable, decompose: Callable) -> Callable:
    def decomposition(*args: Any, **kwargs: Any) -> Any:
        return NotImplemented if fits(*args, **kwargs) else decompose(*args, **kwargs)
    return decomposition


def _fits_fused_rnn(x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first) -> bool:
    return fused_rnn_applies(x, params, has_biases, num_layers, bidirectional, x.device)


def _fits_fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                          enable_gqa=False) -> bool:
    return fused_attention_applies(query, key, attn_mask, dropout_p, enable_gqa, query.device)


# The ops edgetune keeps whole where its fused kernel applies (aten.lstm's, aten.gru's and
# aten.rnn_*'s arguments are the same), with the test of a call's (fake) arguments.
_RECURRENT = (torch.ops.aten.lstm.input, torch.ops.aten.gru.input, torch.ops.aten.rnn_tanh.input,
              torch.ops.aten.rnn_relu.input)
_FUSED = {torch.ops.aten.scaled_dot_product_attention.default: _fits_fused_attention,
          **{op: _fits_fused_rnn for op in _RECURRENT}}


def _device_of(inputs: tuple) -> torch.device:
    return next((t.device for t in inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))


class _Converter:
    def __init__(self, program: Any, n_inputs: int, device: torch.device, aliases: dict[str, str],
                 prediction: bool = False) -> None:
        self.prediction = prediction
        self.program, self.n_inputs, self.aliases = program, n_inputs, aliases
        self.b = Builder()
        self.b.device = device
        self.env: dict[Any, Any] = {}
        self.params: dict[str, Node] = {}
        self.buffers: dict[str, Node] = {}
        self.user: list[Node] = []

    def run(self, linear_kept: frozenset[str] = frozenset()) -> ForwardGraph:
        outputs: dict[str, Node] = {}
        for fx in self.program.graph.nodes:
            if fx.op == "placeholder":
                self.env[fx] = self._placeholder(fx)
            elif fx.op == "call_function":
                self.env[fx] = self._call(fx)
            elif fx.op == "output":
                outputs = self._outputs(fx)
        ins = self.user[: self.n_inputs]
        # Conversions leave dead nodes (the transpose that mm -> linear folds away): without
        # them, a parameter's users are its real uses, as a partial-channel rule needs.
        graph = fuse_vocab_log_prob(dce(self.b.graph(outputs)),
                                    kept={self.params[name] for name in linear_kept if name in self.params})
        return ForwardGraph(graph, self.params, self.buffers, ins, self.user[self.n_inputs:])

    def _placeholder(self, fx: Any) -> Node:
        spec = next(s for s in self.program.graph_signature.input_specs if s.arg.name == fx.name)
        val = fx.meta["val"]
        target = (spec.target or fx.name).removeprefix(_PREFIX)
        if spec.kind == InputKind.PARAMETER:
            target = self.aliases.get(target, target)
            if target not in self.params:
                self.params[target] = self.b.input(target, val.shape, val.dtype, kind="param", target=target)
            node = self.params[target]
        elif spec.kind == InputKind.BUFFER:
            node = self.buffers[target] = self.b.input(target, val.shape, val.dtype, kind="buffer", target=target)
        elif spec.kind == InputKind.USER_INPUT:
            kind = "input" if len(self.user) < self.n_inputs else "target"
            node = self.b.input(fx.name, val.shape, val.dtype, kind=kind, index=len(self.user))
            self.user.append(node)
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            node = self.b.const(self.program.constants[spec.target])  # e.g. torch.tensor(2.0) in forward
        else:
            raise UnsupportedOpError(f"model input {fx.name!r} of kind {spec.kind.name} is not supported; "
                                     "register it as a buffer")
        return node

    def _call(self, fx: Any) -> Any:
        args = _map(fx.args, self.env)
        if fx.target is operator.getitem:
            value = args[0][args[1]]
            if value is None:
                raise UnsupportedOpError(f"output {args[1]} of {fx.args[0].target} {self._where(fx)} is not supported")
            return value
        if fx.target is torch.ops.aten.as_strided.default:
            self.b.meta = self._module_meta(fx)
            return self._as_strided(fx, *args)
        convert = ATEN.get(fx.target) or ATEN_NAMED.get(str(fx.target))
        if convert is None:
            raise UnsupportedOpError(f"unsupported op {fx.target} {self._where(fx)}; edgetune compiles the ops "
                                     "registered in edgetune/compiler/ir/ops")
        self.b.meta = self._module_meta(fx)
        try:
            return convert(self.b, *args, **_map(fx.kwargs, self.env))
        except NotImplementedError as err:
            raise UnsupportedOpError(f"unsupported: {err} in op {fx.target} {self._where(fx)}") from err

    def _as_strided(self, fx: Any, x: Node, size: list, stride: list, storage_offset: int | None = None) -> Node:
        """as_strided where it only reshapes: a contiguous input read whole, in its own order (as
        adaptive_avg_pool1d's decomposition restores a layout). Any other as_strided reads memory
        as laid out in eager PyTorch, which edgetune's value graph does not model."""
        val = fx.args[0].meta["val"]
        offset = val.storage_offset() if storage_offset is None else storage_offset
        if (val.is_contiguous() and offset == val.storage_offset() and math.prod(size) == val.numel()
                and _contiguous_strides(size, stride)):
            return ATEN[torch.ops.aten.view.default](self.b, x, list(size))
        raise UnsupportedOpError(f"unsupported op {fx.target} {self._where(fx)}: only an as_strided that reshapes a "
                                 f"contiguous tensor is supported, not size {list(size)}, stride {list(stride)}, "
                                 f"offset {offset} of a tensor of shape {list(val.shape)}, stride {list(val.stride())}")

    def _module_meta(self, fx: Any) -> dict:
        stack = fx.meta.get("nn_module_stack") or {}
        if not stack:
            return {}
        path, cls = list(stack.values())[-1]
        module = {"": "<loss>", "model": "<model>"}.get(path, path.removeprefix(_PREFIX))
        return {"module": module, "module_type": getattr(cls, "__name__", str(cls).split(".")[-1].strip("'>"))}

    def _where(self, fx: Any) -> str:
        meta = self._module_meta(fx)
        if not meta:
            return "(in the loss function)"
        return f"(from module '{meta['module']}' ({meta['module_type']}))"

    def _outputs(self, fx: Any) -> dict[str, Node]:
        outputs: dict[str, Node] = {}
        for spec, arg in zip(self.program.graph_signature.output_specs, fx.args[0]):
            value = self.env[arg] if isinstance(arg, torch.fx.Node) else arg  # a constant: a Python number
            if spec.kind == OutputKind.USER_OUTPUT and self.prediction:
                outputs.setdefault("output", value)
            elif spec.kind == OutputKind.USER_OUTPUT:
                outputs["loss"] = _check_loss(value)
            elif spec.kind == OutputKind.BUFFER_MUTATION:
                outputs["buffer:" + spec.target.removeprefix(_PREFIX)] = value
            else:
                raise UnsupportedOpError(f"model output of kind {spec.kind.name} is not supported")
        return outputs


def _contiguous_strides(size: list, stride: list) -> bool:
    """`stride` is row-major for `size` (a dimension of size 1 may have any stride)."""
    expected = 1
    for n, s in zip(reversed(size), reversed(stride)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def _check_loss(value: Any) -> Node:
    if not isinstance(value, Node) or value.shape != () or not value.is_float:
        raise ValueError(f"loss_fn must return a scalar floating-point tensor, got {value!r}"
                         f" of shape {getattr(value, 'shape', None)}")
    return value


def _map(obj: Any, env: dict) -> Any:
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(o, env) for o in obj)
    if isinstance(obj, dict):
        return {k: _map(v, env) for k, v in obj.items()}
    if isinstance(obj, torch.fx.Node):
        return env[obj]
    return obj
