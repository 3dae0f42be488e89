"""A partially trained weight, exported in two parts: its trained channels as a step input
and output (what the step carries), its frozen channels as an initializer. A step then moves
only the trained bytes in and out, and a device saves (or sends) only those.

In the compiled graph such a weight is one held input, which the update op writes on its
chosen channels (`attrs["part"]`). Before lowering, `split_parts` rewrites the graph so that
the input is the trained slice, the rest is a constant, and the forward reads the weight put
back together (`cat`, then `index_select` into channel order when the channels are not the
first k); the update then writes the slice whole. The reassembled weight would be stale for
a reader after the update, so a weight with one stays whole (none is expected: the torch
backend updates in place and matches PyTorch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from edgetune.compiler.ir.graph import Graph, Node
from edgetune.compiler.ir.ops import is_effect
from edgetune.compiler.passes.rewrite import rewrite


@dataclass(frozen=True)
class Part:
    """The trained channels of one weight: `index` (sorted) along `axis`."""

    axis: int
    index: torch.Tensor

    def rest(self, size: int) -> torch.Tensor:
        keep_mask = torch.ones(size, dtype=torch.bool)
        keep_mask[self.index] = False
        return keep_mask.nonzero().flatten()

    def is_first(self) -> bool:
        return torch.equal(self.index, torch.arange(len(self.index)))

    def manifest(self) -> dict:
        return {"axis": self.axis, "channels": self.index.tolist()}


def partial_weights(graph: Graph) -> dict[str, Part]:
    """{parameter key: its trained part} for every weight an update writes only in part."""
    parts, users = {}, graph.users()
    position = {n: k for k, n in enumerate(graph.nodes)}
    for n in graph.nodes:
        # A MeZO update (no optimizer state) writes through the weight's perturbed views, which
        # read it whole: such a weight stays whole.
        if is_effect(n) and n.attrs.get("part") is not None and "n_state" in n.attrs:
            if any(position[u] > position[n] for u in users[n.inputs[0]]):
                continue  # read after its update: split, that reader would see the old weight
            axis, k = n.attrs["part"]
            index = _index_operand(n)
            parts[n.inputs[0].attrs["target"]] = Part(axis, torch.arange(k) if index is None
                                                      else index.attrs["value"].cpu())
    return parts


def split_parts(graph: Graph, parts: dict[str, Part], weights: dict[str, torch.Tensor]) -> tuple[Graph, dict]:
    """`graph` with each weight of `parts` (by key, values in `weights`) read as slice + rest.
    Returns the graph and, by key, (trained slice input's name, its value, the rest's name)."""
    split: dict[Node, Node] = {}  # the original input -> the trained slice input
    made: dict[str, tuple[str, torch.Tensor, str]] = {}

    def visit(b, n, inputs):
        key = n.attrs.get("target")
        if n.op == "input" and n.attrs.get("kind") == "param" and key in parts:
            return _reassembled(b, n, parts[key], weights[key].detach(), split, made)
        if is_effect(n) and n.attrs.get("part") is not None and n.inputs[0] in split:
            return _whole_update(b, n, inputs, split[n.inputs[0]])
        return None

    return rewrite(graph, visit), made


def _reassembled(b, n: Node, part: Part, weight: torch.Tensor, split: dict, made: dict) -> Node:
    size = n.shape[part.axis]
    shape = list(n.shape)
    shape[part.axis] = len(part.index)
    trained = b.input(f"{n.name}_trained", tuple(shape), n.dtype, **n.attrs)
    rest_value = weight.index_select(part.axis, part.rest(size)).contiguous()
    rest = Node("const", (), {"value": rest_value}, tuple(rest_value.shape), n.dtype, b._fresh(f"{n.name}_frozen"))
    b.nodes.append(rest)  # a const of its own name, which the inference graph's twin shares
    whole = b.emit("cat", trained, rest, dim=part.axis, name=n.name)
    if not part.is_first():  # channel c sits at position order[c] of [trained, rest]
        order = torch.cat([part.index, part.rest(size)]).argsort()
        whole = b.emit("index_select", whole, b.const(order), dim=part.axis, name=f"{n.name}_ordered")
    split[n] = trained
    made[n.attrs["target"]] = (trained.name, weight.index_select(part.axis, part.index).contiguous(), rest.name)
    return whole


def _whole_update(b, n: Node, inputs: tuple[Node, ...], trained: Node) -> Node:
    """The update `n` writing the trained slice whole: no part, no channel index."""
    n_state = n.attrs["n_state"]
    guard = inputs[-1:] if n.attrs.get("guarded") else ()
    update = Node(n.op, (trained, *inputs[1:4 + n_state], *guard), {**n.attrs, "part": None}, n.shape, n.dtype,
                  n.name, dict(n.meta))
    b.nodes.append(update)
    return update


def _index_operand(update: Node) -> Node | None:
    """The const channel index of a partial update (inputs: param, grad, lr, step, *state,
    [index], [guard condition]), or None where its channels are the first k."""
    extra = len(update.inputs) - 4 - update.attrs["n_state"] - (1 if update.attrs.get("guarded") else 0)
    return update.inputs[4 + update.attrs["n_state"]] if extra else None
