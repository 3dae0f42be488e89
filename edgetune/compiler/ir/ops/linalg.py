"""Matrix products: linear (a weight applied to the last dim), mm, bmm."""
from __future__ import annotations

import torch

from edgetune.compiler.ir.ops.registry import ChannelSlice, aten, register
from edgetune.compiler.ir.ops.core import scalar
from edgetune.compiler.ir.ops.nn import take_channels

A = torch.ops.aten


def _linear_grad_weight(g, x):
    """sum over all leading dims of g^T x: [O, I]."""
    return g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])


def _linear_vjp(b, n, g, want):
    x, w = n.inputs[:2]
    gx = b.emit("linear_grad_input", g, w) if want[0] else None
    gw = None
    if want[1]:
        # A ratio rule (axis 1) needs only the k chosen input features of x; a rows rule
        # (axis 0: a tied table's chosen tokens) only the chosen output features of g.
        part = want[1] if isinstance(want[1], ChannelSlice) else None
        xs = take_channels(b, x, part, dim=len(x.shape) - 1) if part and part.axis == 1 else x
        gs = take_channels(b, g, part, dim=len(g.shape) - 1) if part and part.axis == 0 else g
        gw = b.emit("linear_grad_weight", gs, xs)
    gb = b.sum_to(g, n.inputs[2].shape) if len(n.inputs) == 3 and want[2] else None
    return (gx, gw, gb)[: len(n.inputs)]


def _linear_onnx(ctx, n, xs):
    if len(n.inputs[0].shape) == 2:
        return ctx.op("Gemm", *xs, transB=1)
    y = ctx.op("MatMul", xs[0], ctx.op("Transpose", xs[1], perm=[1, 0]))
    return ctx.op("Add", y, xs[2]) if len(xs) == 3 else y


def _linear_grad_weight_onnx(ctx, n, xs):
    g, x = xs
    rows = lambda v, node: ctx.op("Reshape", v, ctx.ints([-1, node.shape[-1]]))  # noqa: E731
    return ctx.op("Gemm", rows(g, n.inputs[0]), rows(x, n.inputs[1]), transA=1)


register("linear", torch.nn.functional.linear, _linear_vjp, onnx=_linear_onnx)
register("linear_grad_input", lambda g, w: g @ w, onnx=lambda ctx, n, xs: ctx.op("MatMul", *xs))
register("linear_grad_weight", _linear_grad_weight, onnx=_linear_grad_weight_onnx)


def _mm_vjp(b, n, g, want, perm):
    x, y = n.inputs
    if isinstance(want[0], ChannelSlice) or (isinstance(want[1], ChannelSlice) and (n.op != "mm" or want[1].axis != 0)):
        raise NotImplementedError(f"a partial update through {n.op} is only of its right operand's rows (a "
                                  "transposed linear weight, transformers' Conv1D)")
    gx = b.emit(n.op, g, b.emit("permute", y, dims=perm)) if want[0] else None
    gy = None
    if want[1]:
        # x @ W with W [in, out]: a ratio rule trains k of W's rows, which need only the k
        # matching columns of x.
        xs = take_channels(b, x, want[1], dim=1) if isinstance(want[1], ChannelSlice) else x
        gy = b.emit(n.op, b.emit("permute", xs, dims=perm), g)
    return gx, gy


register("mm", torch.mm, lambda b, n, g, want: _mm_vjp(b, n, g, want, (1, 0)),
         onnx=lambda ctx, n, xs: ctx.op("MatMul", *xs))
register("bmm", torch.bmm, lambda b, n, g, want: _mm_vjp(b, n, g, want, (0, 2, 1)),
         onnx=lambda ctx, n, xs: ctx.op("MatMul", *xs))


def _transposed_weight(m):
    """The W of `permute(W, [1, 0])`: how torch.export spells the weight of nn.Linear."""
    if m.op == "permute" and m.attrs["dims"] == (1, 0):
        return m.inputs[0]
    return None


@aten(A.mm.default)
def _(b, x, y):
    w = _transposed_weight(y)
    return b.emit("linear", x, w) if w is not None else b.emit("mm", x, y)


@aten(A.addmm.default)
def _(b, bias, x, y, beta=1, alpha=1):
    w = _transposed_weight(y)
    if beta == 1 and alpha == 1 and w is not None and len(bias.shape) == 1:
        return b.emit("linear", x, w, bias)
    prod = b.emit("mm", x, y)
    if beta == 0:  # torch ignores the bias then, NaNs included
        return prod if alpha == 1 else b.emit("mul", prod, scalar(b, alpha, like=prod))
    if alpha != 1:
        prod = b.emit("mul", prod, scalar(b, alpha, like=prod))
    if beta != 1:
        bias = b.emit("mul", bias, scalar(b, beta, like=bias))
    return b.emit("add", bias, prod)


@aten(A.bmm.default)
def _(b, x, y):
    # matmul of a non-contiguous [B, T, I] input (attention's output after its transpose) by
    # a Linear's weight reaches us as bmm(x, expand(W.T)): it is linear(x, W), whose weight
    # the schemes, LoRA and int8 recognise.
    w = _transposed_weight(y.inputs[0]) if y.op == "expand" and len(y.inputs[0].shape) == 2 else None
    return b.emit("linear", x, w) if w is not None else b.emit("bmm", x, y)
