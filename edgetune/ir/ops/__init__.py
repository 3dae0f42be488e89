"""The op vocabulary. Everything about an op lives in one `register` call in one place:

- `kernel`: the torch implementation, `kernel(*tensors, **attrs)`; it is also the shape
  rule, evaluated on meta tensors at build time (`shape=` overrides where that can't work);
- `vjp`: `vjp(b, node, g, want) -> one gradient Node or None per input`, emitting the
  backward as more IR through the builder `b`. `want[i]` is False (no gradient: return
  None and build nothing), True, or a `ChannelSlice` (only that slice of a weight);
- `mutates`: indices of inputs updated in place, or a function of the node giving them
  (optimizer updates, buffer writes; such ops are effects and produce no value);
- `view`: the output aliases input 0's memory (costs nothing in the memory plan);
- `scratch`: bytes the torch kernel allocates while it runs, beyond its output (an estimate);
- `measure_scratch`: the kernel's allocations depend on the machine (library kernels that
  reorder or copy their operands), so the plan uses what edgetune.backends.scratch measures
  for each call where it can, and `scratch` only where it cannot;
- `inplace`: the same kernel writing its result over input 0; registers `<name>_inplace`, a
  view of input 0, which passes/inplace.py uses where input 0 dies at this op;
- `aten`: the torch.export ATen overloads this op is built from, with their converter.

The families live in sibling modules, imported at the bottom so they all register.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from edgetune.ir.graph import Node

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


def mutated_inputs(node: Node) -> tuple[int, ...]:
    """Indices of the inputs that `node` updates in place (empty for pure ops)."""
    m = OPS[node.op].mutates
    return m(node) if callable(m) else m


def is_effect(node: Node) -> bool:
    return bool(OPS[node.op].mutates)


@dataclass(frozen=True)
class ChannelSlice:
    """The trainable part of a weight: entries `index` along `axis` (k of them)."""

    axis: int
    index: Node  # const int64 tensor of the chosen channels, sorted
    first: bool  # channels are 0..k-1, so a narrow view serves instead of a gather

    @property
    def k(self) -> int:
        return self.index.shape[0]


OPS: dict[str, OpDef] = {}
ATEN: dict[Any, Callable[..., Any]] = {}


def register(name: str, kernel: Callable, vjp: VJP | None = None, *, inplace: Callable | None = None,
             **kw: Any) -> OpDef:
    if name in OPS:
        raise ValueError(f"op {name!r} is registered twice")
    OPS[name] = OpDef(name, kernel, vjp, **kw)
    if inplace is not None:
        register(f"{name}_inplace", inplace, shape=kw.get("shape"), view=True)
    return OPS[name]


def aten(*overloads: Any) -> Callable:
    """Decorator: `fn(b, *args, **kwargs)` builds IR for these ATen overloads."""

    def deco(fn: Callable) -> Callable:
        for ov in overloads:
            ATEN[ov] = fn
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


from edgetune.ir.ops import core, nn, linalg, shape, masks, vocab, quant, attention  # noqa: E402,F401  (registration)
