"""The language-model head and its cross-entropy as one op, computed a slice of the vocabulary
at a time, so that neither the logits [N, V] nor their gradient ever exist whole.

`vocab_log_prob(h, w, target)` -> [N, 1 + D], packed because a Node has one output:
- column 0: log_softmax(h @ w.T)[i, target[i]], the value the loss reads (through a slice);
- columns 1..D: d(column 0)/d(h[i]) = w[target[i]] - softmax_i @ w, the row's gradient
  direction. It costs one more pass of matmuls in the forward, the one the backward would
  make anyway, and it makes the backward of h a row scaling: no [N, V] tensor is saved
  and nothing is recomputed for it.
The weight's gradient (a tied embedding trained as the head) recomputes the logits slice
by slice; the log-sum-exp comes back from column 0 and a dot product.

Built by edgetune/compiler/passes/vocab_loss.py from `linear -> log_softmax -> gather`. Where
the loss masks out the rows of one label (cross-entropy's ignore_index: a chat's prompt and
padding, about half its tokens), the op gets the labels unmasked and `ignore=c`: those rows are
never computed, and read 0 in every column (the loss multiplies them by nothing). The torch
kernels take the learned rows out first, so the head's matmuls run on those rows alone.
"""
from __future__ import annotations

import torch

from edgetune.compiler.ir.ops.registry import ChannelSlice, register
from edgetune.compiler.ir.ops.nn import take_channels

# One [N, chunk] block of logits, the op's scratch. 4 MB is big enough for an efficient matmul:
# SmolLM2's head (512 rows, 49,152 words) took as long in slices of 2,048 words as of 8,192
# (forward 388 / 386 ms, weight gradient 405 / 431 ms, one thread; alike at two).
SLICE_BYTES = 4 * 2 ** 20


def vocab_chunk(n_rows: int, vocab: int, itemsize: int) -> int:
    return max(1, min(vocab, SLICE_BYTES // max(1, n_rows * itemsize)))


def _vocab_log_prob(h, w, target, *, chunk, ignore=None):
    learned = _learned_rows(target, ignore)
    if learned is None:
        return _log_prob_rows(h, w, target, chunk)
    out = h.new_zeros((h.shape[0], 1 + h.shape[1]))
    if len(learned):
        out[learned] = _log_prob_rows(h[learned], w, target[learned], chunk)
    return out


def _learned_rows(target, ignore):
    """The indices of the rows whose target is not `ignore`, or None where every row is learned."""
    if ignore is None:
        return None
    learned = target[:, 0] != ignore
    return None if bool(learned.all()) else learned.nonzero()[:, 0]


def _log_prob_rows(h, w, target, chunk):
    n, d = h.shape
    running_max = h.new_full((n, 1), float("-inf"))
    total = h.new_zeros((n, 1))
    weighted = h.new_zeros((n, d))  # sum_v exp(logit_v - running_max) * w[v]
    for start in range(0, w.shape[0], chunk):
        w_slice = w[start:start + chunk]
        logits = h @ w_slice.T
        new_max = torch.maximum(running_max, logits.amax(1, keepdim=True))
        rescale = torch.exp(running_max - new_max)  # online softmax: earlier slices' terms
        p = logits.sub_(new_max).exp_()
        total = total * rescale + p.sum(1, keepdim=True)
        weighted = weighted * rescale + p @ w_slice
        running_max = new_max
        del logits, p  # else they live on while the next slice is allocated: two slices, not one
    target_rows = w[target[:, 0]]
    out = torch.empty((n, 1 + d), dtype=h.dtype, device=h.device)
    out[:, :1] = (h * target_rows).sum(1, keepdim=True) - running_max - total.log()
    out[:, 1:] = target_rows - weighted / total
    return out


def _grad_h(g, packed):
    return g[:, :1] * packed[:, 1:]


def _grad_w(g, h, w, target, packed, extra=None, *, chunk, rows=False, ignore=None):
    """The weight's gradient. `extra` is h_part (h's chosen columns: a ratio rule on the
    weight's hidden axis), giving only those columns of it, [V, k] (the logits still need all
    of h); or, where `rows`, the sorted ids of the chosen rows (a rows rule on a tied table),
    giving only those rows, [k, D]. Rows of label `ignore` give nothing (their g is 0, and
    their packed column 0 is not a log-probability to take the log-sum-exp from)."""
    g = g[:, :1]
    learned = _learned_rows(target, ignore)
    if learned is not None:
        g, h, target, packed = g[learned], h[learned], target[learned], packed[learned]
        if extra is not None and not rows:
            extra = extra[learned]
    target = target[:, 0].contiguous()  # searchsorted below warns on a strided column
    log_sum_exp = (h * w[target]).sum(1, keepdim=True) - packed[:, :1]
    h_out = extra if extra is not None and not rows else h
    ids = extra if rows else torch.arange(w.shape[0], device=w.device)
    positions = torch.arange(h.shape[0], device=h.device)
    grad = w.new_empty((len(ids), h_out.shape[1]))
    for start in range(0, len(ids), chunk):
        chunk_ids = ids[start:start + chunk]
        w_slice = w.index_select(0, chunk_ids) if rows else w[start:start + chunk]
        # d loss / d logits = g * (onehot(target) - softmax)
        g_logits = (h @ w_slice.T).sub_(log_sum_exp).exp_().mul_(-g)
        at = torch.searchsorted(chunk_ids, target).clamp_(max=len(chunk_ids) - 1)  # each row's target column
        hit = chunk_ids[at] == target
        g_logits[positions[hit], at[hit]] += g[hit, 0]
        torch.matmul(g_logits.T, h_out, out=grad[start:start + chunk])  # rows of grad: no [chunk, D] temporary
        del g_logits  # one slice at a time, as in the forward
    return grad


def _vjp(b, n, g, want):
    h, w, target = n.inputs
    gh = b.emit("vocab_log_prob_grad_h", g, n) if want[0] else None
    gw = None
    if want[1]:
        part = want[1] if isinstance(want[1], ChannelSlice) else None
        if part is not None and part.axis == 0:  # chosen rows (tokens) of a tied table
            gw = b.emit("vocab_log_prob_grad_w", g, h, w, target, n, part.index, rows=True, **n.attrs)
        else:
            h_part = [take_channels(b, h, part, dim=1)] if part is not None else []
            gw = b.emit("vocab_log_prob_grad_w", g, h, w, target, n, *h_part, **n.attrs)
    return gh, gw, None


def _scratch(n) -> int:
    """The kernel's live logits slice (its exponentials are taken in place) and the products
    of a slice and its running sums, each of h's size; under `ignore`, also the learned rows
    of h and their packed result, before it is written into the output."""
    h = n.inputs[0]
    rows = h.nbytes + n.nbytes if n.attrs.get("ignore") is not None else 0
    return h.shape[0] * n.attrs["chunk"] * h.dtype.itemsize + 2 * h.nbytes + rows


def _grad_w_scratch(n) -> int:
    """One slice of logits, their gradient in place; under a rows rule also the chosen rows'
    slice of the weight, gathered; under `ignore`, the learned rows of h and of the packed
    forward, taken out."""
    h, w, packed = n.inputs[1], n.inputs[2], n.inputs[4]
    rows = w.shape[1] * n.attrs["chunk"] * w.dtype.itemsize if n.attrs.get("rows") else 0
    learned = h.nbytes + packed.nbytes if n.attrs.get("ignore") is not None else 0
    return h.shape[0] * n.attrs["chunk"] * h.dtype.itemsize + rows + learned


def _shape(h, w, target, *, chunk, ignore=None):
    return (h.shape[0], 1 + h.shape[1]), h.dtype


# -- ONNX: the same slices, unrolled ----------------------------------------------------------
# The lowerings unroll the kernels' loop over the node's `chunk`: one block of nodes per slice
# of the vocabulary. A plain lowering over the whole vocabulary would hold the [N, V] logits
# (and their exponentials) at once, which is what this op exists to avoid; unrolled, a runtime
# that frees a value after its last reader holds one slice's block at a time, and the
# arithmetic is the kernels' own, slice for slice. The slice count is bounded by the logits'
# size over SLICE_BYTES (a few for a real LM; one for a small batch).

def _onnx_slices(vocab, chunk):
    return [(start, min(start + chunk, vocab)) for start in range(0, vocab, chunk)]


def _onnx_rows(ctx, w, start, stop):
    return ctx.op("Slice", w, ctx.ints([start]), ctx.ints([stop]), ctx.ints([0]))


def _onnx_target_rows(ctx, w, target):
    """w[target[:, 0]]: [N, D]."""
    return ctx.op("Gather", w, ctx.op("Reshape", target, ctx.ints([-1])), axis=0)


def _onnx_learned(ctx, n, target):
    """(target with `ignore` read as word 0, the [N, 1] learned rows), or (target, None). The
    lowerings compute every row, then give the ignored ones the kernels' zeros."""
    ignore = n.attrs.get("ignore")
    if ignore is None:
        return target, None
    label_type = (n.inputs[2] if n.op == "vocab_log_prob" else n.inputs[3]).dtype
    word = lambda v: ctx.scalar(v, label_type)  # noqa: E731
    learned = ctx.op("Not", ctx.op("Equal", target, word(ignore)))
    return ctx.op("Where", learned, target, word(0)), learned


def _vocab_log_prob_onnx(ctx, n, xs):
    h, w, target = xs
    target, learned = _onnx_learned(ctx, n, target)
    running_max = total = weighted = None
    for start, stop in _onnx_slices(n.inputs[1].shape[0], n.attrs["chunk"]):
        w_slice = _onnx_rows(ctx, w, start, stop)
        logits = ctx.op("MatMul", h, ctx.op("Transpose", w_slice, perm=[1, 0]))
        slice_max = ctx.reduce("ReduceMax", logits, [1], keepdims=True)
        new_max = slice_max if running_max is None else ctx.op("Max", running_max, slice_max)
        p = ctx.op("Exp", ctx.op("Sub", logits, new_max))
        slice_total, slice_weighted = ctx.reduce("ReduceSum", p, [1], keepdims=True), ctx.op("MatMul", p, w_slice)
        if running_max is None:  # the kernel rescales its zeros by exp(-inf) here: the sums alone
            total, weighted = slice_total, slice_weighted
        else:
            rescale = ctx.op("Exp", ctx.op("Sub", running_max, new_max))  # online softmax: earlier slices' terms
            total = ctx.op("Add", ctx.op("Mul", total, rescale), slice_total)
            weighted = ctx.op("Add", ctx.op("Mul", weighted, rescale), slice_weighted)
        running_max = new_max
    target_rows = _onnx_target_rows(ctx, w, target)
    dot = ctx.reduce("ReduceSum", ctx.op("Mul", h, target_rows), [1], keepdims=True)
    value = ctx.op("Sub", ctx.op("Sub", dot, running_max), ctx.op("Log", total))
    direction = ctx.op("Sub", target_rows, ctx.op("Div", weighted, total))
    packed = ctx.op("Concat", value, direction, axis=1)
    return packed if learned is None else ctx.op("Where", learned, packed, ctx.scalar(0, n.dtype))


def _grad_h_onnx(ctx, n, xs):
    g, packed = xs
    width = n.inputs[1].shape[1]
    column = lambda v, a, b: ctx.op("Slice", v, ctx.ints([a]), ctx.ints([b]), ctx.ints([1]))  # noqa: E731
    return ctx.op("Mul", column(g, 0, 1), column(packed, 1, width))


def _grad_w_onnx(ctx, n, xs):
    """Per slice: g * (onehot(target) - softmax) as the kernel adds it (-g * p, then + g at each
    row's target), its transpose times h; the slices' rows concatenated."""
    g, h, w, target, packed = xs[:5]
    rows = n.attrs.get("rows")
    h_out = xs[5] if len(xs) == 6 and not rows else h  # the chosen columns of h, under a ratio rule
    ids = xs[5] if rows else None  # the chosen rows, under a rows rule
    first = lambda v: ctx.op("Slice", v, ctx.ints([0]), ctx.ints([1]), ctx.ints([1]))  # noqa: E731  (column 0)
    g = first(g)
    target, learned = _onnx_learned(ctx, n, target)
    if learned is not None:  # as the kernel, which takes the learned rows alone
        g = ctx.op("Where", learned, g, ctx.scalar(0, n.dtype))
    dot = ctx.reduce("ReduceSum", ctx.op("Mul", h, _onnx_target_rows(ctx, w, target)), [1], keepdims=True)
    log_sum_exp, minus_g, grads = ctx.op("Sub", dot, first(packed)), ctx.op("Neg", g), []
    word = lambda v: ctx.scalar(v, torch.int64)  # noqa: E731
    for start, stop in _onnx_slices(n.shape[0], n.attrs["chunk"]):
        if rows:
            chunk_ids = _onnx_rows(ctx, ids, start, stop)
            w_slice = ctx.op("Gather", w, chunk_ids, axis=0)
        else:
            chunk_ids = ctx.op("Range", word(start), word(stop), word(1))
            w_slice = _onnx_rows(ctx, w, start, stop)
        logits = ctx.op("MatMul", h, ctx.op("Transpose", w_slice, perm=[1, 0]))
        g_logits = ctx.op("Mul", ctx.op("Exp", ctx.op("Sub", logits, log_sum_exp)), minus_g)
        if learned is not None:  # an ignored row's log-sum-exp is not one: its exp may overflow
            g_logits = ctx.op("Where", learned, g_logits, ctx.scalar(0, n.dtype))
        words = ctx.op("Reshape", chunk_ids, ctx.ints([1, -1]))
        at_target = ctx.op("Where", ctx.op("Equal", target, words), g, ctx.scalar(0, n.dtype))  # [N, slice]
        g_logits = ctx.op("Add", g_logits, at_target)
        grads.append(ctx.op("MatMul", ctx.op("Transpose", g_logits, perm=[1, 0]), h_out))
    return grads[0] if len(grads) == 1 else ctx.op("Concat", *grads, axis=0)


register("vocab_log_prob", _vocab_log_prob, _vjp, shape=_shape, scratch=_scratch, onnx=_vocab_log_prob_onnx)
register("vocab_log_prob_grad_h", _grad_h, shape=lambda g, packed: ((g.shape[0], packed.shape[1] - 1), g.dtype),
         onnx=_grad_h_onnx)
register("vocab_log_prob_grad_w", _grad_w,
         shape=lambda g, h, w, target, packed, extra=None, chunk=0, rows=False, ignore=None: (
             (extra.shape[0], h.shape[1]) if rows else (w.shape[0], (h if extra is None else extra).shape[1]), w.dtype),
         scratch=_grad_w_scratch, onnx=_grad_w_onnx)
