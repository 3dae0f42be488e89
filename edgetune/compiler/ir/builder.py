"""Builder: appends Nodes to a graph under construction, inferring shapes as it goes.

The frontend builds the forward graph with it, autodiff the backward, and passes any
rewrite. `meta` is stamped on every node emitted while it is set (e.g. the source module).
"""
from __future__ import annotations

from typing import Any

import torch

from edgetune.compiler.ir.graph import Graph, Node
from edgetune.compiler.ir.ops import OPS, infer


class Builder:
    def __init__(self, nodes: list[Node] | None = None) -> None:
        self.nodes: list[Node] = list(nodes or [])
        self.meta: dict[str, Any] = {}
        self._names = UniqueNames(n.name for n in self.nodes)

    def emit(self, op: str, *inputs: Node, name: str = "", **attrs: Any) -> Node:
        if op not in OPS:
            raise KeyError(f"unknown op {op!r}")
        for i in inputs:
            if not isinstance(i, Node):
                raise TypeError(f"{op}: input {i!r} is not a Node (scalars go in attrs)")
        shape, dtype = infer(OPS[op], inputs, attrs)
        node = Node(op, tuple(inputs), attrs, shape, dtype, self._fresh(name or op), dict(self.meta))
        self.nodes.append(node)
        return node

    def redo(self, node: Node, inputs: tuple[Node, ...], name: str) -> Node:
        """A fresh node computing what `node` computes, from `inputs` of the same shapes (its
        shape is known: no inference)."""
        new = Node(node.op, tuple(inputs), dict(node.attrs), node.shape, node.dtype, self._fresh(name), dict(self.meta))
        self.nodes.append(new)
        return new

    def append(self, node: Node) -> Node:
        """Add an existing node (a pass copying a graph); its name must still be free."""
        if node.name in self._names:
            raise ValueError(f"name {node.name!r} is already used")
        self._names.add(node.name)
        self.nodes.append(node)
        return node

    def input(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, **attrs: Any) -> Node:
        node = Node("input", (), attrs, tuple(shape), dtype, self._fresh(name), {})
        self.nodes.append(node)
        return node

    def const(self, value: torch.Tensor | float | int | bool, dtype: torch.dtype | None = None) -> Node:
        value = torch.as_tensor(value, dtype=dtype).detach().clone()
        node = Node("const", (), {"value": value}, tuple(value.shape), value.dtype, self._fresh("const"), dict(self.meta))
        self.nodes.append(node)
        return node

    def graph(self, outputs: dict[str, Node]) -> Graph:
        return Graph(list(self.nodes), dict(outputs))

    # -- conveniences for VJP rules --------------------------------------------------------

    def sum_to(self, g: Node, shape: tuple[int, ...]) -> Node:
        """Undo broadcasting: sum `g` down to `shape` (nothing to do when they agree)."""
        if tuple(g.shape) == tuple(shape):
            return g
        return self.emit("sum_to", g, shape=tuple(shape))

    def add_all(self, terms: list[Node]) -> Node:
        total = terms[0]
        for t in terms[1:]:
            total = self.emit("add", total, t)
        return total

    def _fresh(self, base: str) -> str:
        return self._names.claim(_sanitize(base))


class UniqueNames:
    """Names handed out once each. A graph names thousands of nodes after a few bases ("mul",
    "add", ...), so each base remembers where its count stopped: counting from 1 every time
    made naming quadratic (a SmolLM2 peak prediction took 1.65 s with it, 1.46 s without)."""

    def __init__(self, taken=()) -> None:
        self.taken: set[str] = set(taken)
        self._count: dict[str, int] = {}  # base -> the k of the last name claimed for it

    def __contains__(self, name: str) -> bool:
        return name in self.taken

    def add(self, name: str) -> None:
        """Take an exact name (the caller checked that it is free)."""
        self.taken.add(name)

    def update(self, names) -> None:
        """Take these names too: claims go around them."""
        self.taken.update(names)

    def claim(self, base: str) -> str:
        """`base`, or `base_1`, `base_2`, ... : the first not taken, which then is. Names are
        never given back, so the ones below a base's count are still taken."""
        k = self._count.get(base, 0)
        name = f"{base}_{k}" if k else base
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self._count[base] = k
        self.taken.add(name)
        return name


def _sanitize(name: str) -> str:
    # Names become Python identifiers in generated code; a leading "_" is kept for kernels.
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in name).lstrip("_")
    return out if out and not out[0].isdigit() else "v" + out
