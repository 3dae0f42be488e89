"""Mixture-of-experts routing, as transformers' default experts implementation exports it.

transformers' "grouped_mm" experts sort the tokens by expert, count them per expert
(`histc`, then `cumsum` into offsets) and run one matrix product per expert over its run of
rows through its custom op `transformers::grouped_mm_fallback(x [S, I], w [E, I, O],
offs [E]) -> [S, O]`. The offsets are computed in the step, from the router's choice, so the
runs' lengths change from batch to batch while every shape stays fixed.

The router's integer arithmetic (floor division, the histogram) carries no gradient; the
grouped product's gradients are grouped products too, over the same runs.
"""
from __future__ import annotations

import torch

from edgetune.compiler.ir.ops.core import _operands
from edgetune.compiler.ir.ops.registry import ChannelSlice, aten, aten_named, register

A = torch.ops.aten


def _runs(offs: torch.Tensor):
    """(expert, start, end) of each expert's run of rows; empty runs are skipped."""
    start = 0
    for expert, end in enumerate(offs.tolist()):
        if end > start:
            yield expert, start, end
        start = end


def _grouped_mm(x, w, offs):
    out = x.new_zeros((x.shape[0], w.shape[2]))
    for e, start, end in _runs(offs):
        torch.mm(x[start:end], w[e], out=out[start:end])
    return out


def _grouped_mm_grad_weight(x, g, offs, *, experts):
    """d(out)/d(w) for g = d(loss)/d(out): per expert, its rows of x transposed times g's."""
    grad = x.new_zeros((experts, x.shape[1], g.shape[1]))
    for e, start, end in _runs(offs):
        torch.mm(x[start:end].T, g[start:end], out=grad[e])
    return grad


def _grouped_mm_vjp(b, n, g, want):
    x, w, offs = n.inputs
    if any(isinstance(v, ChannelSlice) for v in want):
        raise NotImplementedError(f"a ratio rule on the experts' weight {w.name}: train it whole")
    gx = b.emit("grouped_mm", g, b.emit("permute", w, dims=(0, 2, 1)), offs) if want[0] else None
    gw = b.emit("grouped_mm_grad_weight", x, g, offs, experts=w.shape[0]) if want[1] else None
    return gx, gw, None


register("grouped_mm", _grouped_mm, _grouped_mm_vjp,
         shape=lambda x, w, offs: ((x.shape[0], w.shape[2]), x.dtype))
register("grouped_mm_grad_weight", _grouped_mm_grad_weight,
         shape=lambda x, g, offs, experts: ((experts, x.shape[1], g.shape[1]), x.dtype))
aten_named("transformers.grouped_mm_fallback.default")(lambda b, x, w, offs: b.emit("grouped_mm", x, w, offs))

# Integer routing arithmetic: no gradient rules (nothing trainable flows through them).
register("div_rounded", lambda x, y, rounding_mode: torch.div(x, y, rounding_mode=rounding_mode))
register("histc", lambda x, bins, min, max: torch.histc(x, bins=bins, min=min, max=max),
         shape=lambda x, bins, min, max: ((bins,), x.dtype))


@aten(A.div.Tensor_mode, A.div.Scalar_mode)
def _(b, x, y, rounding_mode=None):
    if rounding_mode is None:
        return b.emit("div", *_operands(b, x, y))
    return b.emit("div_rounded", *_operands(b, x, y), rounding_mode=rounding_mode)


@aten(A.histc.default)
def _(b, x, bins=100, min=0, max=0):
    if min == max:  # torch then takes the data's own range: a shape-stable graph cannot
        raise NotImplementedError("histc without a fixed range (min == max)")
    return b.emit("histc", x, bins=int(bins), min=float(min), max=float(max))


@aten(A.empty_permuted.default)
def _(b, size, physical_layout, dtype=None, device=None, **_):
    # Its values are never read before being written (as aten.empty): zeros, deterministic.
    return b.emit("full", size=tuple(size), value=0, dtype=dtype or torch.get_default_dtype(), device=device or b.device)
