"""Fuse a language model's head with its cross-entropy (on the forward graph, before autodiff).

`linear(h, W) -> [reshape | slice]* -> log_softmax -> gather(target)` becomes
`vocab_log_prob(h', W, target)` (edgetune/compiler/ir/ops/vocab.py), where h' is h taken through the
same reshapes and slices. The logits of an LM are the largest values of its step (4 x 128
tokens x 49,152 words = 100 MB for SmolLM2, and again for log_softmax and for the gradient);
fused, they are computed a vocabulary slice at a time and never saved.

It fires only where the logits feed nothing but that loss, and the vocabulary axis is
never merged or cut on the way; anything else is left as it was.
"""
from __future__ import annotations

import os

from edgetune.compiler.ir.graph import Graph, Node
from edgetune.compiler.ir.ops.vocab import vocab_chunk
from edgetune.compiler.passes.dce import dce
from edgetune.compiler.passes.rewrite import rewrite


def fuse_vocab_log_prob(graph: Graph) -> Graph:
    users = graph.users()
    fusions = {n: match for n in graph.nodes if n.op == "gather" and (match := _match(n, users))}
    if not fusions:
        return graph

    def visit(b, n, inputs):
        if n not in fusions:
            return None
        linear, chain = fusions[n]
        h, w = linear.inputs
        for step in chain:  # the logits' reshapes and slices, applied to h instead
            if step.op == "reshape":
                h = b.emit("reshape", h, shape=tuple(step.attrs["shape"][:-1]) + (w.shape[1],))
            else:
                h = b.emit("slice", h, **step.attrs)
        b.meta = dict(linear.meta)
        packed = b.emit("vocab_log_prob", h, w, inputs[1], chunk=vocab_chunk(h.shape[0], w.shape[0], h.dtype.itemsize))
        b.meta = dict(n.meta)
        return b.emit("slice", packed, dim=1, start=0, end=1, step=1)

    fused = dce(rewrite(graph, visit))
    if os.environ.get("EDGETUNE_DEBUG"):
        logits = sum(linear.nbytes for linear, _ in fusions.values())
        print(f"[edgetune] vocab    fused LM head + cross-entropy: logits {logits / 2**20:.1f} MB never materialised")
    return fused


def _match(gather: Node, users: dict[Node, list[Node]]):
    """(linear, [reshape/slice nodes from the linear to the log_softmax]) or None."""
    log_softmax, target = gather.inputs
    if log_softmax.op != "log_softmax" or users[log_softmax] != [gather] or len(log_softmax.shape) != 2:
        return None
    if gather.attrs["dim"] != 1 or log_softmax.attrs["dim"] != 1 or tuple(target.shape) != (log_softmax.shape[0], 1):
        return None
    chain, x = [], log_softmax.inputs[0]
    while x.op in ("reshape", "slice") and users[x] == [chain[-1] if chain else log_softmax]:
        chain.append(x)
        x = x.inputs[0]
    if x.op != "linear" or len(x.inputs) != 2 or len(users[x]) != 1:
        return None
    vocab = x.inputs[1].shape[0]
    if not all(_keeps_vocab_axis(step, vocab) for step in chain):
        return None
    return x, chain[::-1]


def _keeps_vocab_axis(step: Node, vocab: int) -> bool:
    if step.op == "slice":
        return step.attrs["dim"] != len(step.shape) - 1
    return step.shape[-1] == vocab and step.inputs[0].shape[-1] == vocab
