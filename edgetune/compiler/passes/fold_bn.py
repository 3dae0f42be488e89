"""Fold eval-mode batch norm into the frozen conv before it (on the forward graph, before autodiff).

An eval-mode BN is a per-channel affine map. After a conv whose weight the scheme does not
train, with the BN's scale and running statistics frozen too, conv + BN is one conv with
weight w * s and bias beta - mean * s (s = gamma / sqrt(var + eps)); beta may still train,
through that bias. The BN's pass over the activation (and, in the backward, its multiply of
the gradient) becomes one pass over the weight, so the fold is made where the weight is no
larger than the conv's output and its copy does not raise the forward's peak. The folded
weight is computed in the step from the frozen tensors, never cached: a loaded checkpoint
takes effect at once.
Numbers change by rounding only.
"""
from __future__ import annotations

import math

from edgetune.compiler.ir.graph import Graph, Node
from edgetune.compiler.memory import MemoryPlan, plan
from edgetune.compiler.passes.rewrite import rewrite


def fold_frozen_batchnorm(graph: Graph, trained: set[Node]) -> Graph:
    users = graph.users()
    convs = {bn.inputs[0]: bn for bn in graph.nodes if _foldable(bn, users, trained)}
    # A folded weight is a new buffer while its conv runs: where that raises the forward's
    # peak (a conv at the peak with a large weight), that conv keeps its BN.
    ceiling = plan(graph).peak_bytes
    while True:
        folded, weights = _folded(graph, convs)
        folded_plan = plan(folded)
        at_peak = _folded_at_peak(folded_plan) if folded_plan.peak_bytes > ceiling else []
        if not at_peak:
            return folded
        for w in at_peak:
            convs.pop(weights[w], None)


def _folded_at_peak(p: MemoryPlan) -> list[Node]:
    """The folded weights and biases live when the forward peaks."""
    peak = max(range(len(p.live_bytes)), key=p.live_bytes.__getitem__)
    return [n for pos, n in enumerate(p.order)
            if n.op in ("bn_scale", "fold_bn_weight", "fold_bn_bias") and pos <= peak <= p.last_use[n]]


def _folded(graph: Graph, convs: dict[Node, Node]) -> tuple[Graph, dict[Node, Node]]:
    """`graph` with each conv -> BN pair of `convs` as one conv; {folded weight or bias: its conv}."""
    conv_inputs: dict[Node, tuple[Node, ...]] = {}
    weights: dict[Node, Node] = {}

    def visit(b, n, inputs):
        if n in convs:
            conv_inputs[n] = inputs
            return n  # emitted as the folded conv at its BN, its only reader
        if n in convs.values():
            conv = n.inputs[0]
            x, w = conv_inputs[conv]
            _, mean, var, gamma, beta = inputs
            eps = n.attrs["eps"]
            b.meta = dict(conv.meta)
            scale = b.emit("bn_scale", gamma, var, eps=eps, name=f"{gamma.name}_scale")
            weight = b.emit("fold_bn_weight", w, scale, name=f"{w.name}_folded")
            bias = b.emit("fold_bn_bias", beta, mean, scale, name=f"{beta.name}_folded")
            weights[weight] = weights[bias] = weights[scale] = conv
            return b.emit("conv", x, weight, bias, **conv.attrs)
        return None

    return (rewrite(graph, visit) if convs else graph), weights


def _foldable(bn: Node, users: dict[Node, list[Node]], trained: set[Node]) -> bool:
    if bn.op != "batch_norm" or bn.inputs[0].op != "conv":
        return False
    conv, (mean, var, gamma) = bn.inputs[0], bn.inputs[1:4]
    weight = conv.inputs[1]
    return (len(conv.inputs) == 2 and users[conv] == [bn]
            and all(_frozen_leaf(t, trained) for t in (weight, gamma))
            and all(_running_statistic(t) for t in (mean, var))
            and math.prod(weight.shape) <= math.prod(conv.shape))


def _frozen_leaf(n: Node, trained: set[Node]) -> bool:
    return n.op == "const" or (n.op == "input" and n.attrs.get("kind") == "param" and n not in trained)


def _running_statistic(n: Node) -> bool:
    # Eval mode reads the buffers as they are; train mode computes batch statistics instead.
    return n.op == "input" and n.attrs.get("kind") == "buffer"
