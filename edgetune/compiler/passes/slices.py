"""Partial channels keep only their slice: a weight trained on k of C input channels needs
only those k channels of its input, so the forward cuts them out (a compact copy) right
where the input is made, and the full input can die with the forward.
"""
from __future__ import annotations

from edgetune.compiler.ir.graph import Graph, Node, leaves_first
from edgetune.compiler.ir.ops import storage_of
from edgetune.compiler.passes.rewrite import MASK_GRADS, is_backward, keep, rewrite

TAKES = ("index_select", "slice")


def save_channel_slices(graph: Graph) -> Graph:
    takes = _hoistable(graph)
    if not takes:
        return graph
    by_source: dict[Node, list[Node]] = {}
    for t in takes:
        by_source.setdefault(t.inputs[0], []).append(t)
    saved: dict[Node, Node] = {}

    def visit(b, n, inputs):
        if n in by_source:
            x = keep(b, n, inputs)
            for t in by_source[n]:
                saved[t] = _cut(b, t, x)
            return x
        return saved.get(n)

    return rewrite(leaves_first(graph), visit)  # the channel indices (consts) must precede every cut


def channel_takes(graph: Graph) -> list[Node]:
    """Backward gathers/slices of a forward value (a partial weight's input channels)."""
    return [n for n in graph.nodes if n.op in TAKES and is_backward(n) and not is_backward(n.inputs[0])
            and (n.op == "slice" or not n.inputs[1].inputs)]


def read_whole(graph: Graph, skip: set[Node]) -> set[Node]:
    """Forward storages that a backward node outside `skip` reads other than through `skip`."""
    whole = set()
    for n in graph.nodes:
        if is_backward(n) and n not in skip:
            whole.update(storage_of(i) for i in n.inputs if i not in skip)
    return whole


def _hoistable(graph: Graph) -> list[Node]:
    """Takes of an input that nothing else in backward reads whole. An activation gradient
    reading it does not count: the bitmask pass that follows turns that read into bits."""
    takes = channel_takes(graph)
    whole = read_whole(graph, set(takes) | {n for n in graph.nodes if n.op in MASK_GRADS})
    return [t for t in takes if t.inputs[0] not in whole]


def _cut(b, take: Node, x: Node) -> Node:
    b.meta = dict(x.meta)
    if take.op == "index_select":
        out = b.emit("index_select", x, take.inputs[1], name=f"{x.name}_saved", **take.attrs)
    else:
        out = b.emit("copy", b.emit("slice", x, **take.attrs), name=f"{x.name}_saved")
    return out
