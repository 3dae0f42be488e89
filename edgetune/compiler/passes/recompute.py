"""Recompute cheap forward values in the backward instead of keeping them (rematerialization).

In full backprop through conv -> BN -> ReLU6 the step keeps two maps per layer: the conv
output (the BN weight's gradient reads it) and the activation (the next conv's weight
gradient and the ReLU6's own gradient read it). The activation is two cheap elementwise ops
away from the conv output, so the backward can redo them right before it needs the result:
one map per layer is kept instead of two. The same holds for a Llama MLP's SiLU,
x * sigmoid(x) on the gate projection's output (seen through a reshape): the backward keeps
the projection and redoes the sigmoid and the product, 2 of the MLP's 4 kept maps
(SmolLM2-135M under lm-sparse:6: a measured step peak of 243 MB became 208 MB).

A value is recomputed only from parameters, constants and values the backward keeps anyway,
and only where that lowers the predicted peak (each recompute costs its elementwise passes
again). Same kernels on the same inputs: the numbers do not change.
"""
from __future__ import annotations

from edgetune.compiler.ir.graph import Graph, Node
from edgetune.compiler.memory import saved_for_backward, storage_of
from edgetune.compiler.passes.rewrite import fewest_for_lowest_peak, is_backward, keep, rewrite

# Elementwise (or per-channel affine) ops: redoing one costs a pass over its output.
CHEAP = {"batch_norm", "hardtanh", "relu", "silu", "sigmoid", "tanh", "gelu", "add", "sub", "mul", "neg",
         "bn_scale", "fold_bn_weight", "fold_bn_bias"}
MAX_CHAIN = 3


def recompute_cheap(graph: Graph) -> Graph:
    saved = saved_for_backward(graph.nodes)
    viewed = _read_through_views(graph)
    # In graph order, so that whether a kept input could be recomputed itself is known before
    # its readers ask.
    chains: dict[Node, list[Node]] = {}
    for v in graph.nodes:
        if v in saved and v not in viewed and (c := _chain(v, saved, chains, MAX_CHAIN)):
            chains[v] = c

    def recomputed(values: set[Node]) -> Graph:
        return with_recompute(graph, {v: chains[v] for v in values})

    chosen = fewest_for_lowest_peak(graph, set(chains), recomputed, copy_of=lambda n: n.meta.get("recompute_of"))
    return recomputed(chosen) if chosen else graph


def _chain(v: Node, saved: set[Node], chains: dict[Node, list[Node]], depth: int) -> list[Node] | None:
    """The forward nodes that recompute `v` (inputs first), or None. Their inputs are leaves,
    or values the backward keeps anyway that no recompute can replace."""
    if depth == 0 or v.op not in CHEAP or is_backward(v):
        return None
    chain: list[Node] = []
    for i in v.inputs:
        if _kept_anyway(i, saved, chains):
            continue
        # An input that may be recomputed is redone too (SiLU's x * sigmoid(x) reads a sigmoid
        # its backward keeps), and so is one that nothing keeps.
        sub = _chain(i, saved, chains, depth - 1)
        if sub is None:
            return None
        chain += [n for n in sub if n not in chain]
    return chain + [v]


def _kept_anyway(i: Node, saved: set[Node], chains: dict[Node, list[Node]]) -> bool:
    """A leaf, or a value (or a view of one: a reshaped projection) that the backward keeps and
    that cannot be recomputed (not cheap, or cheap on inputs nothing keeps: a LoRA-adapted
    projection's sum)."""
    base = storage_of(i)
    return i.op in ("input", "const") or (base in saved and base not in chains)


def _read_through_views(graph: Graph) -> set[Node]:
    """Storages the backward reads through a forward view (kept: the view holds them)."""
    return {storage_of(i) for n in graph.nodes if is_backward(n) for i in n.inputs
            if storage_of(i) is not i and not is_backward(i)}


def with_recompute(graph: Graph, chains: dict[Node, list[Node]], mark: dict | None = None) -> Graph:
    """Each backward reader of a chosen value reads a copy recomputed before the first of them;
    `mark`: {forward node: meta its copy gets besides recompute_of}."""
    again: dict[Node, Node] = {}

    def visit(b, n, inputs):
        if not is_backward(n) or not any(i in chains for i in inputs):
            return None
        for v in (i for i in inputs if i in chains and i not in again):
            for m in chains[v]:
                if m not in again:
                    b.meta = {**n.meta, "recompute_of": m.name, **(mark or {}).get(m, {})}
                    again[m] = b.redo(m, tuple(again.get(i, i) for i in m.inputs), name=f"{m.name}_again")
        b.meta = dict(n.meta)
        return keep(b, n, tuple(again.get(i, i) if i in chains else i for i in inputs))

    return rewrite(graph, visit)
