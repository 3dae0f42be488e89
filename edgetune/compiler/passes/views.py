"""Chains of views folded into one view (on the scheduled step, before the in-place pass).

torch.export and the autodiff leave chains such as reshape -> reshape, or permute -> permute
that undoes itself: attention's output goes token-major -> [N, H, T, D] -> back, and each
linear flattens its input and unflattens its output. Each view is a call from the step's
Python (1-10 us at batch 1, where ViT makes some 80 a step). Here
  reshape(reshape(x, a), b) -> reshape(x, b)      reshape(x, x.shape) -> x
  permute(permute(x, p), q) -> permute(x, p[q])   permute(x, identity) -> x
The values are the same; a view reads the same storage as the chain did, so what the memory
plan and the in-place pass know of storages holds.
"""
from __future__ import annotations

from edgetune.compiler.ir.graph import Graph, Node
from edgetune.compiler.passes.dce import dce
from edgetune.compiler.passes.rewrite import rewrite


def fold_views(graph: Graph) -> Graph:
    if not any(n.op in ("reshape", "permute") for n in graph.nodes):
        return graph

    def visit(b, n: Node, inputs: tuple[Node, ...]):
        if n.op == "reshape":
            x = inputs[0]
            while x.op == "reshape":
                x = x.inputs[0]
            if tuple(x.shape) == tuple(n.shape):
                return x
            return b.emit("reshape", x, **n.attrs) if x is not inputs[0] else None
        if n.op == "permute":
            x, dims = inputs[0], tuple(n.attrs["dims"])
            while x.op == "permute":
                dims, x = tuple(x.attrs["dims"][d] for d in dims), x.inputs[0]
            if dims == tuple(range(len(dims))):
                return x
            return b.emit("permute", x, dims=dims) if x is not inputs[0] else None
        return None

    return dce(rewrite(graph, visit))
