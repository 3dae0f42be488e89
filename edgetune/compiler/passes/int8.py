"""Hold frozen linear weights as int8 (on the forward graph, before autodiff).

A parameter that the scheme does not train and that only linear layers use as their weight
becomes two step inputs, its int8 values and per-row scales (kinds "int8" / "int8_scale",
bound by the trainer), and each of its linears a `linear_int8` (edgetune/compiler/ir/ops/quant.py).
Numbers change by the quantization error (per row, at most half a step of max|w| / 127);
what is trained stays float. A LoRA layer's frozen base weight qualifies too (QLoRA's idea).
"""
from __future__ import annotations

import torch

from edgetune.compiler.ir.graph import Graph, Node
from edgetune.compiler.passes.rewrite import rewrite


def int8_frozen_linears(graph: Graph, trained: set[Node]) -> Graph:
    users = graph.users()
    chosen = {n for n in graph.nodes if n.op == "input" and n.attrs.get("kind") == "param"
              and n not in trained and _only_linear_weight(n, users[n])}
    quantized: dict[Node, tuple[Node, Node]] = {}

    def visit(b, n, inputs):
        if n in chosen:
            target = n.attrs["target"]
            q = b.input(n.name + "_int8", n.shape, torch.int8, kind="int8", target=target)
            scale = b.input(n.name + "_scale", (n.shape[0], 1), n.dtype, kind="int8_scale", target=target)
            quantized[n] = (q, scale)
            return q
        if n.op == "linear" and n.inputs[1] in chosen:
            return b.emit("linear_int8", inputs[0], *quantized[n.inputs[1]], *inputs[2:])
        return None

    return rewrite(graph, visit) if chosen else graph


def _only_linear_weight(w: Node, users: list[Node]) -> bool:
    return (len(w.shape) == 2 and w.is_float and bool(users)
            and all(u.op == "linear" and u.inputs[1] is w and w not in (u.inputs[0], *u.inputs[2:]) for u in users))
