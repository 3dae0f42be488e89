"""Frozen linear weights held as int8 (per-output-channel, symmetric, weight-only).

`linear_int8(x, q, scale[, bias])` = linear(x, q * scale, bias): the float weight exists only
while the kernel runs, one layer at a time, so a frozen model costs a quarter of its float
size between uses. Built by edgetune/compiler/passes/int8.py; the trainer holds q and scale.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from edgetune.compiler.ir.ops.registry import register


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [O, I], scale [O, 1] in w's dtype) with w ~= q * scale; a zero row gets scale 1."""
    scale = w.detach().abs().amax(dim=1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w.detach() / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(scale.dtype).mul_(scale)


def _linear_int8(x, q, scale, bias=None):
    return F.linear(x, dequantize(q, scale), bias)


def _vjp(b, n, g, want):
    """The weight is frozen: only the input (and a trained bias) get gradients."""
    gx = b.emit("linear_int8_grad_input", g, n.inputs[1], n.inputs[2]) if want[0] else None
    gb = b.sum_to(g, n.inputs[3].shape) if len(n.inputs) == 4 and want[3] else None
    return (gx, None, None, gb)[: len(n.inputs)]


def _float_weight_bytes(n) -> int:
    q, scale = n.inputs[1], n.inputs[2]
    return q.nbytes * scale.dtype.itemsize


# ONNX: the int8 weight stays int8 in the model (an initializer a quarter of the float size)
# and is dequantized in the graph, as the kernel does, right where it is used.

def _onnx_dequantize(ctx, n, q, scale):
    scale_node = n.inputs[2]
    return ctx.op("Mul", ctx.cast(q, scale_node.dtype), scale)


def _linear_int8_onnx(ctx, n, xs):
    x, q, scale, *bias = xs
    w = ctx.op("Transpose", _onnx_dequantize(ctx, n, q, scale), perm=[1, 0])
    y = ctx.op("MatMul", x, w)
    return ctx.op("Add", y, bias[0]) if bias else y


register("linear_int8", _linear_int8, _vjp, scratch=_float_weight_bytes, onnx=_linear_int8_onnx)
register("linear_int8_grad_input", lambda g, q, scale: g @ dequantize(q, scale), scratch=_float_weight_bytes,
         onnx=lambda ctx, n, xs: ctx.op("MatMul", xs[0], _onnx_dequantize(ctx, n, xs[1], xs[2])))
