"""Fused attention: scaled_dot_product_attention as one op, its backward by ATen's flash kernel.

What torch.export decomposes it into keeps the [..., T, S] probabilities for the backward and
spends passes on bookkeeping for rows masked entirely; this op keeps its output and one
log-sum-exp per query row, and the backward recomputes the probabilities block by block.
The frontend keeps the op whole where this kernel applies (CPU, 4-D, float32/64, no dropout, as
many key as query heads: `fused_attention_applies`) and lets torch decompose it elsewhere.

`sdpa` returns one flat buffer: the output, then the log-sum-exp, so one node carries both. Both
are laid out token-major ([N, T, H, ...]), as the kernel writes them: the [N, H, T, Dv] output a
model reads is a view of it, and the output and its gradient reach the backward kernel in the
layout it works in, without copies. `sdpa_grad` packs dq, dk, dv the same way, one after the
other, or, where the three have one shape (self-attention), interleaved as [N, T, 3, H, D]: the
layout of the fused qkv projection that usually made them, whose gradient is then a view of the
buffer (the views pass sees the pieces' cat through). A trained float
mask (Swin's and T5's relative position biases) gets its gradient from `sdpa_grad_mask`, the
scores' gradient, which holds the [..., T, S] scores once.
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
    """The kernel takes additive masks in the query's dtype (a boolean one becomes 0 / -inf) of
    2 or 4 dimensions: a 3-D one, which broadcasts from the right as [1, H, T, S], gets its
    leading axis."""
    if mask is None:
        return None
    if mask.dim() == 3:
        mask = mask.unsqueeze(0)
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)


def _sdpa(q, k, v, mask=None, *, is_causal, scale):
    out, lse = A._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal,
                                                              attn_mask=_float_mask(mask, q.dtype), scale=scale)
    return torch.cat([_token_major(out), _token_major(lse).to(out.dtype)])


def _token_major(t):
    """A head-major [N, H, T, ...] tensor flattened in [N, T, H, ...] order (a view of what the
    CPU kernel returns: it allocates token-major and hands out transposed views)."""
    return t.transpose(1, 2).reshape(-1)


def _head_major(flat, n, h, t, d=None):
    """The inverse of _token_major: [N, H, T(, D)] viewed from the front of `flat`."""
    shape = (n, t, h) if d is None else (n, t, h, d)
    return flat[:math.prod(shape)].view(shape).transpose(1, 2)


def _output_size(q, v) -> int:
    return math.prod(q.shape[:3]) * v.shape[-1]


def _unpacked(packed, q, v):
    """The forward's output [N, H, T, Dv] and log-sum-exp [N, H, T], views of its buffer."""
    n, h, t = q.shape[:3]
    return _head_major(packed, n, h, t, v.shape[-1]), _head_major(packed[_output_size(q, v):], n, h, t)


def _output_grad(g, q, v):
    """The output's gradient as [N, H, T, Dv]: g is packed like the forward's buffer (or holds
    only its first part, the output's)."""
    return _head_major(g.reshape(-1), *q.shape[:3], v.shape[-1])


def _sdpa_grad(g, q, k, v, *rest, is_causal, scale, interleaved=False):
    """dq, dk, dv packed into one buffer (one kernel computes all three), token-major: one
    after the other, or interleaved as [N, T, 3, H, D]."""
    mask, packed = (rest[0], rest[1]) if len(rest) == 2 else (None, rest[0])
    out, lse = _unpacked(packed, q, v)
    grads = A._scaled_dot_product_flash_attention_for_cpu_backward(
        _output_grad(g, q, v), q, k, v, out, lse, 0.0, is_causal, attn_mask=_float_mask(mask, q.dtype), scale=scale)
    if interleaved:
        return torch.stack([x.transpose(1, 2) for x in grads], dim=2).reshape(-1)
    return torch.cat([_token_major(x) for x in grads])


def _sdpa_grad_mask(g, q, k, v, mask, packed, *, is_causal, scale):
    """The gradient of the (additive, float) mask: that of the scores, ds = p * (g v^T -
    rowsum(g * out)) with p = exp(s - lse), over the broadcast [..., T, S]. A row that sees
    no key (its scores all -inf; the kernel writes its lse as 0, or -inf) has no gradient, as
    in the kernel's backward."""
    out, lse = _unpacked(packed, q, v)
    g, lse = _output_grad(g, q, v), lse.unsqueeze(-1)
    s = torch.matmul(q, k.transpose(-2, -1)) * scale + mask
    if is_causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), -math.inf)
    p = torch.where(torch.isneginf(lse), 0.0, torch.exp(s - lse))
    return p * (torch.matmul(g, v.transpose(-2, -1)) - (g * out).sum(-1, keepdim=True))


def _sdpa_vjp(b, n, g, want):
    q, k, v = n.inputs[:3]
    if g.op == "slice_grad" and (g.attrs["start"], g.attrs["end"], g.attrs["step"]) == (0, _output_size(q, v), 1):
        # The output's gradient, padded with zeros where the log-sum-exp sits: the kernel reads
        # only the output's part, so it takes the unpadded one (the padding is never made).
        g = g.inputs[0]
    interleaved = tuple(q.shape) == tuple(k.shape) == tuple(v.shape)
    flat = b.emit("sdpa_grad", g, *n.inputs, n, **n.attrs, interleaved=interleaved) if any(want[:3]) else None
    grads, start = [], 0
    for i, (x, w) in enumerate(zip((q, k, v), want[:3])):
        size = math.prod(x.shape)
        if not w:
            grads.append(None)
        elif interleaved:
            nb, h, t, d = x.shape
            piece = b.emit("select", b.emit("reshape", flat, shape=(nb, t, 3, h, d)), dim=2, index=i)
            grads.append(b.emit("permute", piece, dims=(0, 2, 1, 3)))
        else:
            piece = b.emit("slice", flat, dim=0, start=start, end=start + size, step=1)
            grads.append(_head_major_node(b, piece, x.shape))
        start += size
    if len(n.inputs) == 4:
        mask = n.inputs[3]
        grads.append(grad_like(b, b.emit("sdpa_grad_mask", g, *n.inputs, n, **n.attrs), mask) if want[3] else None)
    return tuple(grads)


def _head_major_node(b, flat, shape):
    """head_major in the graph: [N, H, T, D] from a token-major flat node."""
    nb, h, t, d = shape
    return b.emit("permute", b.emit("reshape", flat, shape=(nb, t, h, d)), dims=(0, 2, 1, 3))


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


def _onnx_token_major(ctx, x):
    return ctx.op("Reshape", ctx.op("Transpose", x, perm=[0, 2, 1, 3]), ctx.ints([-1]))


def _onnx_head_major(ctx, flat, start, shape):
    """[N, H, T, X] from the token-major values of `flat` from `start` on."""
    nb, h, t, x = shape
    part = ctx.op("Slice", flat, ctx.ints([start]), ctx.ints([start + nb * h * t * x]), ctx.ints([0]))
    return ctx.op("Transpose", ctx.op("Reshape", part, ctx.ints([nb, t, h, x])), perm=[0, 2, 1, 3])


def _sdpa_onnx(ctx, n, xs):
    """p = softmax(s), onnxruntime's fused kernel; out = p v; lse = rowmax(s) - log(rowmax(p)),
    since p's largest entry is exp(rowmax(s) - lse). (onnxruntime's ReduceLogSumExp, before
    exp(s - lse), took 1.25 ms a call on ViT's [1, 4, 257, 257] scores, 18% of its step.)"""
    q, k, v, *mask = xs
    scores = _onnx_scores(ctx, n.attrs, n.inputs, q, k, mask[0] if mask else None)
    p = _onnx_probabilities(ctx, scores, n.inputs[0].dtype, masked=bool(mask))
    out = ctx.op("MatMul", p, v)
    top = ctx.reduce("ReduceMax", scores, [-1], keepdims=True)
    lse = ctx.op("Sub", top, ctx.op("Log", ctx.reduce("ReduceMax", p, [-1], keepdims=True)))
    if mask:  # a row that sees no key: 0, as the kernel writes it, not -inf - log(0)
        lse = ctx.op("Where", ctx.op("IsNaN", lse), ctx.scalar(0.0, n.inputs[0].dtype), lse)
    return ctx.op("Concat", _onnx_token_major(ctx, out), _onnx_token_major(ctx, lse), axis=0)


def _onnx_probabilities(ctx, scores, dtype, masked: bool):
    """softmax(scores); under a mask a query row may see no key at all (left padding under a
    causal mask), whose softmax is 0 / 0: torch's kernel gives it zeros, and so does this."""
    p = ctx.op("Softmax", scores, axis=-1)
    return ctx.op("Where", ctx.op("IsNaN", p), ctx.scalar(0.0, dtype), p) if masked else p


def _onnx_score_grad(ctx, n, xs):
    """(p, ds, the output's gradient) of a backward node (sdpa_grad, sdpa_grad_mask): with
    p = softmax(s) (that is exp(s - lse), without reading the kept lse), ds = p * (g v^T -
    rowsum(g * out))."""
    g, q, k, v, *rest = xs
    mask, packed = (rest[0], rest[1]) if len(rest) == 2 else (None, rest[0])
    qn, vn = n.inputs[1], n.inputs[3]
    rank, heads = len(qn.shape), tuple(qn.shape[:3])
    gout = _onnx_head_major(ctx, ctx.op("Reshape", g, ctx.ints([-1])), 0, (*heads, vn.shape[-1]))
    out = _onnx_head_major(ctx, packed, 0, (*heads, vn.shape[-1]))
    p = _onnx_probabilities(ctx, _onnx_scores(ctx, n.attrs, n.inputs[1:-1], q, k, mask), qn.dtype,
                            masked=mask is not None)
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
    if n.attrs.get("interleaved"):
        pieces = [ctx.op("Unsqueeze", ctx.op("Transpose", x, perm=[0, 2, 1, 3]), ctx.ints([2])) for x in (dq, dk, dv)]
        return ctx.op("Reshape", ctx.op("Concat", *pieces, axis=2), ctx.ints([-1]))
    return ctx.op("Concat", *(_onnx_token_major(ctx, x) for x in (dq, dk, dv)), axis=0)


register("sdpa", _sdpa, _sdpa_vjp,
         shape=lambda q, k, v, *mask, is_causal, scale: ((math.prod(q.shape[:-1]) * (v.shape[-1] + 1),), q.dtype),
         onnx=_sdpa_onnx)
register("sdpa_grad_mask", _sdpa_grad_mask,
         shape=lambda g, q, k, v, mask, packed, is_causal, scale: (
             tuple(torch.broadcast_shapes((*q.shape[:-1], k.shape[-2]), mask.shape)), q.dtype),
         # The scores, their exponentials and g v^T, each the size of the output, live at once.
         scratch=lambda n: 3 * n.nbytes,
         onnx=lambda ctx, n, xs: _onnx_score_grad(ctx, n, xs)[1])
register("sdpa_grad", _sdpa_grad,
         shape=lambda g, q, k, v, *rest, is_causal, scale, interleaved=False: (
             (sum(math.prod(x.shape) for x in (q, k, v)),), q.dtype),
         onnx=_sdpa_grad_onnx)


@aten(A.scaled_dot_product_attention.default)
def _(b, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    inputs = (q, k, v) + ((attn_mask,) if attn_mask is not None else ())
    packed = b.emit("sdpa", *inputs, is_causal=bool(is_causal), scale=float(scale))
    out = b.emit("slice", packed, dim=0, start=0, end=_output_size(q, v), step=1)
    return _head_major_node(b, out, (*q.shape[:3], v.shape[-1]))
