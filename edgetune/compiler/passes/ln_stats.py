"""Keep a layer norm's row statistics from its forward instead of computing them again.

A layer norm's backward needs each row's mean and 1/std (`ln_stats`). ATen's forward kernel
computes them on its way to the output and drops them; computed again in the backward, they
cost another pass over the input and an output-sized buffer (ViT's norms at batch 8: 241 us a
norm for the output and the statistics again, 118 us kept this way; 41 and 31 at batch 1).
Here the forward's `layer_norm` becomes `layer_norm_stats`, whose buffer holds the output and
then the statistics: the output is a view of it, and the statistics (two numbers a row) are
copied out at once, so that the output's memory is freed when the output dies, as before.
"""
from __future__ import annotations

import math

from edgetune.compiler.ir.graph import Graph, Node
from edgetune.compiler.passes.rewrite import rewrite


def keep_ln_stats(graph: Graph) -> Graph:
    forward = {_key(n): n for n in graph.nodes if n.op == "layer_norm"}
    recomputed = {n for n in graph.nodes if n.op == "ln_stats" and _key(n) in forward}
    if not recomputed:
        return graph
    norms = {forward[_key(n)] for n in recomputed}
    kept: dict[Node, Node] = {}  # a forward layer_norm -> its statistics, copied out

    def visit(b, n, inputs):
        if n in norms:
            x, size = inputs[0], math.prod(n.shape)
            rows = size // math.prod(n.attrs["normalized_shape"])
            packed = b.emit("layer_norm_stats", *inputs, **n.attrs, name=f"{n.name}_with_stats")
            stats = b.emit("slice", packed, dim=0, start=size, end=size + 2 * rows, step=1)
            kept[n] = b.emit("copy", b.emit("reshape", stats, shape=(2, rows)), name=f"{n.name}_stats")
            return b.emit("reshape", b.emit("slice", packed, dim=0, start=0, end=size, step=1), shape=tuple(x.shape))
        if n in recomputed:
            return kept[forward[_key(n)]]
        return None

    return rewrite(graph, visit)


def _key(n: Node) -> tuple:
    """What the statistics depend on: the input and the normalization's attributes."""
    return n.inputs[0], n.attrs["normalized_shape"], n.attrs["eps"]
