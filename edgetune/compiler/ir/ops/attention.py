"""Fused attention: scaled_dot_product_attention as one op, its backward by ATen's flash kernel.

What torch.export decomposes it into keeps the [..., T, S] probabilities for the backward and
spends passes on bookkeeping for rows masked entirely; this op keeps its output and one
log-sum-exp per query row, and the backward recomputes the probabilities block by block.
The frontend keeps the op whole where this kernel applies (CPU, 4-D, float32/64, no dropout, as
many key as query heads: `fused_attention_applies`) and lets torch decompose it elsewhere.

`sdpa` returns [..., T, Dv + 1]: the output, then the log-sum-exp, so one node carries both.
A trained float mask (Swin's and T5's relative position biases) gets its gradient from
`sdpa_grad_mask`, the scores' gradient, which holds the [..., T, S] scores once.
"""
from __future__ import annotations

import math

import torch

from edgetune.compiler.ir.ops.core import grad_like
from edgetune.compiler.ir.ops.registry import aten, register

A = torch.ops.aten


def fused_attention_applies(q, k, attn_mask, dropout_p, enable_gqa, device) -> bool:
    """Whether `sdpa` can stand for this call (arguments as torch.export's fake tensors)."""
    # float32/64 only: the log-sum-exp travels in the output's dtype, and bfloat16 would round it.
    return (device.type == "cpu" and dropout_p == 0 and q.dim() == 4 and k.dim() == 4
            and q.dtype in (torch.float32, torch.float64)
            and q.shape[1] == k.shape[1] and (attn_mask is None or attn_mask.dim() <= 4))


def _float_mask(mask, dtype):
    """The kernel takes additive masks in the query's dtype: a boolean one becomes 0 / -inf."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)


def _sdpa(q, k, v, mask=None, *, is_causal, scale):
    out, lse = A._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal,
                                                              attn_mask=_float_mask(mask, q.dtype), scale=scale)
    return torch.cat([out, lse.unsqueeze(-1).to(out.dtype)], dim=-1)


def _sdpa_grad(g, q, k, v, *rest, is_causal, scale):
    """dq, dk, dv flattened into one buffer (one kernel computes all three). g: the gradient of
    the packed output, or of its first Dv columns alone."""
    mask, packed = (rest[0], rest[1]) if len(rest) == 2 else (None, rest[0])
    d = v.shape[-1]
    out, lse = packed[..., :d], packed[..., d].contiguous()
    dq, dk, dv = A._scaled_dot_product_flash_attention_for_cpu_backward(
        g[..., :d].contiguous(), q, k, v, out, lse, 0.0, is_causal, attn_mask=_float_mask(mask, q.dtype), scale=scale)
    return torch.cat([dq.reshape(-1), dk.reshape(-1), dv.reshape(-1)])


def _sdpa_grad_mask(g, q, k, v, mask, packed, *, is_causal, scale):
    """The gradient of the (additive, float) mask: that of the scores, ds = p * (g v^T -
    rowsum(g * out)) with p = exp(s - lse), over the broadcast [..., T, S]. A row that sees
    no key (lse = -inf) has no gradient, as in the kernel's backward."""
    d = v.shape[-1]
    g, out, lse = g[..., :d], packed[..., :d], packed[..., d:]
    s = torch.matmul(q, k.transpose(-2, -1)) * scale + mask
    if is_causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), -math.inf)
    p = torch.where(torch.isneginf(lse), 0.0, torch.exp(s - lse))
    return p * (torch.matmul(g, v.transpose(-2, -1)) - (g * out).sum(-1, keepdim=True))


def _sdpa_vjp(b, n, g, want):
    q, k, v = n.inputs[:3]
    d = v.shape[-1]
    if g.op == "slice_grad" and (g.attrs["dim"], g.attrs["start"], g.attrs["end"], g.attrs["step"]) == \
            (len(n.shape) - 1, 0, d, 1):
        # The output's gradient, padded with zeros where the log-sum-exp sits: the kernel reads
        # only the first Dv columns, so it takes the unpadded one (the padding is never made).
        g = g.inputs[0]
    flat = b.emit("sdpa_grad", g, *n.inputs, n, **n.attrs) if any(want[:3]) else None
    grads, start = [], 0
    for x, w in zip((q, k, v), want[:3]):
        size = math.prod(x.shape)
        piece = b.emit("slice", flat, dim=0, start=start, end=start + size, step=1) if w else None
        grads.append(b.emit("reshape", piece, shape=tuple(x.shape)) if w else None)
        start += size
    if len(n.inputs) == 4:
        mask = n.inputs[3]
        grads.append(grad_like(b, b.emit("sdpa_grad_mask", g, *n.inputs, n, **n.attrs), mask) if want[3] else None)
    return tuple(grads)


# ONNX: the same packing, computed without blocks (the runtime holds the [..., T, S] scores).

def _onnx_transposed(ctx, x, rank):
    return ctx.op("Transpose", x, perm=list(range(rank - 2)) + [rank - 1, rank - 2])


def _onnx_scores(ctx, attrs, operands, q, k, mask):
    """scale * q k^T with the mask applied (a boolean one: -inf where false; causal: above
    the diagonal, aligned to the top-left as torch does). `operands`: the forward's (q, k, v
    [, mask]) nodes."""
    qn, kn = operands[0], operands[1]
    c = lambda v: ctx.scalar(v, qn.dtype)  # noqa: E731
    scores = ctx.op("Mul", ctx.op("MatMul", q, _onnx_transposed(ctx, k, len(kn.shape))), c(attrs["scale"]))
    if mask is not None:
        m = operands[3]
        scores = (ctx.op("Where", mask, scores, c(-math.inf)) if m.dtype == torch.bool
                  else ctx.op("Add", scores, ctx.convert(mask, m.dtype, qn.dtype)))
    if attrs["is_causal"]:
        t, s = qn.shape[-2], kn.shape[-2]
        above = torch.ones(t, s, dtype=torch.bool).triu(1)
        scores = ctx.op("Where", ctx.const(above), c(-math.inf), scores)
    return scores


def _sdpa_onnx(ctx, n, xs):
    q, k, v, *mask = xs
    scores = _onnx_scores(ctx, n.attrs, n.inputs, q, k, mask[0] if mask else None)
    lse = ctx.reduce("ReduceLogSumExp", scores, [-1], keepdims=True)
    out = ctx.op("MatMul", ctx.op("Exp", ctx.op("Sub", scores, lse)), v)
    return ctx.op("Concat", out, lse, axis=-1)


def _onnx_score_grad(ctx, n, xs):
    """(p, ds, the output's gradient) of a backward node (sdpa_grad, sdpa_grad_mask): with
    p = exp(s - lse), ds = p * (g v^T - rowsum(g * out))."""
    g, q, k, v, *rest = xs
    mask, packed = (rest[0], rest[1]) if len(rest) == 2 else (None, rest[0])
    qn, vn = n.inputs[1], n.inputs[3]
    rank, d = len(qn.shape), vn.shape[-1]
    last = lambda x, start, end: ctx.op("Slice", x, ctx.ints([start]), ctx.ints([end]), ctx.ints([-1]))  # noqa: E731
    gout, out, lse = last(g, 0, d), last(packed, 0, d), last(packed, d, d + 1)
    p = ctx.op("Exp", ctx.op("Sub", _onnx_scores(ctx, n.attrs, n.inputs[1:-1], q, k, mask), lse))
    row = ctx.reduce("ReduceSum", ctx.op("Mul", gout, out), [-1], keepdims=True)
    ds = ctx.op("Mul", p, ctx.op("Sub", ctx.op("MatMul", gout, _onnx_transposed(ctx, v, rank)), row))
    return p, ds, gout


def _sdpa_grad_onnx(ctx, n, xs):
    """The attention backward from the kept output and log-sum-exp: dv = p^T g,
    dq = scale ds k, dk = scale ds^T q (p, ds: _onnx_score_grad)."""
    q, k = xs[1], xs[2]
    qn = n.inputs[1]
    rank = len(qn.shape)
    p, ds, gout = _onnx_score_grad(ctx, n, xs)
    dv = ctx.op("MatMul", _onnx_transposed(ctx, p, rank), gout)
    scale = ctx.scalar(n.attrs["scale"], qn.dtype)
    dq = ctx.op("Mul", ctx.op("MatMul", ds, k), scale)
    dk = ctx.op("Mul", ctx.op("MatMul", _onnx_transposed(ctx, ds, rank), q), scale)
    flat = lambda x: ctx.op("Reshape", x, ctx.ints([-1]))  # noqa: E731
    return ctx.op("Concat", flat(dq), flat(dk), flat(dv), axis=0)


register("sdpa", _sdpa, _sdpa_vjp,
         shape=lambda q, k, v, *mask, is_causal, scale: ((*q.shape[:-1], v.shape[-1] + 1), q.dtype), onnx=_sdpa_onnx)
register("sdpa_grad_mask", _sdpa_grad_mask,
         shape=lambda g, q, k, v, mask, packed, is_causal, scale: (
             tuple(torch.broadcast_shapes((*q.shape[:-1], k.shape[-2]), mask.shape)), q.dtype),
         # The scores, their exponentials and g v^T, each the size of the output, live at once.
         scratch=lambda n: 3 * n.nbytes,
         onnx=lambda ctx, n, xs: _onnx_score_grad(ctx, n, xs)[1])
register("sdpa_grad", _sdpa_grad,
         shape=lambda g, q, k, v, *rest, is_causal, scale: ((sum(math.prod(x.shape) for x in (q, k, v)),), q.dtype),
         onnx=_sdpa_grad_onnx)


@aten(A.scaled_dot_product_attention.default)
def _(b, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    inputs = (q, k, v) + ((attn_mask,) if attn_mask is not None else ())
    packed = b.emit("sdpa", *inputs, is_causal=bool(is_causal), scale=float(scale))
    return b.emit("slice", packed, dim=len(packed.shape) - 1, start=0, end=v.shape[-1], step=1)
