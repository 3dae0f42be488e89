"""The memory plan: lifetimes over the scheduled graph and the predicted peak of one step.

Parameters, buffers and the batch belong to the caller and are not counted; optimizer
state is persistent for the trainer's life and is. A view costs nothing but keeps the
value it views alive (as the runtime does, through references). A kernel's own scratch
memory (where measured, e.g. depthwise input gradients) counts while it runs.
"""
from __future__ import annotations

from dataclasses import dataclass

from edgetune.ir.graph import Graph, Node
from edgetune.ir.ops import OPS, is_effect


@dataclass
class MemoryPlan:
    order: list[Node]
    last_use: dict[Node, int]  # position after which the value is freed
    live_bytes: list[int]  # transient bytes live while each node runs
    state_bytes: int  # optimizer state, allocated once

    @property
    def peak_bytes(self) -> int:
        return self.state_bytes + max(self.live_bytes, default=0)


def storage_of(node: Node) -> Node:
    """The node whose allocation `node` lives in (itself unless it is a view)."""
    while OPS[node.op].view:
        node = node.inputs[0]
    return node


def allocates(node: Node) -> bool:
    return node.op not in ("input", "const") and not OPS[node.op].view and not is_effect(node)


def last_uses(graph: Graph) -> dict[Node, int]:
    """For every allocating node, the last position where it (or a view of it) is read."""
    end = len(graph.nodes)
    last: dict[Node, int] = {}
    for pos, n in enumerate(graph.nodes):
        last.setdefault(storage_of(n), pos)
        for i in n.inputs:
            last[storage_of(i)] = pos
    for out in graph.outputs.values():
        last[storage_of(out)] = end
    return last


def plan(graph: Graph) -> MemoryPlan:
    last = last_uses(graph)
    frees: dict[int, list[Node]] = {}
    for n, pos in last.items():
        frees.setdefault(pos, []).append(n)
    live, live_bytes = 0, []
    for pos, n in enumerate(graph.nodes):
        if allocates(n):
            live += n.nbytes
        scratch = OPS[n.op].scratch
        live_bytes.append(live + (scratch(n) if scratch else 0))
        live -= sum(m.nbytes for m in frees.get(pos, []) if allocates(m))
    state = sum(n.nbytes for n in graph.nodes if n.op == "input" and n.attrs.get("kind") == "state")
    return MemoryPlan(list(graph.nodes), last, live_bytes, state)


def saved_for_backward(nodes: list[Node]) -> set[Node]:
    """Forward allocations that a backward node reads (directly or through a view)."""
    saved = set()
    for n in nodes:
        if "grad_of" not in n.meta:
            continue
        for i in n.inputs:
            base = storage_of(i)
            if "grad_of" not in base.meta and allocates(base):
                saved.add(base)
    return saved
