"""The op registry: OpDef, `register`, the ATen converter table, and what the IR asks of an op
(its shape, whether it is an effect or a view). The op families register into it; see the
package docstring for what a registration holds."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from edgetune.compiler.ir.graph import Node

VJP = Callable[..., tuple]


@dataclass(frozen=True)
class OpDef:
    name: str
    kernel: Callable[..., Any]
    vjp: VJP | None = None
    shape: Callable[..., tuple] | None = None
    mutates: tuple[int, ...] | Callable[[Node], tuple[int, ...]] = ()
    view: bool = False
    scratch: Callable[[Node], int] | None = None  # bytes the kernel allocates besides its output
    measure_scratch: bool = False  # measured per call on this machine where possible
    # The op as standard ONNX: `onnx(ctx, node, input_names)` emits nodes through the exporter's
    # context (edgetune.compiler.backends.onnx.LoweringContext) and returns the output's name;
    # an effect returns the new value of each input it mutates, in `mutated_inputs` order.
    onnx: Callable[..., Any] | None = None
    # `bind(node, device) -> kernel or None`: a kernel for this one node, its attributes and its
    # inputs' shapes fixed at compile time, called with the node's inputs alone; the torch
    # backend calls it instead of `kernel(*inputs, **attrs)`. For a kernel whose own choices
    # (layout, a matrix product for a 1x1 conv) cost more than the arithmetic at batch 1. It
    # must give `kernel`'s values bit for bit; None where the generic kernel serves.
    bind: Callable[[Node, torch.device], Callable[..., Any] | None] | None = None
    # `carries(node) -> bytes`: memory the kernel's output holds beside its own values, alive as
    # long as the output (an LSTM layer's oneDNN workspace, attached for its backward).
    carries: Callable[[Node], int] | None = None
    # `inline(node, input_names) -> str`: a Python expression the torch backend writes into the
    # step in place of a kernel call (views: a tensor method is a call less than a kernel that
    # calls it; ViT at batch 1 makes some 80 views a step). The same value as `kernel`.
    inline: Callable[[Node, list[str]], str] | None = None


def mutated_inputs(node: Node) -> tuple[int, ...]:
    """Indices of the inputs that `node` updates in place (empty for pure ops)."""
    m = OPS[node.op].mutates
    return m(node) if callable(m) else m


def is_effect(node: Node) -> bool:
    return bool(OPS[node.op].mutates)


def written_storages(node: Node) -> set[Node]:
    """The allocations `node` writes: an effect's targets, an in-place op's first input."""
    targets = mutated_inputs(node) if is_effect(node) else (0,) if node.op.endswith("_inplace") and node.inputs else ()
    return {storage_of(node.inputs[k]) for k in targets}


def carried_bytes(node: Node) -> int:
    """What `node`'s value holds in memory beside its own entries (OpDef.carries)."""
    carries = OPS[node.op].carries if node.op in OPS else None
    return carries(node) if carries else 0


def storage_of(node: Node) -> Node:
    """The node whose allocation `node` lives in (itself unless it is a view)."""
    while OPS[node.op].view:
        node = node.inputs[0]
    return node


@dataclass(frozen=True)
class ChannelSlice:
    """The trainable part of a weight: entries `index` along `axis` (k of them).

    `touched`: the rows of an embedding table that the batch looks up; `index` is then the
    lookup's token ids, flattened (a value of the step, with repeats), not a const."""

    axis: int
    index: Node  # const int64 tensor of the chosen channels, sorted (or the looked-up rows)
    first: bool  # channels are 0..k-1, so a narrow view serves instead of a gather
    touched: bool = False

    @property
    def k(self) -> int:
        return self.index.shape[0]


OPS: dict[str, OpDef] = {}
ATEN: dict[Any, Callable[..., Any]] = {}
# Converters of ops that exist only once a library registers them (a transformers custom op),
# by the name torch.export gives them: "namespace.op.overload".
ATEN_NAMED: dict[str, Callable[..., Any]] = {}


def register(name: str, kernel: Callable, vjp: VJP | None = None, *, inplace: Callable | None = None,
             inplace_bind: Callable | None = None, **kw: Any) -> OpDef:
    if name in OPS:
        raise ValueError(f"op {name!r} is registered twice")
    OPS[name] = OpDef(name, kernel, vjp, **kw)
    if inplace is not None:
        # Writing over input 0 is a memory matter: as a value it is the same op.
        register(f"{name}_inplace", inplace, shape=kw.get("shape"), scratch=kw.get("scratch"), view=True,
                 onnx=kw.get("onnx"), bind=inplace_bind)
    return OPS[name]


def aten(*overloads: Any) -> Callable:
    """Decorator: `fn(b, *args, **kwargs)` builds IR for these ATen overloads."""
    return _converter_of(ATEN, overloads)


def aten_named(*names: str) -> Callable:
    """Decorator: as `aten`, for ops known by name only (see ATEN_NAMED)."""
    return _converter_of(ATEN_NAMED, names)


def _converter_of(table: dict, keys: tuple) -> Callable:
    def deco(fn: Callable) -> Callable:
        for key in keys:
            table[key] = fn
        return fn

    return deco


def infer(op: OpDef, inputs: tuple[Node, ...], attrs: dict) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape and dtype of `op(inputs)`: the op's rule, or its kernel run on meta tensors."""
    if op.shape is not None:
        return op.shape(*inputs, **attrs)
    metas = [torch.empty(i.shape, dtype=i.dtype, device="meta") for i in inputs]
    out = op.kernel(*metas, **attrs)
    if out is None:
        return (), torch.bool
    return tuple(out.shape), out.dtype
