"""A recurrent layer whose backward follows keeps what its backward reads (ir/ops/recurrent.py,
ir/ops/gru.py, ir/ops/lstm_proj.py): an LSTM layer oneDNN's workspace, a GRU layer its steps'
gates, a projected LSTM layer its steps' gates and cells.

Without it the backward runs the layer's forward again: for an LSTM a third of the layer's
forward + backward. Keeping it does not raise the peak of a step whose peak is the layer's
backward (a classifier on top of an LSTM: the backward needs the workspace at that point
either way; measured, eager and the step peaked within 6% of each other both ways); it raises
it where the peak comes later than the forward and earlier than the layer's backward. The
memory plan counts the workspace with the layer's output from the forward to the backward.
"""
from __future__ import annotations

from dataclasses import replace

from edgetune.compiler.ir.graph import Graph, Node
from edgetune.compiler.ir.ops import gru, lstm_proj, recurrent
from edgetune.compiler.passes.rewrite import rewrite

# A layer's backward op -> the size of the workspace its forward node would keep (0: none).
_WORKSPACE_BYTES = {
    "lstm_layer_grad": lambda n: recurrent.workspace_bytes(n.inputs[0], n.inputs[4], n.attrs["reverse"]),
    "gru_layer_grad": lambda n: gru.workspace_bytes(n.inputs[0], n.inputs[3]),
    "lstm_proj_layer_grad": lambda n: lstm_proj.workspace_bytes(n.inputs[0], n.inputs[7]),
}


def keep_rnn_workspace(graph: Graph) -> Graph:
    forward_of = {n.inputs[1]: _WORKSPACE_BYTES[n.op] for n in graph.nodes if n.op in _WORKSPACE_BYTES}
    sizes = {n: size for n, bytes_of in forward_of.items() if (size := bytes_of(n))}
    if not sizes:
        return graph

    def visit(b, n: Node, inputs: tuple[Node, ...]):
        if n not in sizes:
            return None
        kept = replace(n, inputs=inputs, attrs={**n.attrs, "workspace": sizes[n]})
        b.nodes.append(kept)
        return kept

    return rewrite(graph, visit)
