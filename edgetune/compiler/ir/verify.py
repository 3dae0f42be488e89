"""The verifier: a graph's invariants (SSA order, unique names, in-place updates after every
reader), checked after each pass with EDGETUNE_CHECK=1, with the faulty node shown in context."""
from __future__ import annotations

import os

from edgetune.compiler.ir.graph import Graph, Node, format_graph
from edgetune.compiler.ir.ops import mutated_inputs, storage_of


class GraphError(Exception):
    """A broken graph invariant; the message shows the graph around the faulty node."""


def checks_enabled() -> bool:
    return os.environ.get("EDGETUNE_CHECK", "0") not in ("", "0")


def verify(graph: Graph, where: str = "") -> Graph:
    """Check SSA order, unique names, effect ordering; raise GraphError showing the fault."""
    seen: set[Node] = set()
    names: set[str] = set()
    for n in graph.nodes:
        for i in n.inputs:
            if i not in seen:
                _fail(graph, n, f"input {i!r} is used before it is defined", where)
        if n.name in names:
            _fail(graph, n, f"name {n.name!r} is defined twice", where)
        seen.add(n)
        names.add(n.name)
    for key, out in graph.outputs.items():
        if out not in seen:
            _fail(graph, None, f"output {key!r} is not a node of the graph", where)
    _verify_updates_last(graph, where)
    return graph


def _verify_updates_last(graph: Graph, where: str) -> None:
    """An in-place update must come after every other reader of the tensor it mutates,
    including readers of a view of it (a view sees the update)."""
    updated: set[Node] = set()
    for n in graph.nodes:
        for i in n.inputs:
            if storage_of(i) in updated:
                _fail(graph, n, f"reads {i!r} after an in-place update of its storage", where)
        updated.update(storage_of(n.inputs[k]) for k in mutated_inputs(n))


def _fail(graph: Graph, node: Node | None, msg: str, where: str) -> None:
    at = f" after pass '{where}'" if where else ""
    text = format_graph(graph, mark=node)
    raise GraphError(f"invalid graph{at}: {node!r}: {msg}\n{_around(text, node)}")


def _around(text: str, node: Node | None, radius: int = 8) -> str:
    lines = text.splitlines()
    idx = next((k for k, line in enumerate(lines) if line.startswith("->")), len(lines) - 1)
    return "\n".join(lines[max(0, idx - radius): idx + radius + 1])
