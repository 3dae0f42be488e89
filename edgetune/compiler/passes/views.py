"""Chains of views folded into one view (on the scheduled step, before the in-place pass).

torch.export and the autodiff leave chains such as reshape -> reshape, or permute -> permute
that undoes itself: attention's output goes token-major -> [N, H, T, D] -> back, and each
linear flattens its input and unflattens its output. Each view is a call from the step's
Python (1-10 us at batch 1, where ViT makes some 80 a step). Here
  reshape(reshape(x, a), b) -> reshape(x, b)      reshape(x, x.shape) -> x
  permute(permute(x, p), q) -> permute(x, p[q])   permute(x, identity) -> x
  a permute that moves only axes of length 1 -> a reshape
The values are the same; a view reads the same storage as the chain did, so what the memory
plan and the in-place pass know of storages holds.

And a cat of views that lie side by side in one flat buffer, covering it, is a view of that
buffer: the gradient of a fused qkv projection, whose three pieces the attention's backward
writes interleaved into one buffer (ops/attention.py), had been copied into place twice.
"""
from __future__ import annotations

import torch

from edgetune.compiler.ir.graph import Graph, Node
from edgetune.compiler.passes.dce import dce
from edgetune.compiler.passes.rewrite import rewrite

A = torch.ops.aten


def fold_views(graph: Graph) -> Graph:
    if not any(n.op in ("reshape", "permute", "cat") for n in graph.nodes):
        return graph

    def visit(b, n: Node, inputs: tuple[Node, ...]):
        if n.op == "cat":
            return _cat_as_view(b, n, inputs)
        if n.op == "reshape":
            x = _unreshaped(inputs[0])
            return None if x is inputs[0] else _reshaped(b, x, tuple(n.shape))
        if n.op == "permute":
            x, dims = inputs[0], tuple(n.attrs["dims"])
            while x.op == "permute":
                dims, x = tuple(x.attrs["dims"][d] for d in dims), x.inputs[0]
            if dims == tuple(range(len(dims))):
                return x
            if _moves_unit_axes_only(x.shape, dims):  # the same elements in the same order
                return _reshaped(b, _unreshaped(x), tuple(n.shape))
            return b.emit("permute", x, dims=dims) if x is not inputs[0] else None
        return None

    return dce(rewrite(graph, visit))


def _unreshaped(x: Node) -> Node:
    while x.op == "reshape":
        x = x.inputs[0]
    return x


def _reshaped(b, x: Node, shape: tuple) -> Node:
    return x if tuple(x.shape) == shape else b.emit("reshape", x, shape=shape)


def _moves_unit_axes_only(shape: tuple, dims: tuple) -> bool:
    longer = [d for d in dims if shape[d] > 1]
    return longer == sorted(longer)


# -- a cat of views that tile one flat buffer

_VIEWS = ("reshape", "permute", "slice", "select")


def _cat_as_view(b, n: Node, parts: tuple[Node, ...]) -> Node | None:
    """The cat as reshape / permute views of the flat buffer its parts view, where the parts
    lie side by side in it along the cat's axis and together cover it; else None."""
    placed = [_placement(p) for p in parts]
    if len(parts) < 2 or any(p is None for p in placed) or len({base for base, *_ in placed}) != 1:
        return None
    base = placed[0][0]
    layout = _joined(placed, n.attrs["dim"] % len(n.shape))
    dense = layout and _dense_order(*layout[:2])
    # all of the buffer from its start (a view of a part would keep the rest of it alive)
    if not dense or layout[2] != 0 or dense[1] != base.shape[0]:
        return None
    sizes, order = layout[0], _with_unit_axes(dense[0], layout[0])
    x = b.emit("reshape", base, shape=tuple(sizes[i] for i in order))
    perm = tuple(order.index(i) for i in range(len(sizes)))
    return x if perm == tuple(range(len(perm))) else b.emit("permute", x, dims=perm)


def _placement(x: Node):
    """(flat buffer, sizes, strides, offset) of a chain of views of a 1-D buffer (one a kernel
    wrote, so contiguous), worked out on a meta tensor; None for anything else."""
    chain = []
    while x.op in _VIEWS:
        chain.append(x)
        x = x.inputs[0]
    if not chain or len(x.shape) != 1:
        return None
    t = torch.empty(x.shape, dtype=x.dtype, device="meta")
    try:
        for v in reversed(chain):
            a = v.attrs
            t = (t.view(a["shape"]) if v.op == "reshape" else t.permute(a["dims"]) if v.op == "permute"
                 else A.slice(t, a["dim"], a["start"], a["end"], a["step"]) if v.op == "slice"
                 else t.select(a["dim"], a["index"]))
    except RuntimeError:  # a reshape the runtime would copy
        return None
    return x, tuple(t.shape), t.stride(), t.storage_offset()


def _joined(placed: list, dim: int):
    """(sizes, strides, offset) of the parts side by side along `dim`, if they lie so in their
    buffer: alike but for their length along `dim`, each starting where the one before ends
    (parts of length 1 may sit any fixed distance apart)."""
    _, sizes, strides, offsets = zip(*placed)
    rest = [tuple(s for i, s in enumerate(shape) if i != dim) for shape in sizes]
    rest_strides = [tuple(st for i, (st, s) in enumerate(zip(stride, shape)) if i != dim and s > 1)
                    for stride, shape in zip(strides, sizes)]
    if len(set(rest)) != 1 or len(set(rest_strides)) != 1:
        return None
    lengths = [shape[dim] for shape in sizes]
    if all(length == 1 for length in lengths):
        step = offsets[1] - offsets[0]
    elif len({stride[dim] for stride, length in zip(strides, lengths) if length > 1}) == 1:
        step = next(stride[dim] for stride, length in zip(strides, lengths) if length > 1)
    else:
        return None
    if any(b - a != length * step for a, b, length in zip(offsets, offsets[1:], lengths)):
        return None
    joined_sizes = sizes[0][:dim] + (sum(lengths),) + sizes[0][dim + 1:]
    joined_strides = strides[0][:dim] + (step,) + strides[0][dim + 1:]
    return joined_sizes, joined_strides, offsets[0]


def _with_unit_axes(order: list[int], sizes: tuple) -> list[int]:
    """`order` (axes longer than 1) with the axes of length 1 put in too, each just before the
    next longer axis in the cat's order (or last): the permute back leaves them in place
    where it can."""
    full, pending = [], {}
    for i, size in enumerate(sizes):
        if size == 1:
            pending.setdefault(next((j for j in range(i + 1, len(sizes)) if sizes[j] > 1), None), []).append(i)
    for i in order:
        full += pending.get(i, []) + [i]
    return full + pending.get(None, [])


def _dense_order(sizes: tuple, strides: tuple):
    """(the axes longer than 1 from the outermost in memory, the elements spanned), where the
    strides lay them out densely (a permuted contiguous block); else None."""
    order = sorted((i for i, s in enumerate(sizes) if s > 1), key=lambda i: -strides[i])
    span = 1
    for i in reversed(order):
        if strides[i] != span:
            return None
        span *= sizes[i]
    return order, span
