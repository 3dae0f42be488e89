"""Fuse a language model's head with its cross-entropy (on the forward graph, before autodiff).

`linear(h, W) -> [reshape | slice]* -> log_softmax -> gather(target)` becomes
`vocab_log_prob(h', W, target)` (edgetune/compiler/ir/ops/vocab.py), where h' is h taken through the
same reshapes and slices. The logits of an LM are the largest values of its step (4 x 128
tokens x 49,152 words = 100 MB for SmolLM2, and again for log_softmax and for the gradient);
fused, they are computed a vocabulary slice at a time and never saved.

It fires only where the logits feed nothing but that loss, and the vocabulary axis is
never merged or cut on the way; anything else is left as it was.

Cross-entropy's ignore_index lowers to `where(ne(labels, c), labels, k)` for the target and
`where(ne(labels, c), -log_prob, 0)` for the loss. Where both are there, the op reads the
labels themselves with `ignore=c` and leaves those rows out of the head: on chat data (prompt
and padding ignored) about half the rows.
"""
from __future__ import annotations

import os

import torch

from edgetune.compiler.inputs import ignore_mask, not_equal_to
from edgetune.compiler.ir.graph import Graph, Node
from edgetune.compiler.ir.ops.vocab import vocab_chunk
from edgetune.compiler.passes.dce import dce
from edgetune.compiler.passes.rewrite import keep, rewrite


def fuse_vocab_log_prob(graph: Graph, kept: set[Node] = frozenset()) -> Graph:
    """`kept`: weights whose linear stays one (a LoRA rule's head: the adapter reads its input)."""
    users = graph.users()
    fusions = {n: match for n in graph.nodes
               if n.op == "gather" and (match := _match(n, users)) and match[0].inputs[1] not in kept}
    if not fusions:
        return graph
    ignored = {n: rule for n in fusions if (rule := _ignored_label(n, users))}
    labels = {rule[0] for rule in ignored.values()}
    new_labels: dict[Node, Node] = {}

    def visit(b, n, inputs):
        if n in labels:
            new_labels[n] = keep(b, n, inputs)
            return new_labels[n]
        if n not in fusions:
            return None
        target, rule = inputs[1], {}
        if n in ignored:
            label, c = ignored[n]
            target, rule = b.emit("reshape", new_labels[label], shape=tuple(target.shape)), {"ignore": c}
        linear, chain = fusions[n]
        h, w = linear.inputs
        for step in chain:  # the logits' reshapes and slices, applied to h instead
            if step.op == "reshape":
                h = b.emit("reshape", h, shape=tuple(step.attrs["shape"][:-1]) + (w.shape[1],))
            else:
                h = b.emit("slice", h, **step.attrs)
        b.meta = dict(linear.meta)
        packed = b.emit("vocab_log_prob", h, w, target, chunk=vocab_chunk(h.shape[0], w.shape[0], h.dtype.itemsize),
                        **rule)
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


def _ignored_label(gather: Node, users: dict[Node, list[Node]]) -> tuple[Node, int] | None:
    """(labels, c) where the gather's target is where(ne(labels, c), labels, k) through reshapes,
    and its value is read only through reshapes and a negation, by where(ne(labels, c), ., 0):
    the rows labelled c count for nothing in the loss. Else None."""
    target = gather.inputs[1]
    while target.op == "reshape":
        target = target.inputs[0]
    if target.op != "where" or (c := ignore_mask(target)) is None:
        return None
    labels, value = target.inputs[1], gather
    while len(users[value]) == 1 and users[value][0].op in ("reshape", "neg"):
        value = users[value][0]
    if len(users[value]) != 1 or tuple(value.shape) != tuple(labels.shape):
        return None
    mask = users[value][0]
    if mask.op != "where" or mask.inputs[1] is not value or not_equal_to(mask.inputs[0], labels) != c:
        return None
    return (labels, c) if _is_zero(mask.inputs[2]) and tuple(mask.shape) == tuple(value.shape) else None


def _is_zero(n: Node) -> bool:
    return n.op == "const" and torch.as_tensor(n.attrs["value"]).eq(0).all().item()


def _keeps_vocab_axis(step: Node, vocab: int) -> bool:
    if step.op == "slice":
        return step.attrs["dim"] != len(step.shape) - 1
    return step.shape[-1] == vocab and step.inputs[0].shape[-1] == vocab
