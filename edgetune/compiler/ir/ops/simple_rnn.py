"""nn.RNN layers (tanh or ReLU) as one op each, as gru.py does for GRUs.

torch.export decomposes `nn.RNN` into its time steps, each op a call from the generated Python
(0.74-0.88x eager's step where it trains, `python -m bench.recurrent --kinds rnn`), where eager
runs ATen's loop in C++. Here the forward is ATen's loop itself (eager's kernel), and the
backward reads nothing but the layer's outputs: every step's derivative of the nonlinearity is
computed from them at once, and a step is then two calls (the gradient of the step's
pre-activation, in place, and the one it sends to the state before, with the loss's gradient
of that state added by the same product).

`rnn_layer(x [T, N, I], h0 [N, H], w_ih [H, I], w_hh [H, H], b_ih, b_hh, reverse,
nonlinearity)` returns one flat buffer, y [T, N, H] then the last h, as gru_layer does;
`rnn_layer_grad` returns dx, dh0, dw_ih, dw_hh, db_ih, db_hh, packed: those its `wanted` names.
"""
from __future__ import annotations

import math

import torch

from edgetune.compiler.ir.ops.gru import _packed_parts, _parts, _states_before, write_input_side_grads
from edgetune.compiler.ir.ops.recurrent import (_dims, _onnx_at, _onnx_stacked, _onnx_unpacked, _packed_size, _steps,
                                                aten_layer, rnn_layers, wanted_grads_vjp, wanted_parts, wanted_size)
from edgetune.compiler.ir.ops.registry import aten, register

A = torch.ops.aten
_ATEN = {"tanh": A.rnn_tanh.input, "relu": A.rnn_relu.input}
_ONNX = {"tanh": "Tanh", "relu": "Relu"}


def _rnn_layer(x, h0, w_ih, w_hh, b_ih, b_hh, *, reverse, nonlinearity):
    """ATen's RNN (eager's kernel); a reverse layer runs on the steps flipped."""
    return aten_layer(_ATEN[nonlinearity], x, (h0,), [w_ih, w_hh, b_ih, b_hh], reverse)


def _derivatives(y, nonlinearity):
    """Each step's derivative of the nonlinearity, from its output: 1 - y^2 (tanh), y > 0 (ReLU)."""
    if nonlinearity == "tanh":
        return torch.mul(y, y).neg_().add_(1)
    return (y > 0).to(y.dtype)


def _backward_steps(gy, ghy, grads, w_hh, reverse):
    """The steps' pre-activation gradients, in place over `grads` (the derivatives), and dh0."""
    order = list(reversed(_steps(gy.shape[0], reverse)))
    step_grads, gy_steps = grads.unbind(0), gy.unbind(0)
    total = gy_steps[order[0]] + ghy  # the last step's output gradient: the loss's, y's and hy's
    for t, before in zip(order, order[1:]):
        step_grads[t].mul_(total)
        total = torch.addmm(gy_steps[before], step_grads[t], w_hh)
    step_grads[order[-1]].mul_(total)
    return step_grads[order[-1]] @ w_hh


def _rnn_layer_grad(g, packed, x, h0, w_ih, w_hh, b_ih, b_hh, *, reverse, nonlinearity, wanted=(True,) * 6):
    steps, batch, hidden = _dims(x, w_hh)
    y, _ = _parts(packed, x, w_hh)
    gy, ghy = _parts(g, x, w_hh)
    grads = _derivatives(y, nonlinearity)
    dh0 = _backward_steps(gy, ghy, grads, w_hh, reverse)
    rows = grads.view(steps * batch, hidden)
    inputs = (x, h0, w_ih, w_hh, b_ih, b_hh)
    out = x.new_empty(wanted_size(inputs, wanted))
    dx, dh0_out, dw_ih, dw_hh, db_ih, db_hh = wanted_parts(out, inputs, wanted)
    write_input_side_grads(rows, x, w_ih, dh0, dx, dh0_out, dw_ih, db_ih)
    if dw_hh is not None:
        torch.mm(rows.t(), _states_before(y, h0, reverse).reshape(steps * batch, hidden), out=dw_hh)
    if db_hh is not None:
        torch.sum(rows, 0, out=db_hh)
    return out


def _forward_scratch(n) -> int:
    """ATen's input side of every step and its outputs; a reverse layer's steps flipped."""
    x, w_hh = n.inputs[0], n.inputs[3]
    steps, batch, hidden = _dims(x, w_hh)
    flipped = (math.prod(x.shape) + steps * batch * hidden) if n.attrs["reverse"] else 0
    return (2 * steps * batch * hidden + flipped) * n.dtype.itemsize


def _grad_scratch(n) -> int:
    """The steps' gradients and the states before them, [T, N, H] each."""
    x, w_hh = n.inputs[2], n.inputs[5]
    steps, batch, hidden = _dims(x, w_hh)
    return 2 * steps * batch * hidden * n.dtype.itemsize


# -- ONNX: the forward as ONNX's RNN op (float32; float64, which onnxruntime's RNN lacks, step by
# step), the backward from the outputs, step by step --

def _onnx_rnn_layer(ctx, n, xs):
    x, h0, w_ih, w_hh, b_ih, b_hh = xs
    steps, hidden = n.inputs[0].shape[0], n.inputs[3].shape[1]
    flat = lambda t: ctx.op("Reshape", t, ctx.ints([-1]))  # noqa: E731
    if n.dtype == torch.float64:
        outputs = _onnx_steps(ctx, steps, n.attrs["reverse"], n.attrs["nonlinearity"], xs)
        return ctx.op("Concat", flat(_onnx_stacked(ctx, outputs)), flat(outputs[_steps(steps, n.attrs["reverse"])[-1]]),
                      axis=0)
    first = lambda t: ctx.op("Unsqueeze", t, ctx.ints([0]))  # noqa: E731  (ONNX's num_directions axis)
    y, hy = ctx.op("RNN", x, first(w_ih), first(w_hh), first(ctx.op("Concat", b_ih, b_hh, axis=0)), "", first(h0),
                   outputs=2, hidden_size=hidden, activations=[_ONNX[n.attrs["nonlinearity"]]],
                   direction="reverse" if n.attrs["reverse"] else "forward")
    return ctx.op("Concat", flat(y), flat(hy), axis=0)


def _onnx_steps(ctx, steps, reverse, nonlinearity, xs):
    """The layer in ONNX, step by step: {step: h after it}."""
    x, h, w_ih, w_hh, b_ih, b_hh = xs
    transposed = lambda t: ctx.op("Transpose", t, perm=[1, 0])  # noqa: E731
    projected = ctx.op("Add", ctx.op("MatMul", x, transposed(w_ih)), ctx.op("Add", b_ih, b_hh))
    w_hh_t, outputs = transposed(w_hh), {}
    for t in _steps(steps, reverse):
        h = outputs[t] = ctx.op(_ONNX[nonlinearity], ctx.op("Add", _onnx_at(ctx, projected, t), ctx.op("MatMul", h, w_hh_t)))
    return outputs


def _onnx_rnn_layer_grad(ctx, n, xs):
    """_rnn_layer_grad in ONNX: from the outputs in `packed`, the steps backward."""
    g, packed, x, h0, w_ih, w_hh, _, _ = xs
    steps, batch, hidden = _dims(n.inputs[2], n.inputs[5])
    (gy, dh), (y, _) = (_onnx_unpacked(ctx, t, _packed_parts(steps, batch, hidden)) for t in (g, packed))
    if n.attrs["nonlinearity"] == "tanh":
        derivative = ctx.op("Sub", ctx.scalar(1.0, n.dtype), ctx.op("Mul", y, y))
    else:
        derivative = ctx.cast(ctx.op("Greater", y, ctx.scalar(0.0, n.dtype)), n.dtype)
    grads = {}
    for t in reversed(_steps(steps, n.attrs["reverse"])):
        grads[t] = ctx.op("Mul", ctx.op("Add", dh, _onnx_at(ctx, gy, t)), _onnx_at(ctx, derivative, t))
        dh = ctx.op("MatMul", grads[t], w_hh)
    rows = lambda t, width: ctx.op("Reshape", t, ctx.ints([steps * batch, width]))  # noqa: E731
    flat_grads = rows(_onnx_stacked(ctx, grads), hidden)
    flat_grads_t = ctx.op("Transpose", flat_grads, perm=[1, 0])
    reverse = n.attrs["reverse"]
    before = ctx.op("Concat", *((ctx.op("Slice", y, ctx.ints([1]), ctx.ints([steps]), ctx.ints([0])),
                                 ctx.op("Unsqueeze", h0, ctx.ints([0]))) if reverse else
                                (ctx.op("Unsqueeze", h0, ctx.ints([0])),
                                 ctx.op("Slice", y, ctx.ints([0]), ctx.ints([steps - 1]), ctx.ints([0])))), axis=0)
    flat = lambda t: ctx.op("Reshape", t, ctx.ints([-1]))  # noqa: E731
    bias = lambda: ctx.reduce("ReduceSum", flat_grads, [0], keepdims=False)  # noqa: E731
    made = (lambda: flat(ctx.op("MatMul", flat_grads, w_ih)), lambda: flat(dh),
            lambda: flat(ctx.op("MatMul", flat_grads_t, rows(x, n.inputs[2].shape[2]))),
            lambda: flat(ctx.op("MatMul", flat_grads_t, rows(before, hidden))), bias, bias)
    return ctx.op("Concat", *(make() for make, w in zip(made, n.attrs.get("wanted", (True,) * 6)) if w), axis=0)


register("rnn_layer", _rnn_layer, wanted_grads_vjp("rnn_layer_grad", "reverse", "nonlinearity"),
         shape=lambda x, h0, w_ih, w_hh, b_ih, b_hh, reverse, nonlinearity: (
             (_packed_size(x, w_hh, _packed_parts),), x.dtype),
         scratch=_forward_scratch, onnx=_onnx_rnn_layer)
register("rnn_layer_grad", _rnn_layer_grad,
         shape=lambda g, packed, x, h0, w_ih, w_hh, b_ih, b_hh, reverse, nonlinearity, wanted=(True,) * 6: (
             (wanted_size((x, h0, w_ih, w_hh, b_ih, b_hh), wanted),), x.dtype),
         scratch=_grad_scratch, onnx=_onnx_rnn_layer_grad)


def _converter(nonlinearity):
    def convert(b, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
        """nn.RNN: one rnn_layer per layer and direction (recurrent.rnn_layers)."""
        return rnn_layers(b, "rnn_layer", _packed_parts, x, (hx,), params, has_biases, num_layers, bidirectional,
                          batch_first, nonlinearity=nonlinearity)
    return convert


for _name, _overload in _ATEN.items():
    aten(_overload)(_converter(_name))
