"""Bit-packed activation masks: a ReLU/ReLU6 backward needs 1 bit per element, not a float.

Where an activation's output is kept only for its own backward, the forward packs
"did the gradient pass here" into ceil(n/8) bytes right after the activation, and the
float output can die as soon as the forward is done with it (32x less for float32).

A mask costs time (a pack in the forward, an unpack in the backward, about a tenth of a
step each on MobileNetV2) and pays off only where its float activation would be live when
the step peaks. So the pass packs only the activations that lower the predicted peak (by
more than passes/rewrite.PEAK_SLACK).
"""
from __future__ import annotations

from edgetune.compiler.ir.graph import Graph, Node
from edgetune.compiler.ir.ops import storage_of
from edgetune.compiler.passes.rewrite import MASK_GRADS, fewest_for_lowest_peak, is_backward, keep, rewrite
from edgetune.compiler.passes.slices import read_whole



def bitmask_activations(graph: Graph) -> Graph:
    grads = _maskable(graph)

    def masked(activations: set[Node]) -> Graph:
        return _with_masks(graph, {g: y for g, y in grads.items() if y in activations})

    chosen = fewest_for_lowest_peak(graph, set(grads.values()), masked)
    return masked(chosen) if chosen else graph


def _with_masks(graph: Graph, grads: dict[Node, Node]) -> Graph:
    """Pack each activation `grads` names right after it; its gradients read the bits."""
    rule = {y: g for g, y in grads.items()}
    packs: dict[Node, Node] = {}

    def visit(b, n, inputs):
        if n in rule:
            y = keep(b, n, inputs)
            packs[n] = b.emit("pack_mask", y, rule=rule[n].op, rule_attrs=dict(rule[n].attrs), name=f"{n.name}_mask")
            return y
        if n in grads:
            return b.emit("masked_grad", inputs[0], packs[grads[n]], name=f"{n.name}_bits")
        return None

    return rewrite(graph, visit)


def _maskable(graph: Graph) -> dict[Node, Node]:
    """Activation-grad node -> its saved output, where nothing else in backward reads it."""
    grads = {n: n.inputs[1] for n in graph.nodes if n.op in MASK_GRADS and is_backward(n)}
    whole = read_whole(graph, set(grads))
    same_rule = {}
    for g, y in grads.items():
        same_rule.setdefault(y, set()).add((g.op, tuple(g.attrs.items())))
    return {g: y for g, y in grads.items() if storage_of(y) is y and y not in whole and len(same_rule[y]) == 1}
