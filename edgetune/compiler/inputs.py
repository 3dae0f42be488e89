"""The step's inputs: one table that says what every input of a training graph is.

Every `input` node has a kind (`attrs["kind"]`) that says where its value comes from and
whether it changes from step to step. Held inputs are tensors that live across steps (the
model's parameters and buffers, the Trainer's optimizer state, LoRA adapters and int8
weights); they are bound once and updated in place. Per-step inputs (the batch and the
hyperparameters) come with each call. The Trainer binds both through `Bindings`; a backend
or an exporter reads the same table (`step_inputs`) to name, order and feed them.

A new kind of step input (say, a mask for a pruned weight) is one entry in KINDS, one
`held` map in the Trainer and the pass that creates its input nodes: nothing else branches
on kinds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from edgetune.compiler.ir.graph import Graph, Node


@dataclass(frozen=True)
class Kind:
    name: str
    per_step: bool  # given with every step (else held across steps and bound once)
    meaning: str


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("param", False, "a model parameter, updated in place where the scheme trains it"),
    Kind("buffer", False, "a model buffer (BatchNorm running statistics), written in place in train mode"),
    Kind("state", False, "the optimizer state of one trained tensor, held by the Trainer"),
    Kind("adapter", False, "a LoRA adapter, held by the Trainer and trained like a parameter"),
    Kind("int8", False, "a frozen linear weight held as int8 values, by the Trainer"),
    Kind("int8_scale", False, "the per-row scales of an int8 weight, held by the Trainer"),
    Kind("hyper", True, "a hyperparameter given with every step: the learning rate, the step count"),
    Kind("input", True, "a model input of the batch"),
    Kind("target", True, "a target of the batch (what the loss compares with)"),
)}


@dataclass(frozen=True)
class StepInput:
    """One input of the compiled step, in the order the step takes them."""

    name: str  # the graph's name for it (the generated function's argument)
    kind: str
    key: str | int  # the tensor's name among its kind (a batch tensor: its position in inputs + targets)
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def per_step(self) -> bool:
        return KINDS[self.kind].per_step


def step_inputs(graph: Graph) -> list[StepInput]:
    """Every input of `graph` with its kind and key, in the graph's order."""
    return [_step_input(n) for n in graph.inputs]


def _step_input(n: Node) -> StepInput:
    kind = n.attrs.get("kind")
    if kind not in KINDS:
        raise ValueError(f"graph input {n.name!r} has kind {kind!r}; known kinds: {', '.join(KINDS)}")
    key = n.attrs["index"] if kind in ("input", "target") else n.name if kind == "hyper" else n.attrs["target"]
    return StepInput(n.name, kind, key, tuple(n.shape), n.dtype)


class Bindings:
    """The step's arguments: held inputs looked up once in `held[kind][key]` (the same tensor
    objects at every step, as torch.optim keeps its parameters), per-step ones from each call."""

    def __init__(self, inputs: list[StepInput], held: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        self.inputs = inputs
        self._held = [None if i.per_step else _lookup(held, i) for i in inputs]

    def arguments(self, per_step: Mapping[str, Any]) -> list[Any]:
        """`per_step[kind][key]` for the per-step inputs: {"hyper": {"lr": ..., "step": ...},
        "input": batch, "target": batch}, where batch lists the inputs, then the targets."""
        return [per_step[i.kind][i.key] if i.per_step else held for i, held in zip(self.inputs, self._held)]


def _lookup(held: Mapping[str, Mapping[str, torch.Tensor]], i: StepInput) -> torch.Tensor:
    try:
        return held[i.kind][i.key]
    except KeyError:
        raise KeyError(f"nothing holds the {i.kind} {i.key!r} that the step takes ({KINDS[i.kind].meaning})") from None


# -- what a batch must hold --------------------------------------------------------------------
# A bad batch is refused before the step runs: a compiled step writes in place as it goes (in
# "apply" mode a train-mode norm's statistics are written in the forward), so an index op
# failing halfway would leave some writes done, and on CUDA an out-of-range index is a
# device-side assert that kills the process.

class BatchError(ValueError):
    """A batch the step refuses before it runs; nothing has changed."""


@dataclass(frozen=True)
class IndexUse:
    """A batch tensor whose values index a table of `size` rows (an embedding's, the classes of a
    cross-entropy): each value must be in [0, size), or one of `ignored` (an ignore_index)."""

    position: int  # in inputs + targets
    size: int
    ignored: frozenset[int]
    table: str  # what it indexes, for the error: "embedding 'emb' of 10 rows"


# Ops that read a table at indices: {op: (the index operand, the size of the table it indexes)}.
INDEX_OPERANDS = {
    "embedding": (1, lambda n: n.inputs[0].shape[0]),
    "vocab_log_prob": (2, lambda n: n.inputs[1].shape[0]),  # the fused LM head's target
    "gather": (1, lambda n: n.inputs[0].shape[n.attrs["dim"]]),
    "index_select": (1, lambda n: n.inputs[0].shape[n.attrs["dim"]]),
}
# Ops whose output entries are entries of their first input (or constants): a batch's ids pass
# through them unchanged on their way to an index operand.
MOVES_VALUES = ("reshape", "permute", "expand", "slice", "select", "flip", "repeat", "pad", "cast")


def index_uses(graph: Graph) -> list[IndexUse]:
    """Every batch tensor that reaches an index operand through ops that only move its values,
    with the table's size. A value a `where(ne(t, c), t, const)` masks out (cross-entropy's
    ignore_index c) is allowed. Checked over the whole tensor, even where a slice drops part."""
    uses = set()
    for n in graph.nodes:
        if n.op in INDEX_OPERANDS:
            operand, size = INDEX_OPERANDS[n.op]
            source = _batch_source(n.inputs[operand])
            if source is not None:
                rows, ignored = size(n), source[1]
                if n.attrs.get("ignore") is not None:  # the fused head reads its labels unmasked
                    ignored = ignored | {n.attrs["ignore"]}
                uses.add(IndexUse(source[0].attrs["index"], rows, ignored, _table_name(n, rows)))
    return sorted(uses, key=lambda u: (u.position, u.size))


def _batch_source(node: Node) -> tuple[Node, frozenset[int]] | None:
    """(the batch input whose values `node` holds, the values masked out on the way), or None
    where anything but moves and an ignore mask lies between them (then nothing is checked)."""
    ignored: set[int] = set()
    while True:
        if node.op == "input":
            return (node, frozenset(ignored)) if node.attrs.get("kind") in ("input", "target") else None
        if node.op in MOVES_VALUES and not (node.op == "cast" and node.dtype.is_floating_point):
            node = node.inputs[0]
        elif node.op == "where" and ignore_mask(node) is not None:
            ignored.add(ignore_mask(node))
            node = node.inputs[1]
        else:
            return None


def ignore_mask(where: Node) -> int | None:
    """c where `where` is where(ne(t, c), t, constant), as cross-entropy's ignore_index lowers."""
    cond, kept, other = where.inputs
    return not_equal_to(cond, kept) if other.op == "const" else None


def not_equal_to(cond: Node, labels: Node) -> int | None:
    """c where `cond` is ne(labels, c) for a constant c, else None."""
    if cond.op == "ne" and cond.inputs[0] is labels and cond.inputs[1].op == "const":
        return int(cond.inputs[1].attrs["value"])
    return None


def _table_name(n: Node, size: int) -> str:
    module = n.meta.get("module", "")
    if n.op == "embedding":
        return f"embedding '{module}' of {size} rows"
    if n.op == "vocab_log_prob" or module in ("", "<loss>"):
        return f"the loss's {size} classes"
    return f"{n.op} in '{module}' over {size} entries"


def refuse_out_of_range(t: torch.Tensor, what: str, use: IndexUse) -> None:
    """BatchError naming the first value of `t` outside [0, use.size) and not ignored."""
    if t.numel() == 0:
        return
    low, high = torch.aminmax(t)
    if int(low) >= 0 and int(high) < use.size:  # the common case: one pass, no temporaries of t's size
        return  # (Python ints: a tensor comparison would be two more kernel calls a step)
    bad = (t < 0) | (t >= use.size)
    for value in use.ignored:
        bad &= t != value
    if not bad.any():
        return
    where = torch.nonzero(bad)[0]
    value = int(t[tuple(where)])
    ignored = "".join(f" or {v} (ignored)" for v in sorted(use.ignored))
    hint = ("the model's vocabulary (the tokenizer's ids)" if use.table.startswith("embedding") else
            "the model's number of classes" if "classes" in use.table else "the size of what it indexes")
    raise BatchError(f"{what} holds {value} at {where.tolist()}, out of range for {use.table}: values must be in "
                     f"[0, {use.size}){ignored}; nothing was updated: check the batch against {hint}")


# Attention masks: an additive mask holds -inf where a query may not look (PyTorch's own
# encoding: nn.Transformer.generate_square_subsequent_mask, a float key_padding_mask). A batch
# tensor that reaches the step only as such a mask may hold -inf; NaN and +inf are refused
# there as anywhere. {op: (its number of inputs where it has a mask, the mask's position)}.
MASK_OPERANDS = {"sdpa": (4, 3), "sdpa_grad": (6, 4), "sdpa_grad_mask": (6, 4)}
# Ops a mask passes through on its way: moved, or added to another mask or to the scores.
MASK_PATHS = MOVES_VALUES + ("add", "add_inplace")
SOFTMAX = ("softmax", "log_softmax")


def mask_inputs(graph: Graph) -> set[int]:
    """The positions (in inputs + targets) of the float batch tensors that the step reads only as
    attention masks: through moves and additions into a fused attention's mask operand, or
    added to the scores of a softmax."""
    users = graph.users()
    return {n.attrs["index"] for n in graph.nodes
            if n.op == "input" and n.attrs.get("kind") in ("input", "target") and n.dtype.is_floating_point
            and users.get(n) and _only_a_mask(n, users)}


def _only_a_mask(start: Node, users: Mapping[Node, list[Node]]) -> bool:
    stack, seen = [(start, False)], set()
    while stack:
        x, added = stack.pop()
        if x in seen:
            continue
        seen.add(x)
        for u in users.get(x, ()):
            if u.op in MASK_OPERANDS and len(u.inputs) == MASK_OPERANDS[u.op][0]:
                if any(i is x for k, i in enumerate(u.inputs) if k != MASK_OPERANDS[u.op][1]):
                    return False
            elif u.op in SOFTMAX and added:
                continue
            elif u.op in MASK_PATHS:
                stack.append((u, added or u.op.startswith("add")))
            else:
                return False
    return True


def refuse_nonfinite(t: torch.Tensor, what: str, mask: bool = False) -> None:
    """BatchError counting the NaN and infinite entries of a float tensor, if it has any (an
    attention mask's -inf entries excepted)."""
    if not t.is_floating_point() or _surely_finite(t):
        return
    infinite = torch.isposinf(t) if mask else torch.isinf(t)
    nan, inf = int(torch.isnan(t).sum()), int(infinite.sum())
    if nan + inf == 0:  # only the sum overflowed (large entries, every one finite), or a mask's -inf
        return
    first = torch.nonzero(torch.isnan(t) | infinite)[0].tolist()
    entries = "entry" if nan + inf == 1 else "entries"
    kind = "+inf" if mask else "inf"
    raise BatchError(f"{what} has {nan + inf} non-finite {entries} ({nan} NaN, {inf} {kind}) of {t.numel()}, the "
                     f"first at {first}; nothing was updated: clean the batch, or compile with on_nonfinite='apply' "
                     "to let it through")


def _surely_finite(t: torch.Tensor) -> bool:
    """True if every entry is finite, by the sum: a NaN or inf makes any sum NaN or inf, and a
    sum is one vectorized pass (about 30x faster than isfinite().all() on CPU). A sum can also
    overflow on finite entries, so False only means: look entry by entry."""
    wide = torch.float32 if t.dtype.itemsize < 4 else t.dtype  # float16 sums overflow at 65504
    return math.isfinite(t.sum(dtype=wide))  # a Python float: no isfinite kernel
