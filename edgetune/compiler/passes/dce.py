"""Dead-code elimination: keep what the outputs and the in-place updates need."""
from __future__ import annotations

from edgetune.compiler.ir.graph import Graph
from edgetune.compiler.ir.ops import is_effect


def dce(graph: Graph) -> Graph:
    live = set()
    stack = list(graph.outputs.values()) + [n for n in graph.nodes if is_effect(n)]
    while stack:
        n = stack.pop()
        if n not in live:
            live.add(n)
            stack.extend(n.inputs)
    # Inputs stay, even unused: they are the step's calling convention.
    return Graph([n for n in graph.nodes if n in live or n.op == "input"], dict(graph.outputs))
