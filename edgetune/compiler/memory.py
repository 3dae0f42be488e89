"""The memory plan: lifetimes over the scheduled graph and the predicted peak of one step.

Parameters, buffers and the batch belong to the caller and are not counted; optimizer
state is persistent for the trainer's life and is. A view costs nothing but keeps the
value it views alive (as the runtime does, through references). A kernel's own scratch
memory counts while it runs: what edgetune.compiler.backends.scratch measured on this machine where
the caller passes it (`plan(graph, measured)`: the compiled step's plan), else the op's estimate.
What a value carries beside its entries (OpDef.carries: an LSTM layer's oneDNN workspace) lives
and counts with it (`value_bytes`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from edgetune.compiler.ir.graph import Graph, Node
from edgetune.compiler.ir.ops import OPS, carried_bytes, is_effect, storage_of


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

    def peak_by_layer(self) -> list[tuple[str, int]]:
        """What the peak is made of: bytes per layer (the module a value was computed for, or
        whose optimizer state it is), largest first; the kernel running at the peak counts
        its scratch to its own layer."""
        at = max(range(len(self.live_bytes)), key=self.live_bytes.__getitem__, default=None)
        layers: dict[str, int] = {}
        for n in self.order:
            if n.op == "input" and n.attrs.get("kind") == "state":
                layer = n.attrs["target"].rpartition(":")[0].rpartition(".")[0]
                layers[layer] = layers.get(layer, 0) + n.nbytes
        if at is not None:
            for pos, n in enumerate(self.order[:at + 1]):
                if allocates(n) and self.last_use.get(n, pos) >= at:
                    layer = n.meta.get("module", "?")
                    layers[layer] = layers.get(layer, 0) + value_bytes(n)
            running = self.order[at].meta.get("module", "?")
            layers[running] = layers.get(running, 0) + self.scratch_bytes[at]
        return sorted(((k, v) for k, v in layers.items() if v), key=lambda kv: -kv[1])


class BudgetError(ValueError):
    """A step (or every scheme searched) needs more memory than the budget."""


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_bytes(budget: str | int) -> int:
    """'40MB' -> bytes (an int passes through). MB means 2**20 bytes, as in every report
    edgetune prints. A string needs its unit: '12' could mean bytes or MB."""
    if isinstance(budget, int) and not isinstance(budget, bool):
        value = budget
    else:
        units = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
        text = str(budget).strip().upper()
        number = text.rstrip("BIGKM") or "x"
        if text == number and _is_number(number):
            raise ValueError(f"the budget {budget!r} has no unit: write {text}MB (or KB, GB; B for bytes)")
        try:
            value = int(float(number) * units[text[len(number):]])
        except (ValueError, KeyError):
            raise ValueError(f"cannot read the budget {budget!r}: write it like 40MB, 512KB or 1.5GB") from None
    if value <= 0:
        raise ValueError(f"the budget must be positive, got {budget!r}")
    return value


def value_bytes(node: Node) -> int:
    """The memory a node's value holds while it lives: its entries and what it carries."""
    return node.nbytes + carried_bytes(node)


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
            live += value_bytes(n)
        live_bytes.append(live + scratch[pos])
        live -= sum(value_bytes(m) for m in frees.get(pos, []) if allocates(m))
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
