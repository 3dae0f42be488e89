"""Values every step computes the same: hoisted out of the torch backend's step, computed once.

A frozen BN's scale, gamma / sqrt(var + eps), reads only tensors that no step writes (frozen
parameters, eval-mode statistics, constants), so each step recomputes the same numbers: three
small kernels per BN, about 150 calls a step on MobileNetV2 at batch 1, where each call's
overhead is the cost. The torch backend computes such values in a prologue of their own and
keeps them between steps (`Invariants`), recomputing them when a tensor they read has changed
in place (a loaded checkpoint, a user's edit: torch's version counter moves) or is another
tensor than last time. A write through `.data` bypasses the version counter and goes unseen:
write frozen tensors under `torch.no_grad()` instead (as `load_state_dict` does).

Kept values stay in memory between steps, which the memory plan does not count, so they are
held to 1% of the step's planned peak (64 KiB at least; a view of a held tensor costs
nothing), the smallest first: a per-channel scale saves as many calls as a folded weight for
a fraction of its bytes. What does not fit (a frozen conv weight folded with its BN's scale,
mostly) stays in the step, computed from the kept values it reads. On MobileNetV2-0.35 at
batch 1 keeping the folded weights too made the step 4% faster again, for 17% more memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from edgetune.compiler.inputs import KINDS
from edgetune.compiler.ir.graph import Graph, Node
from edgetune.compiler.ir.ops import is_effect, storage_of, written_storages

MIN_BUDGET = 64 << 10
PEAK_SHARE = 0.01


def budget_for(peak_bytes: int) -> int:
    """Memory the kept values may take: 1% of the step's planned peak, at least 64 KiB."""
    return max(MIN_BUDGET, int(peak_bytes * PEAK_SHARE))


@dataclass
class Hoisted:
    """The invariant part of a step: `kept` (values the step reads, in graph order),
    `prologue` (the nodes that compute them, in graph order) and `only_once` (the nodes the
    step itself need not compute: the prologue's, but those the step reads too)."""

    kept: list[Node] = field(default_factory=list)
    prologue: list[Node] = field(default_factory=list)
    only_once: set[Node] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.kept)

    @property
    def reads(self) -> list[Node]:
        """The graph inputs the prologue reads, in the order it first reads them."""
        return list(dict.fromkeys(i for n in self.prologue for i in n.inputs if i.op == "input"))


def hoist(graph: Graph, budget: int = MIN_BUDGET) -> Hoisted:
    """The values to keep: the smallest first, as many as fit in `budget` bytes (views of held
    tensors are free), each saving its kernel calls at every step."""
    invariant = _invariant_nodes(graph)
    users = graph.users()
    sizes = sorted({_new_bytes(n) for n in invariant})
    (kept, in_step), low, high = (set(), set()), 0, len(sizes) - 1
    while low <= high:  # the largest size limit under which the kept values fit
        mid = (low + high) // 2
        candidate = _kept_under(graph, users, invariant, sizes[mid])
        if sum(map(_new_bytes, candidate[0])) <= budget:
            (kept, in_step), low = candidate, mid + 1
        else:
            high = mid - 1
    prologue = _needed(graph, kept, invariant)
    return Hoisted([n for n in graph.nodes if n in kept], prologue, set(prologue) - in_step)


def _kept_under(graph: Graph, users: dict[Node, list[Node]], invariant: set[Node],
                limit: int) -> tuple[set[Node], set[Node]]:
    """(kept, computed in the step): the invariant values the step reads, each kept if it holds
    at most `limit` bytes, else computed in the step from its own inputs (which the step then
    reads, and so on)."""
    outputs = set(graph.outputs.values())
    in_step = {n for n in graph.nodes if n not in invariant} | outputs
    kept = set()
    for n in reversed(graph.nodes):  # a value's readers are decided before it is
        if n not in invariant or n.op == "const" or not (n in outputs or any(u in in_step for u in users[n])):
            continue
        if _new_bytes(n) <= limit and n not in outputs:
            kept.add(n)
        else:
            in_step.add(n)
    return kept, in_step


def _invariant_nodes(graph: Graph) -> set[Node]:
    """Non-input nodes whose value is the same at every step: pure ops of constants and of
    held inputs, where nothing in the step writes the value or what it was read from."""
    written = _written(graph)
    invariant: set[Node] = set()
    for n in graph.nodes:
        if storage_of(n) in written:
            continue
        if n.op == "const":
            invariant.add(n)
        elif n.op == "input":
            kind = KINDS.get(n.attrs.get("kind"))
            if kind is not None and not kind.per_step:
                invariant.add(n)
        elif not is_effect(n) and n.inputs and all(i in invariant for i in n.inputs):
            invariant.add(n)
    return {n for n in invariant if n.op != "input"}


def _written(graph: Graph) -> set[Node]:
    """The storages some op of the step writes."""
    return set().union(*map(written_storages, graph.nodes))


def _new_bytes(n: Node) -> int:
    """Memory a kept `n` holds that nothing else does: none for a view of a held tensor."""
    base = storage_of(n)
    return 0 if base.op in ("input", "const") else base.nbytes


def _needed(graph: Graph, kept: set[Node], invariant: set[Node]) -> list[Node]:
    needed, todo = set(), list(kept)
    while todo:
        n = todo.pop()
        if n in needed or n.op in ("input", "const"):
            continue
        needed.add(n)
        todo.extend(i for i in n.inputs if i in invariant)
    return [n for n in graph.nodes if n in needed]


class Invariants:
    """The kept values, recomputed by `compute(*reads)` when a tensor read is not the one
    read last time or has been written in place since."""

    def __init__(self, compute: Callable[..., tuple]) -> None:
        self.compute = compute
        self.reads: tuple = ()
        self.versions: tuple | None = None
        self.values: tuple = ()

    def __call__(self, *reads: Any) -> tuple:
        versions = _versions(reads)
        if versions is None or versions != self.versions or not _same(reads, self.reads):
            self.values = self.compute(*reads)
            self.reads, self.versions = reads, versions
        return self.values


def _versions(tensors: tuple) -> tuple | None:
    try:
        return tuple(t._version for t in tensors)
    except RuntimeError:  # an inference tensor keeps no version counter: never trust a cache
        return None


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))
