"""A graph copy with local rewrites, the one tool the passes share.

`rewrite(graph, visit)` walks the nodes in order with their inputs already remapped;
`visit(b, node, inputs)` may emit nodes through `b` and return the node that stands for
`node` from then on, or None to keep it (copied only if its inputs changed); `keep` does
the same from inside `visit`, to emit nodes right after the original.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterable

from edgetune.compiler.ir.builder import Builder
from edgetune.compiler.ir.graph import Graph, Node

Visit = Callable[[Builder, Node, tuple[Node, ...]], "Node | None"]
# Activation gradients of the form g * (0 or 1, a function of the saved output): the bitmask
# pass turns their read of the output into bits, which the slices pass counts on.
MASK_GRADS = ("relu_grad", "hardtanh_grad")


def rewrite(graph: Graph, visit: Visit) -> Graph:
    b = Builder()
    b._names.update(n.name for n in graph.nodes)  # new nodes get names no original has
    mapping: dict[Node, Node] = {}
    for n in graph.nodes:
        inputs = tuple(mapping[i] for i in n.inputs)
        b.meta = dict(n.meta)
        new = visit(b, n, inputs)
        mapping[n] = keep(b, n, inputs) if new is None else new
    b.meta = {}
    return Graph(b.nodes, {k: mapping[v] for k, v in graph.outputs.items()})


def keep(b: Builder, n: Node, inputs: tuple[Node, ...]) -> Node:
    """Append `n` unchanged (or a copy on the remapped inputs) and return it."""
    new = n if inputs == n.inputs else replace(n, inputs=inputs)
    b.nodes.append(new)
    return new


def is_backward(n: Node) -> bool:
    return "grad_of" in n.meta


# A rewrite that saves memory but costs time (a mask, a recompute) is left out where the
# peak stays within this fraction of the lowest: a few kilobytes are not worth a kernel.
PEAK_SLACK = 0.02


def fewest_for_lowest_peak(graph: Graph, candidates: Iterable[Node], build: Callable[[set[Node]], Graph]) -> set[Node]:
    """The candidates that `build` should apply: none if applying all does not lower the
    peak of `graph`; else all, dropping one at a time, those whose absence raises the peak
    least first, while the peak stays within PEAK_SLACK of the lowest."""
    from edgetune.compiler.memory import plan

    chosen = set(candidates)
    if not chosen:
        return chosen
    lowest = plan(build(chosen)).peak_bytes
    if lowest >= plan(graph).peak_bytes:
        return set()
    without = {n: plan(build(chosen - {n})).peak_bytes for n in chosen}
    limit = lowest * (1 + PEAK_SLACK)
    for n in sorted(chosen, key=lambda n: (without[n], -n.nbytes)):
        if plan(build(chosen - {n})).peak_bytes <= limit:
            chosen.discard(n)
    return chosen
