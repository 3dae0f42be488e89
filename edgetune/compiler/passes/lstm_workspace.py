"""An LSTM layer whose backward follows keeps oneDNN's workspace for it (ir/ops/recurrent.py).

Without it the backward runs the layer's forward again for the workspace: a third of the
layer's forward + backward. Keeping it does not raise the peak of a step whose peak is the
LSTM's backward (a classifier on top of an LSTM: the backward needs the workspace at that
point either way; measured, eager and the step peaked within 6% of each other both ways); it
raises it where the peak comes later than the forward and earlier than the LSTM's backward.
The memory plan counts the workspace with the layer's output from the forward to the backward.
"""
from __future__ import annotations

from dataclasses import replace

from edgetune.compiler.ir.graph import Graph, Node
from edgetune.compiler.ir.ops.recurrent import workspace_bytes
from edgetune.compiler.passes.rewrite import rewrite


def keep_lstm_workspace(graph: Graph) -> Graph:
    backward_of = {n.inputs[1] for n in graph.nodes if n.op == "lstm_layer_grad"}
    sizes = {n: size for n in backward_of if (size := workspace_bytes(n.inputs[0], n.inputs[4], n.attrs["reverse"]))}
    if not sizes:
        return graph

    def visit(b, n: Node, inputs: tuple[Node, ...]):
        if n not in sizes:
            return None
        kept = replace(n, inputs=inputs, attrs={**n.attrs, "workspace": sizes[n]})
        b.nodes.append(kept)
        return kept

    return rewrite(graph, visit)
