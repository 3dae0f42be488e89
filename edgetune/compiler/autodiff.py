"""Reverse-mode autodiff over the IR, restricted to what the scheme trains.

Prune first, then differentiate: only nodes on a path from a trainable parameter to the
loss get a gradient, so a frozen parameter's gradient -- and everything only it needs -- is
never built. Gradients are summed where a value fans out (residuals, tied weights).
"""
from __future__ import annotations

from edgetune.compiler.ir.builder import Builder
from edgetune.compiler.ir.graph import Graph, Node
from edgetune.compiler.ir.ops import OPS, ChannelSlice

Want = bool | ChannelSlice


class NoGradientError(NotImplementedError):
    """An op on the path from a trainable parameter to the loss has no VJP rule."""


def differentiate(graph: Graph, loss: Node, trainable: dict[Node, Want], b: Builder) -> dict[Node, Node]:
    """Emit the backward graph into `b`; return {parameter input node: its gradient node}.

    `trainable[p]` is True for a whole parameter or a ChannelSlice for part of one; the
    gradient of a sliced parameter has the slice's shape.
    """
    on_path = _prune(graph, loss, trainable)
    grads: dict[Node, list[Node]] = {loss: [b.const(1.0, dtype=loss.dtype)]}
    for node in reversed(graph.nodes):
        if node not in on_path or node.op == "input" or node not in grads:
            continue
        g = _sum(b, grads.pop(node))
        want = [trainable.get(i, True) if i in on_path else False for i in node.inputs]
        for i, gi in zip(node.inputs, _vjp(b, node, g, want)):
            if gi is not None:
                grads.setdefault(i, []).append(_check_shape(i, gi, trainable.get(i), node))
    b.meta = {}
    return {p: _sum(b, grads[p]) for p in trainable if p in grads}


def _sum(b: Builder, terms: list[Node]) -> Node:
    """The gradient terms of one value, summed. Where the value was split into pieces that
    cover it (a fused qkv projection cut into q, k and v; split, chunk, unbind), each piece's
    gradient came back as a zero-filled tensor of the whole shape with that piece written in
    (slice_grad, select_grad); their sum is the pieces' gradients side by side, one cat."""
    tiles: dict[tuple, list[Node]] = {}
    for t in terms:
        if t.op in ("slice_grad", "select_grad") and t.attrs.get("step", 1) == 1:
            tiles.setdefault((t.attrs["dim"], tuple(t.attrs["input_shape"])), []).append(t)
    for (dim, shape), pieces in tiles.items():
        ordered = sorted(pieces, key=_piece_start)
        if len(ordered) < 2 or not _cover(ordered, shape[dim]):
            continue
        parts = [p.inputs[0] if p.op == "slice_grad" else
                 b.emit("reshape", p.inputs[0], shape=shape[:dim] + (1,) + shape[dim + 1:]) for p in ordered]
        terms = [t for t in terms if t not in pieces] + [b.emit("cat", *parts, dim=dim)]
    return b.add_all(terms)


def _cover(ordered: list[Node], size: int) -> bool:
    """Whether the pieces, in order, lie end to end from 0 to `size` (no gap, no overlap)."""
    end = 0
    for p in ordered:
        if _piece_start(p) != end:
            return False
        end += _piece_length(p)
    return end == size


def _piece_start(t: Node) -> int:
    return t.attrs["start"] if t.op == "slice_grad" else t.attrs["index"]


def _piece_length(t: Node) -> int:
    return t.attrs["end"] - t.attrs["start"] if t.op == "slice_grad" else 1


def _prune(graph: Graph, loss: Node, trainable: dict[Node, Want]) -> set[Node]:
    """Nodes that depend on a trainable parameter and that the loss depends on."""
    depends: set[Node] = set(trainable)
    for n in graph.nodes:
        if n.is_float and any(i in depends for i in n.inputs):
            depends.add(n)
    needed, stack = set(), [loss]
    while stack:
        n = stack.pop()
        if n in needed or n not in depends:
            continue
        needed.add(n)
        stack.extend(n.inputs)
    return needed


def _vjp(b: Builder, node: Node, g: Node, want: list[Want]) -> tuple:
    rule = OPS[node.op].vjp
    if rule is None:
        where = node.meta.get("module", "?")
        raise NoGradientError(f"op '{node.op}' (from module '{where}') has no gradient rule, but a trainable "
                              "parameter's gradient flows through it; freeze the parameters before it")
    b.meta = {**node.meta, "grad_of": node.name}
    grads = tuple(rule(b, node, g, want))
    if len(grads) != len(node.inputs):
        raise AssertionError(f"VJP of {node.op} returned {len(grads)} gradients for {len(node.inputs)} inputs")
    return grads


def _check_shape(x: Node, gx: Node, want: Want | None, user: Node) -> Node:
    expected = tuple(x.shape)
    if isinstance(want, ChannelSlice):
        expected = expected[: want.axis] + (want.k,) + expected[want.axis + 1:]
        if tuple(gx.shape) != expected:
            raise ValueError(f"a partial-channel rule on '{x.name}' needs it to be the weight of a conv or linear "
                             f"layer, but it is used by op '{user.op}' (module '{user.meta.get('module', '?')}')")
    elif tuple(gx.shape) != expected:
        raise AssertionError(f"VJP of {user.op}: gradient shape {gx.shape} for input of shape {x.shape}")
    return gx
