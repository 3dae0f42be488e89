"""Operator reordering with in-place update (the Tiny Training Engine's): each parameter
update runs as soon as its gradient exists and nothing else still needs the old weight,
so the gradient buffer dies at once instead of every gradient living until the end.
"""
from __future__ import annotations

from edgetune.ir.graph import Graph, Node
from edgetune.ir.ops import is_effect, mutated_inputs
from edgetune.memory import storage_of


def update_early(graph: Graph) -> Graph:
    effects = [n for n in graph.nodes if is_effect(n)]
    order = [n for n in graph.nodes if not is_effect(n)]
    position = {n: k for k, n in enumerate(order)}
    after: dict[int, list[Node]] = {}
    for e in effects:
        after.setdefault(_earliest(e, order, position), []).append(e)
    nodes = list(after.get(-1, []))
    for k, n in enumerate(order):
        nodes.append(n)
        nodes.extend(after.get(k, []))
    return Graph(nodes, graph.outputs)


def _earliest(effect: Node, order: list[Node], position: dict[Node, int]) -> int:
    """Position after which `effect` may run: its inputs exist and no later node reads what it mutates."""
    mutated = {storage_of(effect.inputs[k]) for k in mutated_inputs(effect)}
    ready = max((position[i] for i in effect.inputs if i in position), default=-1)
    last_reader = max((k for k, n in enumerate(order) if any(storage_of(i) in mutated for i in n.inputs)),
                      default=-1)
    return max(ready, last_reader)
