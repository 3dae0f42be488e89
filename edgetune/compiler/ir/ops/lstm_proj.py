"""LSTM layers with a projection (`nn.LSTM(proj_size=P)`, the LSTMP of streaming speech
models) as one op each, as gru.py does for GRUs.

oneDNN's LSTM, which recurrent.py runs, has no projection, and torch.export unrolls such a
layer into its time steps (0.75-1.04x eager's step where it trains, `python -m bench.recurrent
--kinds lstm-proj`). These kernels loop in Python with as few calls a step as the recurrence
allows: forward eight (the hidden product into the step's slot of the saved gates, one sigmoid
and one tanh over the gates, the cell in two calls and its tanh, the output gate, the
projection), backward five (everything that does not depend on the next step's gradient is
computed for all steps before the loop, and the weights' gradients are one or two products each
after it). Where no backward follows, the forward is ATen's LSTM, eager's kernel.

`lstm_proj_layer(x [T, N, I], h0 [N, P], c0 [N, H], w_ih [4H, I], w_hh [4H, P], b_ih, b_hh,
w_hr [P, H], reverse, workspace)` returns one flat buffer: y [T, N, P], then the last h [N, P]
and c [N, H]. With `workspace` set (passes/rnn_workspace.py) the forward attaches each step's
gates and cell (`_SAVED` hidden widths) to its output (recurrent.WORKSPACE); without it the
backward runs the forward again. `lstm_proj_layer_grad` returns dx, dh0, dc0, dw_ih, dw_hh,
db_ih, db_hh (the same) and dw_hr, packed: those its `wanted` names.
recurrent.py's converter of aten.lstm emits these where an nn.LSTM has projections.

nn.LSTM's step with a projection (gates i, f, g, o, in that order in the weights' rows):
    i, f, o = sigmoid(W_i* x + b_i* + W_h* h + b_h*),  g = tanh(W_ig x + b_ig + W_hg h + b_hg)
    c' = f c + i g,  h' = W_hr (o tanh(c'))
The kernels hold the gates in the order o, i, f, g ("slots"): the three sigmoids side by side.
"""
from __future__ import annotations

import math

import torch

from edgetune.compiler.ir.ops.gru import _columns, _states_before
from edgetune.compiler.ir.ops.recurrent import (WORKSPACE, _onnx_at, _onnx_product, _onnx_stacked, _onnx_steps,
                                                _onnx_unpacked, _packed_parts, _steps, aten_layer,
                                                taken_workspace, wanted_grads_vjp, wanted_parts, wanted_size)
from edgetune.compiler.ir.ops.registry import register

A = torch.ops.aten
_SAVED = 6  # a step's saved values, in hidden widths: o, i, f, g, c after, tanh(c after)


def _dims(x, w_hr):
    return x.shape[0], x.shape[1], w_hr.shape[0], w_hr.shape[1]  # T, N, P, H


def _parts(packed, x, w_hr):
    return tuple(packed[start:start + size].view(shape) for start, size, shape in _packed_parts(*_dims(x, w_hr)))


def _packed_size(x, w_hr) -> int:
    return sum(size for _, size, _ in _packed_parts(*_dims(x, w_hr)))


def workspace_bytes(x, w_hr) -> int:
    steps, batch, _, hidden = _dims(x, w_hr)
    return steps * batch * _SAVED * hidden * x.dtype.itemsize


def _in_slots(w, hidden):
    """A weight's (bias's) gate rows from torch's order i, f, g, o to the slots' o, i, f, g."""
    return torch.cat([w[3 * hidden:], w[:3 * hidden]])


def _input_side(x, w_ih, bias, hidden):
    """Every step's input side at once, [T, N, 4H] in slot order: W_i x + b_i + b_h."""
    steps, batch, _ = x.shape
    out, rows = x.new_empty(steps * batch, 4 * hidden), x.reshape(steps * batch, -1)
    torch.addmm(bias[3 * hidden:], rows, w_ih[3 * hidden:].t(), out=out[:, :hidden])
    torch.addmm(bias[:3 * hidden], rows, w_ih[:3 * hidden].t(), out=out[:, hidden:])
    return out.view(steps, batch, 4 * hidden)


def _run(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, saved):
    """The layer's buffer [y, hy, cy]; each step's gates, cell and tanh(cell) written into
    `saved` ([T, N, 6H]) for the backward."""
    steps, batch, _, hidden = _dims(x, w_hr)
    inputs = _input_side(x, w_ih, b_ih + b_hh, hidden)
    out = x.new_empty(_packed_size(x, w_hr))
    y, hy, cy = _parts(out, x, w_hr)
    gates, sigmoids, g = _columns(saved, 0, 4, hidden), _columns(saved, 0, 3, hidden), _columns(saved, 3, 4, hidden)
    o, i, f = (_columns(saved, k, k + 1, hidden) for k in range(3))
    cells, tanh_cells = _columns(saved, 4, 5, hidden), _columns(saved, 5, 6, hidden)
    w_hh_t, w_hr_t, gated = _in_slots(w_hh, hidden).t(), w_hr.t(), x.new_empty(batch, hidden)
    outputs, h, c = y.unbind(0), h0, c0
    for t in _steps(steps, reverse):
        torch.addmm(inputs[t], h, w_hh_t, out=gates[t])
        sigmoids[t].sigmoid_()
        g[t].tanh_()
        c = torch.mul(f[t], c, out=cells[t]).addcmul_(i[t], g[t])
        torch.mul(o[t], torch.tanh(c, out=tanh_cells[t]), out=gated)
        h = torch.mm(gated, w_hr_t, out=outputs[t])
    hy.copy_(h)
    cy.copy_(c)
    return out


def _aten_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse):
    """The layer's buffer from ATen's LSTM, eager's kernel (it keeps nothing for a backward);
    a reverse layer runs on the steps flipped."""
    return aten_layer(A.lstm.input, x, (h0, c0), [w_ih, w_hh, b_ih, b_hh, w_hr], reverse)


def _lstm_proj_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, *, reverse, workspace=0):
    if not workspace:  # no backward follows
        return _aten_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse)
    steps, batch, _, hidden = _dims(x, w_hr)
    saved = x.new_empty(steps, batch, _SAVED * hidden)
    out = _run(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, saved)
    setattr(out, WORKSPACE, saved)
    return out


def _factors(saved, c0, reverse, hidden):
    """Each step's gradients as multiples, none depending on the next step's gradient (so
    computed for all steps at once), written over the saved gates and cells, [T, N, 6, H]:
    - slot 0: the output gate's pre-activation, of the gradient of o tanh(c') (`gated`);
    - slots 1-4: the i, f and g gates' pre-activations and the cell before, of the cell's dc;
    - slot 5: what dc takes of the gradient of o tanh(c'): o (1 - tanh(c')^2).
    Also returns o tanh(c') of every step, the projection's input (for its gradient). In place,
    with temporaries of [T, N, H]: the workspace is the backward's largest buffer, not one more."""
    slots = saved.view(saved.shape[:2] + (_SAVED, hidden))
    o, i, f, g, c, tanh_c = slots.unbind(2)
    cells_before = _states_before(c, c0, reverse)
    gated = o * tanh_c
    output_side = gated * (1 - o)  # sigmoid's derivative o (1 - o)
    tanh_c.mul_(tanh_c).neg_().add_(1).mul_(o)
    o.copy_(output_side)
    del output_side
    input_side = i * g
    g.mul_(g).neg_().add_(1).mul_(i)  # tanh's derivative 1 - g^2
    i.neg_().add_(1).mul_(input_side)
    del input_side
    c.copy_(f)
    f.mul_(1 - f).mul_(cells_before)
    return slots, gated


def _backward_steps(gy, dh, dc, w_hh, w_hr, factors, reverse):
    """The steps' gate gradients (the factors' slots 0:4, times the gradient of o tanh(c') and
    dc in place), the gradient each step sends to the h before it [T, N, P], and dh0, dc0."""
    steps, batch, proj = gy.shape
    w_hh_slots = _in_slots(w_hh, w_hh.shape[0] // 4)
    loss_side = torch.matmul(gy, w_hr)  # each step's gradient of o tanh(c') from the loss, [T, N, H]
    to_before = gy.new_empty(gy.shape)
    gated, cell = gy.new_empty(batch, w_hr.shape[1]), gy.new_empty(batch, w_hr.shape[1])
    # each step's views, made before the loop (a view is a call too)
    output_gate, cell_side = factors[:, :, 0].unbind(0), factors[:, :, 1:5].unbind(0)
    from_gated = factors[:, :, 5].unbind(0)
    gates = factors[:, :, :4].reshape(steps, batch, -1).unbind(0)
    cell_before, loss_steps = factors[:, :, 4].unbind(0), loss_side.unbind(0)
    for t in reversed(_steps(steps, reverse)):
        torch.addmm(loss_steps[t], dh, w_hr, out=gated)
        torch.addcmul(dc, gated, from_gated[t], out=cell)
        output_gate[t].mul_(gated)
        cell_side[t].mul_(cell.unsqueeze(1))
        dh, dc = torch.mm(gates[t], w_hh_slots, out=to_before[t]), cell_before[t]
    return to_before, dh, dc


def _lstm_proj_layer_grad(g, packed, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, *, reverse, wanted=(True,) * 8):
    steps, batch, proj, hidden = _dims(x, w_hr)
    saved = taken_workspace(packed)
    if saved is None:  # a value that lost the workspace: the forward again
        saved = x.new_empty(steps, batch, _SAVED * hidden)
        packed = _run(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, saved)
    y, _, _ = _parts(packed, x, w_hr)
    gy, ghy, gcy = _parts(g, x, w_hr)
    factors, gated = _factors(saved, c0, reverse, hidden)
    to_before, dh0, dc0 = _backward_steps(gy, ghy, gcy, w_hh, w_hr, factors, reverse)
    gates = factors[:, :, :4].reshape(steps * batch, 4 * hidden)  # slot order o, i, f, g
    inputs = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    out = x.new_empty(wanted_size(inputs, wanted))
    dx, dh0_out, dc0_out, dw_ih, dw_hh, db_ih, db_hh, dw_hr = wanted_parts(out, inputs, wanted)
    if dx is not None:
        torch.mm(gates[:, hidden:], w_ih[:3 * hidden], out=dx.view(steps * batch, -1))
        dx.view(steps * batch, -1).addmm_(gates[:, :hidden], w_ih[3 * hidden:])
    for grad, state in ((dh0_out, dh0), (dc0_out, dc0)):
        if grad is not None:
            grad.copy_(state)
    h_before = _states_before(y, h0, reverse).reshape(steps * batch, proj)
    for weight, inputs in ((dw_ih, x.reshape(steps * batch, -1)), (dw_hh, h_before)):
        if weight is not None:  # rows in torch's order: i, f, g from slots 1-3, o from slot 0
            torch.mm(gates[:, hidden:].t(), inputs, out=weight[:3 * hidden])
            torch.mm(gates[:, :hidden].t(), inputs, out=weight[3 * hidden:])
    biases = [db for db in (db_ih, db_hh) if db is not None]  # the same gradient, both
    if biases:
        torch.sum(gates[:, hidden:], 0, out=biases[0][:3 * hidden])
        torch.sum(gates[:, :hidden], 0, out=biases[0][3 * hidden:])
        for other in biases[1:]:
            other.copy_(biases[0])
    if dw_hr is not None:  # each step's dh: the loss's and what the next step sent back
        from_next = torch.cat([to_before[1:], ghy[None]]) if not reverse else torch.cat([ghy[None], to_before[:-1]])
        torch.mm((gy + from_next).reshape(steps * batch, proj).t(), gated.reshape(steps * batch, hidden), out=dw_hr)
    return out


# Scratch: the input side of every step ([T, N, 4H], forward); in the backward the cells before,
# o tanh(c'), the loss's share and two temporaries ([T, N, 5H]), the states before and the
# gradients sent back ([T, N, 3P]), w_hh reordered (the factors are written over the workspace).

def _forward_scratch(n) -> int:
    x, w_hr = n.inputs[0], n.inputs[7]
    steps, batch, proj, hidden = _dims(x, w_hr)
    if n.attrs.get("workspace"):
        return steps * batch * 4 * hidden * n.dtype.itemsize  # _input_side
    # ATen's gates of every step and its outputs; a reverse layer's steps flipped, in and out
    flipped = (math.prod(x.shape) + steps * batch * proj) if n.attrs["reverse"] else 0
    return (steps * batch * (4 * hidden + proj) + flipped) * n.dtype.itemsize


def _grad_scratch(n) -> int:
    packed, x, w_hh, w_hr = n.inputs[1], n.inputs[2], n.inputs[6], n.inputs[9]
    steps, batch, proj, hidden = _dims(x, w_hr)
    again = 0 if packed.attrs.get("workspace") else workspace_bytes(x, w_hr) + packed.nbytes
    return (steps * batch * (5 * hidden + 3 * proj) + math.prod(w_hh.shape)) * n.dtype.itemsize + again


# -- ONNX: ONNX's LSTM has no projection: forward and backward step by step (recurrent.py's
# steps, with the projection) --

def _onnx_lstm_proj_layer(ctx, n, xs):
    h, c, saved = _onnx_steps(ctx, n.inputs[0].shape[0], n.inputs[7].shape[1], n.attrs["reverse"], xs)
    flat = lambda t: ctx.op("Reshape", t, ctx.ints([-1]))  # noqa: E731
    return ctx.op("Concat", flat(_onnx_stacked(ctx, {t: step[7] for t, step in saved.items()})), flat(h), flat(c),
                  axis=0)


def _onnx_lstm_proj_layer_grad(ctx, n, xs):
    """_lstm_proj_layer_grad in ONNX: the layer again, then its steps backward."""
    g, _, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = xs
    steps, batch, proj, hidden = _dims(n.inputs[2], n.inputs[9])
    one = ctx.scalar(1.0, n.dtype)
    mul = lambda *ts: _onnx_product(ctx, ts)  # noqa: E731
    minus_from_one = lambda t: ctx.op("Sub", one, t)  # noqa: E731
    _, _, saved = _onnx_steps(ctx, steps, hidden, n.attrs["reverse"], xs[2:])
    gy, dh, dc = _onnx_unpacked(ctx, g, _packed_parts(steps, batch, proj, hidden))
    gate_grads, output_grads = {}, {}
    for t in reversed(_steps(steps, n.attrs["reverse"])):
        i, f, gate, o, c, tanh_c, *_ = saved[t]
        output_grads[t] = ctx.op("Add", dh, _onnx_at(ctx, gy, t))
        gated = ctx.op("MatMul", output_grads[t], w_hr)
        dc = ctx.op("Add", dc, mul(gated, o, minus_from_one(mul(tanh_c, tanh_c))))
        gate_grads[t] = ctx.op("Concat", mul(dc, gate, i, minus_from_one(i)), mul(dc, c, f, minus_from_one(f)),
                               mul(dc, i, minus_from_one(mul(gate, gate))), mul(gated, tanh_c, o, minus_from_one(o)),
                               axis=1)
        dh, dc = ctx.op("MatMul", gate_grads[t], w_hh), mul(dc, f)
    rows = lambda t, width: ctx.op("Reshape", t, ctx.ints([steps * batch, width]))  # noqa: E731
    flat_grads = rows(_onnx_stacked(ctx, gate_grads), 4 * hidden)
    flat_grads_t = ctx.op("Transpose", flat_grads, perm=[1, 0])
    stacked = lambda k, width: rows(_onnx_stacked(ctx, {t: step[k] for t, step in saved.items()}), width)  # noqa: E731
    flat = lambda t: ctx.op("Reshape", t, ctx.ints([-1]))  # noqa: E731
    bias = lambda: ctx.reduce("ReduceSum", flat_grads, [0], keepdims=False)  # noqa: E731
    made = (lambda: flat(ctx.op("MatMul", flat_grads, w_ih)), lambda: flat(dh), lambda: flat(dc),
            lambda: flat(ctx.op("MatMul", flat_grads_t, rows(x, n.inputs[2].shape[2]))),
            lambda: flat(ctx.op("MatMul", flat_grads_t, stacked(6, proj))),
            bias, bias,
            lambda: flat(ctx.op("MatMul", ctx.op("Transpose", rows(_onnx_stacked(ctx, output_grads), proj), perm=[1, 0]),
                                stacked(8, hidden))))
    wanted = n.attrs.get("wanted", (True,) * 8)
    return ctx.op("Concat", *(make() for make, w in zip(made, wanted) if w), axis=0)


register("lstm_proj_layer", _lstm_proj_layer, wanted_grads_vjp("lstm_proj_layer_grad", "reverse"),
         shape=lambda x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, workspace=0: (
             (_packed_size(x, w_hr),), x.dtype),
         scratch=_forward_scratch, carries=lambda n: n.attrs.get("workspace", 0), onnx=_onnx_lstm_proj_layer)
register("lstm_proj_layer_grad", _lstm_proj_layer_grad,
         shape=lambda g, packed, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, wanted=(True,) * 8: (
             (wanted_size((x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr), wanted),), x.dtype),
         scratch=_grad_scratch, onnx=_onnx_lstm_proj_layer_grad)

