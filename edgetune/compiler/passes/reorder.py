"""Operator reordering with in-place update (the Tiny Training Engine's): each parameter
update runs as soon as its gradient exists and nothing else still needs the old weight,
so the gradient buffer dies at once instead of every gradient living until the end.

The scalar conditions an update is guarded by (`compile(on_nonfinite="skip")`: is its
gradient finite?) move with it, each right after the last value it reads.
"""
from __future__ import annotations

import torch

from edgetune.compiler.ir.graph import Graph, Node
from edgetune.compiler.ir.ops import is_effect, mutated_inputs
from edgetune.compiler.ir.ops import storage_of


def update_early(graph: Graph) -> Graph:
    conditions = _conditions(graph)
    effects = [n for n in graph.nodes if is_effect(n)]
    order = [n for n in graph.nodes if not is_effect(n) and n not in conditions]
    position = {n: k for k, n in enumerate(order)}
    last_read = {storage_of(i): k for k, n in enumerate(order) for i in n.inputs}
    after: dict[int, list[Node]] = {}
    for c in (n for n in graph.nodes if n in conditions):  # in graph order: a condition's inputs come first
        position[c] = max((position[i] for i in c.inputs if i in position), default=-1)
        after.setdefault(position[c], []).append(c)
    for e in effects:
        after.setdefault(_earliest(e, position, last_read), []).append(e)
    nodes = list(after.get(-1, []))
    for k, n in enumerate(order):
        nodes.append(n)
        nodes.extend(after.get(k, []))
    return Graph(nodes, graph.outputs)


def _conditions(graph: Graph) -> set[Node]:
    """Scalar bools that only effects, or other such conditions, read: what guards an update."""
    users = graph.users()
    found: set[Node] = set()
    for n in reversed(graph.nodes):
        if (n.shape == () and n.dtype == torch.bool and n.op not in ("input", "const") and not is_effect(n)
                and users[n] and all(is_effect(u) or u in found for u in users[n])):
            found.add(n)
    return found


def _earliest(effect: Node, position: dict[Node, int], last_read: dict[Node, int]) -> int:
    """Position after which `effect` may run: its inputs exist and no later node reads what it mutates."""
    ready = max((position[i] for i in effect.inputs if i in position), default=-1)
    readers = (last_read.get(storage_of(effect.inputs[k]), -1) for k in mutated_inputs(effect))
    return max(ready, *readers)
