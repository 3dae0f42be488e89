"""The memory plan: lifetimes over the scheduled graph and the predicted peak of one step.

Parameters, buffers and the batch belong to the caller and are not counted; optimizer
state is persistent for the trainer's life and is. A view costs nothing but keeps the
value it views alive (as the runtime does, through references). A kernel's own scratch
memory counts while it runs: what edgetune.compiler.backends.scratch measured on this machine where
the caller passes it (`plan(graph, measured)`: the compiled step's plan), else the op's estimate.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from edgetune.compiler.ir.graph import Graph, Node
from edgetune.compiler.ir.ops import OPS, is_effect, storage_of


@dataclass
class MemoryPlan:
    order: list[Node]
    last_use: dict[Node, int]  # position after which the value is freed
    live_bytes: list[int]  # transient bytes live while each node runs
    state_bytes: int  # optimizer state, allocated once
    scratch_bytes: list[int]  # of live_bytes, what each node's kernel allocates besides its output

    @property
    def peak_bytes(self) -> int:
        return self.state_bytes + max(self.live_bytes, default=0)


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


def plan(graph: Graph, measured: Mapping[Node, int] | None = None) -> MemoryPlan:
    """Lifetimes and live bytes; `measured`: kernel scratch measured for some nodes."""
    last = last_uses(graph)
    frees: dict[int, list[Node]] = {}
    for n, pos in last.items():
        frees.setdefault(pos, []).append(n)
    live, live_bytes = 0, []
    scratch = [scratch_bytes(n, measured) for n in graph.nodes]
    for pos, n in enumerate(graph.nodes):
        if allocates(n):
            live += n.nbytes
        live_bytes.append(live + scratch[pos])
        live -= sum(m.nbytes for m in frees.get(pos, []) if allocates(m))
    state = sum(n.nbytes for n in graph.nodes if n.op == "input" and n.attrs.get("kind") == "state")
    return MemoryPlan(list(graph.nodes), last, live_bytes, state, scratch)


def scratch_bytes(node: Node, measured: Mapping[Node, int] | None = None) -> int:
    """What the node's kernel allocates besides its output while it runs."""
    if measured and node in measured:
        return measured[node]
    estimate = OPS[node.op].scratch
    return estimate(node) if estimate else 0


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
