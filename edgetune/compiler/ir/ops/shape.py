"""The view family and its kin: reshape, permute, expand, slice, select, cat, pad, flip, repeat,
integer indexing. Gradients route back to the entries they came from."""
from __future__ import annotations

import math

import torch

from edgetune.compiler.ir.ops.registry import aten, register
from edgetune.compiler.ir.ops.core import grad_like
from edgetune.compiler.ir.ops.nn import onnx_index_along

A = torch.ops.aten


def _reshape_vjp(b, n, g, want):
    return (b.emit("reshape", g, shape=tuple(n.inputs[0].shape)) if want[0] else None,)


def _permute_vjp(b, n, g, want):
    inverse = tuple(sorted(range(len(n.attrs["dims"])), key=lambda i: n.attrs["dims"][i]))
    return (b.emit("permute", g, dims=inverse) if want[0] else None,)


def _expand_vjp(b, n, g, want):
    return (b.sum_to(g, n.inputs[0].shape) if want[0] else None,)


def _slice_vjp(b, n, g, want):
    return (b.emit("slice_grad", g, input_shape=tuple(n.inputs[0].shape), **n.attrs) if want[0] else None,)


def _select_vjp(b, n, g, want):
    return (b.emit("select_grad", g, input_shape=tuple(n.inputs[0].shape), **n.attrs) if want[0] else None,)


def _cat_vjp(b, n, g, want):
    dim, start, grads = n.attrs["dim"], 0, []
    for x, w in zip(n.inputs, want):
        end = start + x.shape[dim]
        grads.append(grad_like(b, b.emit("slice", g, dim=dim, start=start, end=end, step=1), x) if w else None)
        start = end
    return tuple(grads)


def _slice_grad(g, *, input_shape, dim, start, end, step):
    return A.slice_scatter(g.new_zeros(input_shape), g, dim, start, end, step)


def _select_grad(g, *, input_shape, dim, index):
    return A.select_scatter(g.new_zeros(input_shape), g, dim, index)


def _slice_onnx(ctx, n, xs):
    a = n.attrs
    return ctx.op("Slice", xs[0], ctx.ints([a["start"]]), ctx.ints([a["end"]]), ctx.ints([a["dim"]]),
                  ctx.ints([a["step"]]))


def _slice_grad_onnx(ctx, n, xs):
    """g put back where the slice came from, zeros elsewhere: a pad for a contiguous slice. A
    strided one (x[:, ::2], a space-to-depth or an interleaved rotary embedding) first spreads g
    out: each entry followed by step - 1 zeros (a new axis after `dim`, padded, merged back),
    cut to the length the slice spans."""
    a = n.attrs
    dim, step, start = a["dim"], a["step"], a["start"]
    rank, size = len(a["input_shape"]), a["input_shape"][dim]
    g, spanned = xs[0], n.inputs[0].shape[dim]
    if step != 1:
        spread_pads = [0] * (2 * (rank + 1))
        spread_pads[rank + 1 + dim + 1] = step - 1
        spread = ctx.op("Pad", ctx.op("Unsqueeze", g, ctx.ints([dim + 1])), ctx.ints(spread_pads))
        shape = list(n.inputs[0].shape)
        shape[dim] = spanned * step
        spanned = min(spanned * step, size - start)
        g = ctx.op("Slice", ctx.op("Reshape", spread, ctx.ints(shape)), ctx.ints([0]), ctx.ints([spanned]),
                   ctx.ints([dim]))
    pads = [0] * (2 * rank)
    pads[dim], pads[rank + dim] = start, size - start - spanned
    return ctx.op("Pad", g, ctx.ints(pads))


def _select_grad_onnx(ctx, n, xs):
    a = n.attrs
    size = a["input_shape"][a["dim"]]
    shape = list(a["input_shape"])
    shape[a["dim"]] = 1
    rank = len(shape)
    pads = [0] * (2 * rank)
    pads[a["dim"]], pads[rank + a["dim"]] = a["index"], size - a["index"] - 1
    return ctx.op("Pad", ctx.op("Reshape", xs[0], ctx.ints(shape)), ctx.ints(pads))


def _method(name: str, *attrs: str):
    """`inline` for a view that is a tensor method taking the node's attributes in order."""
    return lambda n, xs: f"{xs[0]}.{name}({', '.join(repr(n.attrs[a]) for a in attrs)})"


def _slice_inline(n, xs):
    """x[..., start:end:step] as basic indexing (what A.slice does, clamping included; the
    fastest view call from Python)."""
    a = n.attrs
    dim = a["dim"] % len(n.inputs[0].shape)
    return f"{xs[0]}[{':, ' * dim}{a['start']}:{a['end']}:{a['step']}]"


register("reshape", lambda x, shape: x.reshape(shape), _reshape_vjp, view=True, inline=_method("reshape", "shape"),
         onnx=lambda ctx, n, xs: ctx.op("Reshape", xs[0], ctx.ints(n.attrs["shape"])))
register("permute", lambda x, dims: x.permute(dims), _permute_vjp, view=True, inline=_method("permute", "dims"),
         onnx=lambda ctx, n, xs: ctx.op("Transpose", xs[0], perm=list(n.attrs["dims"])))
register("expand", lambda x, size: x.expand(size), _expand_vjp, view=True, inline=_method("expand", "size"),
         onnx=lambda ctx, n, xs: ctx.op("Expand", xs[0], ctx.ints(n.attrs["size"])))
register("slice", lambda x, dim, start, end, step: A.slice(x, dim, start, end, step), _slice_vjp, view=True,
         inline=_slice_inline, onnx=_slice_onnx)
# A 0-d index drops the dim, as select does.
register("select", lambda x, dim, index: x.select(dim, index), _select_vjp, view=True,
         inline=_method("select", "dim", "index"),
         onnx=lambda ctx, n, xs: ctx.op("Gather", xs[0], ctx.scalar(n.attrs["index"], torch.int64),
                                        axis=n.attrs["dim"]))
register("cat", lambda *xs, dim: torch.cat(xs, dim), _cat_vjp,
         onnx=lambda ctx, n, xs: ctx.op("Concat", *(ctx.convert(x, i.dtype, n.dtype) for x, i in zip(xs, n.inputs)),
                                        axis=n.attrs["dim"]))
register("slice_grad", _slice_grad, onnx=_slice_grad_onnx)
register("select_grad", _select_grad, onnx=_select_grad_onnx)


def _pad_vjp(b, n, g, want):
    # Padding and cropping undo each other: the gradient is g padded by the negated amounts.
    return (b.emit("pad", g, pad=tuple(-p for p in n.attrs["pad"]), value=0.0) if want[0] else None,)


def _pad_onnx(ctx, n, xs):
    """torch lists (begin, end) pairs from the last dim back; ONNX all begins, then all ends.
    A negative amount crops, in both."""
    amounts, rank = n.attrs["pad"], len(n.shape)
    pairs = [(0, 0)] * (rank - len(amounts) // 2) + [
        (amounts[2 * k], amounts[2 * k + 1]) for k in reversed(range(len(amounts) // 2))]
    pads = [b for b, _ in pairs] + [e for _, e in pairs]
    return ctx.op("Pad", xs[0], ctx.ints(pads), ctx.scalar(n.attrs["value"], n.dtype))


register("pad", lambda x, pad, value: A.constant_pad_nd(x, pad, value), _pad_vjp, onnx=_pad_onnx)


def _repeat_grad(g, *, repeats, input_shape):
    # The output tiles x's (padded) shape: split each dim into (tile, size) and sum the tiles.
    shape = (1,) * (len(repeats) - len(input_shape)) + tuple(input_shape)
    tiled = g.reshape([n for r, s in zip(repeats, shape) for n in (r, s)])
    return tiled.sum(tuple(range(0, 2 * len(shape), 2))).reshape(input_shape)


def _flat_index(*idx, sizes):
    """Row-major position in the flattened indexed dims of the entries picked (negatives wrap)."""
    flat = torch.zeros((), dtype=torch.int64, device=idx[0].device)
    for i, size in zip(torch.broadcast_tensors(*idx), sizes):
        flat = flat * size + i.remainder(size)
    return flat.reshape(-1)


def _flip_onnx(ctx, n, xs):
    dims = list(n.attrs["dims"])
    ends = [-(2 ** 63)] * len(dims)  # past the front: a step of -1 runs to the first entry
    backwards = ctx.ints([-1] * len(dims))
    return ctx.op("Slice", xs[0], backwards, ctx.ints(ends), ctx.ints(dims), backwards)


register("flip", lambda x, dims: x.flip(dims),
         lambda b, n, g, want: (b.emit("flip", g, dims=n.attrs["dims"]) if want[0] else None,), onnx=_flip_onnx)
def _padded_shape(repeats, input_shape):
    return (1,) * (len(repeats) - len(input_shape)) + tuple(input_shape)


def _repeat_onnx(ctx, n, xs):
    x, repeats = xs[0], n.attrs["repeats"]
    if len(repeats) > len(n.inputs[0].shape):  # extra repeats add leading dims
        x = ctx.op("Reshape", x, ctx.ints(_padded_shape(repeats, n.inputs[0].shape)))
    return ctx.op("Tile", x, ctx.ints(repeats))


def _repeat_grad_onnx(ctx, n, xs):
    """As the kernel: each dim split into (tile, size), the tiles summed."""
    repeats, shape = n.attrs["repeats"], _padded_shape(n.attrs["repeats"], n.attrs["input_shape"])
    tiled = ctx.op("Reshape", xs[0], ctx.ints([k for r, s in zip(repeats, shape) for k in (r, s)]))
    summed = ctx.reduce("ReduceSum", tiled, range(0, 2 * len(shape), 2), keepdims=False)
    return ctx.op("Reshape", summed, ctx.ints(n.shape))


def _flat_index_onnx(ctx, n, xs):
    """Row-major position: ONNX's integer Mod (fmod=0) wraps negatives as torch's remainder does."""
    flat = None
    for i, node, size in zip(xs, n.inputs, n.attrs["sizes"]):
        wrapped = ctx.op("Mod", ctx.convert(i, node.dtype, torch.int64), ctx.scalar(size, torch.int64), fmod=0)
        flat = wrapped if flat is None else ctx.op("Add", ctx.op("Mul", flat, ctx.scalar(size, torch.int64)), wrapped)
    return ctx.op("Reshape", flat, ctx.ints([-1]))


register("repeat", lambda x, repeats: x.repeat(repeats), lambda b, n, g, want: (
    b.emit("repeat_grad", g, repeats=n.attrs["repeats"], input_shape=tuple(n.inputs[0].shape)) if want[0] else None,),
    onnx=_repeat_onnx)
register("repeat_grad", _repeat_grad, onnx=_repeat_grad_onnx)
register("flat_index", _flat_index, onnx=_flat_index_onnx)


def _resolve_shape(x, shape):
    shape = list(shape)
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = math.prod(x.shape) // max(known, 1)
    return tuple(shape)


@aten(A.view.default, A._unsafe_view.default, A.reshape.default)
def _(b, x, shape):
    shape = _resolve_shape(x, shape)
    return x if shape == tuple(x.shape) else b.emit("reshape", x, shape=shape)


@aten(A.unsqueeze.default)
def _(b, x, dim):
    dim = dim % (len(x.shape) + 1)
    return b.emit("reshape", x, shape=tuple(x.shape[:dim]) + (1,) + tuple(x.shape[dim:]))


@aten(A.squeeze.dims, A.squeeze.dim, A.squeeze.default)
def _(b, x, dims=None):
    dims = range(len(x.shape)) if dims is None else ([dims] if isinstance(dims, int) else dims)
    drop = {d % len(x.shape) for d in dims if x.shape[d] == 1}
    shape = tuple(s for i, s in enumerate(x.shape) if i not in drop)
    return x if shape == tuple(x.shape) else b.emit("reshape", x, shape=shape)


@aten(A.permute.default)
def _(b, x, dims):
    dims = tuple(d % len(x.shape) for d in dims)
    return x if dims == tuple(range(len(dims))) else b.emit("permute", x, dims=dims)


@aten(A.t.default)
def _(b, x):
    return b.emit("permute", x, dims=(1, 0)) if len(x.shape) == 2 else x


@aten(A.transpose.int)
def _(b, x, d0, d1):
    dims = list(range(len(x.shape)))
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return b.emit("permute", x, dims=tuple(dims))


@aten(A.expand.default)
def _(b, x, size, implicit=False):
    lead = len(size) - len(x.shape)
    size = tuple(x.shape[i - lead] if s == -1 else s for i, s in enumerate(size))
    return x if size == tuple(x.shape) else b.emit("expand", x, size=size)


@aten(A.slice.Tensor)
def _(b, x, dim=0, start=None, end=None, step=1):
    dim = dim % len(x.shape)
    start, end, _ = slice(start, end, step).indices(x.shape[dim])
    if (start, end, step) == (0, x.shape[dim], 1):
        return x
    return b.emit("slice", x, dim=dim, start=start, end=max(end, start), step=step)


@aten(A.select.int)
def _(b, x, dim, index):
    dim = dim % len(x.shape)
    return b.emit("select", x, dim=dim, index=index % x.shape[dim])


@aten(A.cat.default)
def _(b, xs, dim=0):
    xs = [x for x in xs if math.prod(x.shape) > 0 or len(xs) == 1]
    return b.emit("cat", *xs, dim=dim % len(xs[0].shape))


@aten(A.split_with_sizes.default, A.split.Tensor)
def _(b, x, sizes, dim=0):
    dim = dim % len(x.shape)
    if isinstance(sizes, int):
        sizes = [min(sizes, x.shape[dim] - s) for s in range(0, x.shape[dim], sizes)]
    outs, start = [], 0
    for size in sizes:
        outs.append(b.emit("slice", x, dim=dim, start=start, end=start + size, step=1))
        start += size
    return tuple(outs)


@aten(A.constant_pad_nd.default)
def _(b, x, pad, value=0):
    return b.emit("pad", x, pad=tuple(pad), value=value)


aten(A.flip.default)(lambda b, x, dims: b.emit("flip", x, dims=tuple(d % len(x.shape) for d in dims)))
aten(A.repeat.default)(lambda b, x, repeats: b.emit("repeat", x, repeats=tuple(repeats)))


def _flattened(b, x, indices):
    """For x[..., i, j, ...] (index tensors on adjacent dims): x with those dims merged into one,
    the flat index into it, that dim, and the indexing's output shape."""
    at = [k for k, i in enumerate(indices) if i is not None]
    if at != list(range(at[0], at[-1] + 1)) or any(indices[k].dtype == torch.bool for k in at):
        raise NotImplementedError("indexing with a bool mask, or with index tensors not on adjacent dims")
    d, k, idx = at[0], len(at), [indices[i] for i in at]
    picked = tuple(torch.broadcast_shapes(*(tuple(i.shape) for i in idx)))
    flat_x = x if k == 1 else b.emit("reshape", x, shape=tuple(x.shape[:d]) + (math.prod(x.shape[d:d + k]),)
                                     + tuple(x.shape[d + k:]))
    flat_i = b.emit("flat_index", *idx, sizes=tuple(x.shape[d:d + k]))
    return flat_x, flat_i, d, tuple(x.shape[:d]) + picked + tuple(x.shape[d + k:])


@aten(A.index.Tensor)
def _(b, x, indices):
    """x[..., i, j, ...]: one index_select on the merged dims."""
    flat_x, flat_i, d, shape = _flattened(b, x, indices)
    return b.emit("reshape", b.emit("index_select", flat_x, flat_i, dim=d), shape=shape)


# -- writes into a tensor (`y[:, 1:3] = v`, `y[i] = v`), as functionalization spells them -------

def _scatter_vjp(b, n, g, want):
    """x's gradient is g with the written region zeroed; the written value's is that region of g."""
    x, src = n.inputs
    gx = b.emit(f"{n.op}_grad_input", g, **n.attrs) if want[0] else None
    gs = grad_like(b, b.emit(n.op.removesuffix("_scatter"), g, **n.attrs), src) if want[1] else None
    return gx, gs


def _zeroed(region):
    """A kernel returning a copy of g whose `region(g, **attrs)` view is zero."""
    def kernel(g, **attrs):
        out = g.clone()
        region(out, **attrs).zero_()
        return out
    return kernel


# ONNX: the written region as a constant mask along `dim` (its positions are known here), and
# Where: the written values there, x (or g) elsewhere. Nothing is computed, so nothing rounds.

def _onnx_region(ctx, shape, dim, positions):
    """A bool mask, True at `positions` along dim, shaped to broadcast over `shape`."""
    mask = torch.zeros(shape[dim], dtype=torch.bool)
    mask[list(positions)] = True
    return ctx.const(mask.reshape((-1,) + (1,) * (len(shape) - dim - 1)))


def _slice_positions(a):
    return range(a["start"], a["end"], a["step"])


def _slice_scatter_onnx(ctx, n, xs):
    """src's entry k along dim lands at start + k * step: a Gather along dim spreads it there."""
    x, src = xs[0], ctx.convert(xs[1], n.inputs[1].dtype, n.dtype)
    a, positions = n.attrs, _slice_positions(n.attrs)
    if not positions:
        return ctx.op("Identity", x)
    source = torch.zeros(n.shape[a["dim"]], dtype=torch.int64)  # which entry of src each position takes
    source[list(positions)] = torch.arange(len(positions))
    spread = ctx.op("Gather", src, ctx.const(source), axis=a["dim"])
    return ctx.op("Where", _onnx_region(ctx, n.shape, a["dim"], positions), spread, x)


def _select_scatter_onnx(ctx, n, xs):
    x, src = xs[0], ctx.convert(xs[1], n.inputs[1].dtype, n.dtype)
    dim = n.attrs["dim"]
    src = ctx.op("Unsqueeze", src, ctx.ints([dim]))  # broadcasts along dim
    return ctx.op("Where", _onnx_region(ctx, n.shape, dim, [n.attrs["index"]]), src, x)


def _zeroed_onnx(positions):
    def lower(ctx, n, xs):
        return ctx.op("Where", _onnx_region(ctx, n.shape, n.attrs["dim"], positions(n.attrs)), ctx.scalar(0, n.dtype),
                      xs[0])
    return lower


register("slice_scatter", lambda x, src, dim, start, end, step: A.slice_scatter(x, src, dim, start, end, step),
         _scatter_vjp, onnx=_slice_scatter_onnx)
register("slice_scatter_grad_input", _zeroed(lambda t, dim, start, end, step: A.slice(t, dim, start, end, step)),
         onnx=_zeroed_onnx(_slice_positions))
register("select_scatter", lambda x, src, dim, index: A.select_scatter(x, src, dim, index), _scatter_vjp,
         onnx=_select_scatter_onnx)
register("select_scatter_grad_input", _zeroed(lambda t, dim, index: t.select(dim, index)),
         onnx=_zeroed_onnx(lambda a: [a["index"]]))


def _index_put_vjp(b, n, g, want):
    x, src, idx = n.inputs
    dim, added = n.attrs["dim"], n.attrs["accumulate"]  # added to, x's entries keep their gradient
    gx = (g if added else b.emit("index_put_grad_input", g, idx, dim=dim)) if want[0] else None
    gs = grad_like(b, b.emit("index_select", g, idx, dim=dim), src) if want[1] else None
    return gx, gs, None


def _index_put_onnx(ctx, n, xs):
    # A repeated index: index_add adds each; index_copy keeps one write (torch leaves which open;
    # both runtimes write in order, the last one stays).
    x, src, idx = xs
    indices = onnx_index_along(ctx, idx, n.attrs["dim"], n.inputs[1].shape)
    return ctx.op("ScatterElements", x, indices, src, axis=n.attrs["dim"],
                  reduction="add" if n.attrs["accumulate"] else "none")


def _index_put_grad_input_onnx(ctx, n, xs):
    g, idx = xs
    dim, shape = n.attrs["dim"], list(n.shape)
    shape[dim] = n.inputs[1].shape[0]
    return ctx.op("ScatterElements", g, onnx_index_along(ctx, idx, dim, shape), ctx.full(shape, 0, n.dtype), axis=dim)


register("index_put", lambda x, src, idx, dim, accumulate: (x.index_add if accumulate else x.index_copy)(dim, idx, src),
         _index_put_vjp, onnx=_index_put_onnx)
register("index_put_grad_input", lambda g, idx, dim: g.index_fill(dim, idx, 0), onnx=_index_put_grad_input_onnx)


@aten(A.copy.default)
def _(b, dst, src, non_blocking=False):
    # The value written into dst: src, broadcast to dst's shape, in dst's dtype.
    if src.dtype != dst.dtype:
        src = b.emit("cast", src, dtype=dst.dtype)
    return src if tuple(src.shape) == tuple(dst.shape) else b.emit("expand", src, size=tuple(dst.shape))


@aten(A.slice_scatter.default)
def _(b, x, src, dim=0, start=None, end=None, step=1):
    dim = dim % len(x.shape)
    start, end, _ = slice(start, end, step).indices(x.shape[dim])
    return b.emit("slice_scatter", x, src, dim=dim, start=start, end=max(end, start), step=step)


@aten(A.select_scatter.default)
def _(b, x, src, dim, index):
    dim = dim % len(x.shape)
    return b.emit("select_scatter", x, src, dim=dim, index=index % x.shape[dim])


@aten(A.index_put.default)
def _(b, x, indices, values, accumulate=False):
    """x[i, j] = v: one index_copy (index_add to accumulate) on the merged dims."""
    if values.dtype != x.dtype:
        values = b.emit("cast", values, dtype=x.dtype)
    if len(indices) == 1 and indices[0].dtype == torch.bool and math.prod(values.shape) == 1 and not accumulate:
        mask = indices[0]  # y[mask] = scalar
        mask = b.emit("reshape", mask, shape=tuple(mask.shape) + (1,) * (len(x.shape) - len(mask.shape)))
        return b.emit("where", mask, b.emit("reshape", values, shape=()) if values.shape else values, x)
    flat_x, flat_i, d, shape = _flattened(b, x, indices)
    if tuple(values.shape) != shape:
        values = b.emit("expand", values, size=shape)
    flat_v = b.emit("reshape", values, shape=tuple(flat_x.shape[:d]) + flat_i.shape + tuple(flat_x.shape[d + 1:]))
    out = b.emit("index_put", flat_x, flat_v, flat_i, dim=d, accumulate=accumulate)
    return out if out.shape == tuple(x.shape) else b.emit("reshape", out, shape=tuple(x.shape))
