"""The IR: one Node type, a Graph of them in SSA order, and a printer (the verifier: verify.py).

Every value in edgetune -- a forward activation, a gradient, an optimizer update -- is a
Node. A Node produces at most one tensor; ops with side effects (parameter updates) produce
none and are kept alive by the `effect` flag of their op. Passes never mutate a Graph's
node list in place: they build and return a new Graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(eq=False)
class Node:
    """One SSA value: `op` applied to `inputs` with `attrs`, of a known shape and dtype."""

    op: str
    inputs: tuple["Node", ...]
    attrs: dict[str, Any]
    shape: tuple[int, ...]
    dtype: torch.dtype
    name: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # source module, role, ...

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point

    def __repr__(self) -> str:
        return f"%{self.name}"


@dataclass
class Graph:
    """Nodes in a valid execution order, plus the named values the step returns."""

    nodes: list[Node]
    outputs: dict[str, Node]

    @property
    def inputs(self) -> list[Node]:
        return [n for n in self.nodes if n.op == "input"]

    def users(self) -> dict[Node, list[Node]]:
        users: dict[Node, list[Node]] = {n: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                users[i].append(n)
        return users

    def __str__(self) -> str:
        return format_graph(self)


def leaves_first(graph: Graph) -> Graph:
    """Constants, then inputs (both exist before the step runs), then the rest in order, so
    a pass may use a constant right after any input (e.g. to cut channels of the batch)."""
    rank = {"const": 0, "input": 1}
    return Graph(sorted(graph.nodes, key=lambda n: rank.get(n.op, 2)), dict(graph.outputs))


def format_graph(graph: Graph, mark: Node | None = None) -> str:
    """Readable text, one node a line: `%y = conv2d(%x, %w) stride=(1, 1) :: f32[8,16,4,4]`."""
    lines = []
    for n in graph.nodes:
        lines.append(("-> " if n is mark else "   ") + format_node(n))
    lines.append("   return " + ", ".join(f"{k}={v!r}" for k, v in graph.outputs.items()))
    return "\n".join(lines)


def format_node(n: Node) -> str:
    args = ", ".join(repr(i) for i in n.inputs)
    attrs = " ".join(f"{k}={_short(v)}" for k, v in n.attrs.items())
    dtype = str(n.dtype).replace("torch.", "")
    where = f"  # {n.meta['module']}" if n.meta.get("module") else ""
    lhs = f"{n!r} = " if n.shape is not None else ""
    return f"{lhs}{n.op}({args}) {attrs} :: {dtype}{list(n.shape)}{where}".replace(" ) ", ") ")


def _short(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return repr(v.item()) if v.numel() == 1 else f"tensor{list(v.shape)}"
    return repr(v)
