"""Elementwise ops write their result over an input that dies with them.

After the schedule is final, an elementwise op (an activation, a residual add, a gradient
sum, a BN's input gradient) whose input has no reader after it computes into that input's
memory: one allocation less, and the output and input are never live together (a ReLU6
after a conv no longer doubles the conv's output while it runs). The numbers are the same:
the kernels compute the same function, only into other memory.
"""
from __future__ import annotations

from edgetune.compiler.ir.graph import Graph, Node
from edgetune.compiler.ir.ops import OPS
from edgetune.compiler.memory import allocates, last_uses, storage_of
from edgetune.compiler.passes.rewrite import rewrite

# Either operand of these can take the result (x + y and y + x round the same).
COMMUTATIVE = ("add", "mul")


def inplace_elementwise(graph: Graph) -> Graph:
    last = last_uses(graph)
    results = {storage_of(out) for out in graph.outputs.values()}
    position = {n: pos for pos, n in enumerate(graph.nodes)}

    def dies_here(x: Node, n: Node) -> bool:
        return (allocates(x) and last[x] == position[n] and x not in results
                and x.shape == n.shape and x.dtype == n.dtype
                and sum(storage_of(i) is x for i in n.inputs) == 1)

    def visit(b, n, inputs):
        if f"{n.op}_inplace" not in OPS:
            return None
        for k in (0, 1) if n.op in COMMUTATIVE else (0,):
            if dies_here(n.inputs[k], n):
                rest = inputs[:k] + inputs[k + 1:]
                return b.emit(f"{n.op}_inplace", inputs[k], *rest, name=n.name, **n.attrs)
        return None

    return rewrite(graph, visit)
