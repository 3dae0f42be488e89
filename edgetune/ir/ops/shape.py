"""The view family: reshape, permute, expand, slice, select, cat, pad. Gradients route back."""
from __future__ import annotations

import math

import torch

from edgetune.ir.ops import aten, register
from edgetune.ir.ops.core import grad_like

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


register("reshape", lambda x, shape: x.reshape(shape), _reshape_vjp, view=True)
register("permute", lambda x, dims: x.permute(dims), _permute_vjp, view=True)
register("expand", lambda x, size: x.expand(size), _expand_vjp, view=True)
register("slice", lambda x, dim, start, end, step: A.slice(x, dim, start, end, step), _slice_vjp, view=True)
register("select", lambda x, dim, index: x.select(dim, index), _select_vjp, view=True)
register("cat", lambda *xs, dim: torch.cat(xs, dim), _cat_vjp)
register("slice_grad", _slice_grad)
register("select_grad", _select_grad)


def _pad_vjp(b, n, g, want):
    # Padding and cropping undo each other: the gradient is g padded by the negated amounts.
    return (b.emit("pad", g, pad=tuple(-p for p in n.attrs["pad"]), value=0.0) if want[0] else None,)


register("pad", lambda x, pad, value: A.constant_pad_nd(x, pad, value), _pad_vjp)


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
