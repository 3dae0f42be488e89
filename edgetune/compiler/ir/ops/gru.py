"""GRU layers as one op each, as recurrent.py does for LSTMs.

torch.export decomposes `nn.GRU` into its time steps (about 15 ops a step forward and 25
backward, each a call from the generated Python), where eager runs ATen's loop in C++. oneDNN
has no GRU kernel that ATen exposes, so these kernels loop in Python, with as few calls a step
as the recurrence allows: forward, the hidden product and four elementwise calls; backward,
three (everything that does not depend on the next step's gradient is computed for all steps
at once before the loop, and the weights' gradients are one product each after it).

`gru_layer(x [T, N, I], h0 [N, H], w_ih, w_hh, b_ih, b_hh, reverse, workspace)` returns one
flat buffer: the outputs y [T, N, H], then the last h. Where a backward follows, the pass
`keep_rnn_workspace` sets `workspace` (bytes) and the forward attaches what its backward reads
(each step's gates, `_SAVED` wide) to its output (recurrent.WORKSPACE); without it the backward
runs the forward again. Where none follows, the forward is ATen's GRU, eager's kernel.
`gru_layer_grad` returns dx, dh0, dw_ih, dw_hh, db_ih, db_hh, packed: those its `wanted` names.

nn.GRU's step (gates r, z, n, in that order in the weights):
    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr),  z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)),  h' = (1 - z) * n + z * h = lerp(n, h, z)
"""
from __future__ import annotations

import math

import torch

from edgetune.compiler.ir.ops.recurrent import (WORKSPACE, _dims, _onnx_at, _onnx_gate_rows, _onnx_product,
                                                _onnx_stacked, _onnx_unpacked, _packed_size, _steps, aten_layer,
                                                rnn_layers, taken_workspace, wanted_grads_vjp, wanted_parts,
                                                wanted_size)
from edgetune.compiler.ir.ops.recurrent import _parts as _layer_parts
from edgetune.compiler.ir.ops.registry import aten, register

A = torch.ops.aten
# A step's saved values, in hidden widths: r, z, W_hn h + b_hn, n, and a fifth slot the
# backward writes its fifth factor into (_factors writes over the five).
_SAVED = 5


def _packed_parts(steps, batch, hidden) -> tuple:
    """(start, size, shape) of y and hy in a gru_layer buffer (and in its gradient)."""
    ny = steps * batch * hidden
    return (0, ny, (steps, batch, hidden)), (ny, batch * hidden, (batch, hidden))


def _parts(packed, x, w_hh):
    return _layer_parts(packed, x, w_hh, _packed_parts)


def workspace_bytes(x, w_hh) -> int:
    steps, batch, hidden = _dims(x, w_hh)
    return steps * batch * _SAVED * hidden * x.dtype.itemsize


def _input_side(x, w_ih, b_ih, b_hh):
    """Every step's input side at once, [T, N, 4H]: W_i x + b_i + b_h for the r and z gates,
    b_hn, then W_in x + b_in. A step adds W_h h to the first 3H in one addmm."""
    steps, batch, _ = x.shape
    hidden = w_ih.shape[0] // 3
    out, rows = x.new_empty(steps * batch, 4 * hidden), x.reshape(steps * batch, -1)
    torch.addmm(b_ih[:2 * hidden] + b_hh[:2 * hidden], rows, w_ih[:2 * hidden].t(), out=out[:, :2 * hidden])
    out[:, 2 * hidden:3 * hidden] = b_hh[2 * hidden:]
    torch.addmm(b_ih[2 * hidden:], rows, w_ih[2 * hidden:].t(), out=out[:, 3 * hidden:])
    return out.view(steps, batch, 4 * hidden)


def _columns(t, start, end, hidden):
    """Each step's [N, (end - start) H] view of a [T, N, kH] buffer (made before the loop: a
    view is a call too)."""
    return t[..., start * hidden:end * hidden].unbind(0)


def _run(x, h0, w_ih, w_hh, b_ih, b_hh, reverse, saved):
    """The layer's buffer [y, hy], each step's r, z, W_hn h + b_hn and n written into `saved`
    ([T, N, 4H]) for the backward."""
    steps, batch, hidden = _dims(x, w_hh)
    inputs = _input_side(x, w_ih, b_ih, b_hh)
    out = x.new_empty(steps * batch * hidden + batch * hidden)
    y, hy = _parts(out, x, w_hh)
    before_n, input_n = _columns(inputs, 0, 3, hidden), _columns(inputs, 3, 4, hidden)
    three, rz, n = _columns(saved, 0, 3, hidden), _columns(saved, 0, 2, hidden), _columns(saved, 3, 4, hidden)
    r, z, hidden_n = (_columns(saved, k, k + 1, hidden) for k in range(3))
    outputs, h, w_hh_t = y.unbind(0), h0, w_hh.t()
    for t in _steps(steps, reverse):
        torch.addmm(before_n[t], h, w_hh_t, out=three[t])
        rz[t].sigmoid_()
        torch.addcmul(input_n[t], r[t], hidden_n[t], out=n[t]).tanh_()
        h = torch.lerp(n[t], h, z[t], out=outputs[t])
    hy.copy_(h)
    return out


def _aten_layer(x, h0, w_ih, w_hh, b_ih, b_hh, reverse):
    """The layer's buffer [y, hy] from ATen's GRU, eager's kernel (a loop in C++, 4-10% faster
    than _run at batch 1-32; it keeps nothing for a backward); a reverse layer runs on the
    steps flipped."""
    return aten_layer(A.gru.input, x, (h0,), [w_ih, w_hh, b_ih, b_hh], reverse)


def _gru_layer(x, h0, w_ih, w_hh, b_ih, b_hh, *, reverse, workspace=0):
    if not workspace:  # no backward follows
        return _aten_layer(x, h0, w_ih, w_hh, b_ih, b_hh, reverse)
    steps, batch, hidden = _dims(x, w_hh)
    saved = x.new_empty(steps, batch, _SAVED * hidden)
    out = _run(x, h0, w_ih, w_hh, b_ih, b_hh, reverse, saved)
    setattr(out, WORKSPACE, saved)
    return out


def _states_before(y, h0, reverse):
    """The state each step started from, [T, N, H]: h0, then the outputs in the order run."""
    return torch.cat([y[1:], h0[None]]) if reverse else torch.cat([h0[None], y[:-1]])


def _factors(before, saved, hidden):
    """Each step's gradients as multiples of the gradient dh of its output, [T, N, 5, H]; the
    slots: W_hn h + b_hn, the r, z and n gates' pre-activations, and the state before, as far
    as h' = lerp(n, h, z) reads it directly. None depends on dh: they are computed for all
    steps at once, and a step of the backward is one product with dh. Written over the saved
    gates (r, z, W_hn h + b_hn, n and the empty fifth slot), with temporaries of [T, N, H]."""
    slots = saved.view(saved.shape[:2] + (_SAVED, hidden))
    r, z, hidden_n, n, direct = slots.unbind(2)
    direct.copy_(z)
    dn = torch.mul(n, n).sub_(1).mul_(direct - 1)  # (1 - z): what h' takes of n; 1 - n^2: tanh's derivative
    torch.mul(dn, r, out=z).mul_(hidden_n).mul_(1 - r)  # r's: sigmoid's derivative r (1 - r)
    torch.sub(before, n, out=hidden_n).mul_(direct).mul_(1 - direct)  # z's
    r.mul_(dn)  # W_hn h + b_hn's
    n.copy_(dn)
    return slots


def _backward_steps(gy, dh, before, saved, w_hh, reverse):
    """Each step's gradients (the _factors slots times dh, in place) and the gradient of h0."""
    steps, batch, hidden = _dims(gy, w_hh)
    grads = _factors(before, saved, hidden)
    w_hh_nrz = torch.cat([w_hh[2 * hidden:], w_hh[:2 * hidden]])  # rows in slots 0:3's gate order
    # each step's views, made before the loop (a view is a call too)
    step_grads, direct, gy_steps = grads.unbind(0), grads[:, :, 4].unbind(0), gy.unbind(0)
    through_w_hh = grads[:, :, :3].reshape(steps, batch, 3 * hidden).unbind(0)
    total = gy.new_empty(batch, hidden)  # a step's output gradient: from the loss and from the next step
    widened = total.unsqueeze(1)
    for t in reversed(_steps(steps, reverse)):
        torch.add(dh, gy_steps[t], out=total)
        torch.mul(step_grads[t], widened, out=step_grads[t])
        dh = torch.addmm(direct[t], through_w_hh[t], w_hh_nrz)
    return grads, dh


def _gru_layer_grad(g, packed, x, h0, w_ih, w_hh, b_ih, b_hh, *, reverse, wanted=(True,) * 6):
    steps, batch, hidden = _dims(x, w_hh)
    saved = taken_workspace(packed)
    if saved is None:  # a value that lost the workspace: the forward again
        saved = x.new_empty(steps, batch, _SAVED * hidden)
        packed = _run(x, h0, w_ih, w_hh, b_ih, b_hh, reverse, saved)
    y, _ = _parts(packed, x, w_hh)
    gy, ghy = _parts(g, x, w_hh)
    before = _states_before(y, h0, reverse).reshape(steps * batch, hidden)
    grads, dh0 = _backward_steps(gy, ghy, before.view(steps, batch, hidden), saved, w_hh, reverse)
    # Views of the same buffer: the hidden side's gradients in the gate order n, r, z (slots
    # 0:3), the input side's in r, z, n (slots 1:4).
    hidden_nrz = grads[:, :, :3].reshape(steps * batch, 3 * hidden)
    input_side = grads[:, :, 1:4].reshape(steps * batch, 3 * hidden)
    inputs = (x, h0, w_ih, w_hh, b_ih, b_hh)
    out = x.new_empty(wanted_size(inputs, wanted))
    dx, dh0_out, dw_ih, dw_hh, db_ih, db_hh = wanted_parts(out, inputs, wanted)
    write_input_side_grads(input_side, x, w_ih, dh0, dx, dh0_out, dw_ih, db_ih)
    for rows, cols in ((slice(0, 2 * hidden), slice(hidden, 3 * hidden)), (slice(2 * hidden, None), slice(0, hidden))):
        if dw_hh is not None:
            torch.mm(hidden_nrz[:, cols].t(), before, out=dw_hh[rows])
        if db_hh is not None:
            torch.sum(hidden_nrz[:, cols], 0, out=db_hh[rows])
    return out


def write_input_side_grads(gates, x, w_ih, dh0, dx, dh0_out, dw_ih, db_ih):
    """dx, dh0, dw_ih and db_ih, those not None (the wanted views of a grad buffer), from every
    step's gate gradients [T * N, w_ih's rows] (in w_ih's row order) and dh0."""
    rows = x.shape[0] * x.shape[1]
    if dx is not None:
        torch.mm(gates, w_ih, out=dx.view(rows, -1))
    if dh0_out is not None:
        dh0_out.copy_(dh0)
    if dw_ih is not None:
        torch.mm(gates.t(), x.reshape(rows, -1), out=dw_ih)
    if db_ih is not None:
        torch.sum(gates, 0, out=db_ih)


# Scratch: the input side of every step ([T, N, 4H], forward); in the backward the states
# before each step and two temporaries while the factors are written over the workspace
# ([T, N, 3H]), beside the results; the forward run again where the workspace was not kept.

def _forward_scratch(n) -> int:
    x, w_hh = n.inputs[0], n.inputs[3]
    steps, batch, hidden = _dims(x, w_hh)
    if n.attrs.get("workspace"):
        return steps * batch * 4 * hidden * n.dtype.itemsize  # _input_side
    # ATen's input side and outputs; a reverse layer's steps flipped, in and out
    flipped = (math.prod(x.shape) + steps * batch * hidden) if n.attrs["reverse"] else 0
    return (steps * batch * 4 * hidden + flipped) * n.dtype.itemsize


def _grad_scratch(n) -> int:
    packed, x, w_hh = n.inputs[1], n.inputs[2], n.inputs[5]
    steps, batch, hidden = _dims(x, w_hh)
    again = 0 if packed.attrs.get("workspace") else workspace_bytes(x, w_hh) + packed.nbytes
    # the states before each step, two temporaries while the factors are made; w_hh reordered
    return (steps * batch * 3 * hidden + 3 * hidden * hidden) * n.dtype.itemsize + again


# -- ONNX: the forward as ONNX's GRU op (float32; float64, which onnxruntime's GRU lacks, step
# by step), the backward as _gru_layer_grad spells it, step by step --

_ONNX_GRU_GATES = (1, 0, 2)  # torch's r, z, n as ONNX's z, r, h


def _onnx_gru_layer(ctx, n, xs):
    x, h0, w_ih, w_hh, b_ih, b_hh = xs
    hidden = n.inputs[3].shape[1]
    flat = lambda t: ctx.op("Reshape", t, ctx.ints([-1]))  # noqa: E731
    if n.dtype == torch.float64:
        h, saved = _onnx_steps(ctx, n.inputs[0].shape[0], hidden, n.attrs["reverse"], xs)
        return ctx.op("Concat", flat(_onnx_stacked(ctx, {t: step[-1] for t, step in saved.items()})), flat(h), axis=0)
    first = lambda t: ctx.op("Unsqueeze", t, ctx.ints([0]))  # noqa: E731  (ONNX's num_directions axis)
    rows = lambda t: _onnx_gate_rows(ctx, t, hidden, _ONNX_GRU_GATES)  # noqa: E731
    bias = ctx.op("Concat", rows(b_ih), rows(b_hh), axis=0)
    y, hy = ctx.op("GRU", x, first(rows(w_ih)), first(rows(w_hh)), first(bias), "", first(h0), outputs=2,
                   hidden_size=hidden, linear_before_reset=1, direction="reverse" if n.attrs["reverse"] else "forward")
    return ctx.op("Concat", flat(y), flat(hy), axis=0)


def _onnx_steps(ctx, steps, hidden, reverse, xs):
    """_run in ONNX: the last h, and each step's (r, z, n, W_hn h + b_hn, h before, h after)."""
    x, h, w_ih, w_hh, b_ih, b_hh = xs
    piece = lambda t, k: ctx.op("Slice", t, ctx.ints([k * hidden]), ctx.ints([(k + 1) * hidden]), ctx.ints([1]))  # noqa: E731
    projected = ctx.op("Add", ctx.op("MatMul", x, ctx.op("Transpose", w_ih, perm=[1, 0])), b_ih)
    w_hh_t = ctx.op("Transpose", w_hh, perm=[1, 0])
    saved = {}
    for t in _steps(steps, reverse):
        inputs = _onnx_at(ctx, projected, t)
        hidden_side = ctx.op("Add", ctx.op("MatMul", h, w_hh_t), b_hh)
        r, z = (ctx.op("Sigmoid", ctx.op("Add", piece(inputs, k), piece(hidden_side, k))) for k in (0, 1))
        hidden_n = piece(hidden_side, 2)
        gate = ctx.op("Tanh", ctx.op("Add", piece(inputs, 2), ctx.op("Mul", r, hidden_n)))
        h_after = ctx.op("Add", gate, ctx.op("Mul", z, ctx.op("Sub", h, gate)))
        saved[t] = (r, z, gate, hidden_n, h, h_after)
        h = h_after
    return h, saved


def _onnx_gru_layer_grad(ctx, n, xs):
    g, _, x, h0, w_ih, w_hh, b_ih, b_hh = xs
    steps, batch, hidden = _dims(n.inputs[2], n.inputs[5])
    one = ctx.scalar(1.0, n.dtype)
    mul = lambda *ts: _onnx_product(ctx, ts)  # noqa: E731
    minus_from_one = lambda t: ctx.op("Sub", one, t)  # noqa: E731
    _, saved = _onnx_steps(ctx, steps, hidden, n.attrs["reverse"], xs[2:])
    gy, dh = _onnx_unpacked(ctx, g, _packed_parts(steps, batch, hidden))
    input_grads, hidden_grads = {}, {}
    for t in reversed(_steps(steps, n.attrs["reverse"])):
        r, z, gate, hidden_n, before, _ = saved[t]
        dh = ctx.op("Add", dh, _onnx_at(ctx, gy, t))
        dn = mul(dh, minus_from_one(z), minus_from_one(mul(gate, gate)))
        dr = mul(dn, hidden_n, r, minus_from_one(r))
        dz = mul(dh, ctx.op("Sub", before, gate), z, minus_from_one(z))
        input_grads[t] = ctx.op("Concat", dr, dz, dn, axis=1)
        hidden_grads[t] = ctx.op("Concat", dr, dz, mul(dn, r), axis=1)
        dh = ctx.op("Add", mul(dh, z), ctx.op("MatMul", hidden_grads[t], w_hh))
    rows = lambda t, width: ctx.op("Reshape", t, ctx.ints([steps * batch, width]))  # noqa: E731
    inputs_flat, hidden_flat = (rows(_onnx_stacked(ctx, grads), 3 * hidden) for grads in (input_grads, hidden_grads))
    before = rows(_onnx_stacked(ctx, {t: step[4] for t, step in saved.items()}), hidden)
    flat = lambda t: ctx.op("Reshape", t, ctx.ints([-1]))  # noqa: E731
    transposed = lambda t: ctx.op("Transpose", t, perm=[1, 0])  # noqa: E731
    made = (lambda: flat(ctx.op("MatMul", inputs_flat, w_ih)), lambda: flat(dh),
            lambda: flat(ctx.op("MatMul", transposed(inputs_flat), rows(x, n.inputs[2].shape[2]))),
            lambda: flat(ctx.op("MatMul", transposed(hidden_flat), before)),
            lambda: ctx.reduce("ReduceSum", inputs_flat, [0], keepdims=False),
            lambda: ctx.reduce("ReduceSum", hidden_flat, [0], keepdims=False))
    wanted = n.attrs.get("wanted", (True,) * 6)
    return ctx.op("Concat", *(make() for make, w in zip(made, wanted) if w), axis=0)


register("gru_layer", _gru_layer, wanted_grads_vjp("gru_layer_grad", "reverse"),
         shape=lambda x, h0, w_ih, w_hh, b_ih, b_hh, reverse, workspace=0: (
             (_packed_size(x, w_hh, _packed_parts),), x.dtype),
         scratch=_forward_scratch, carries=lambda n: n.attrs.get("workspace", 0), onnx=_onnx_gru_layer)
register("gru_layer_grad", _gru_layer_grad,
         shape=lambda g, packed, x, h0, w_ih, w_hh, b_ih, b_hh, reverse, wanted=(True,) * 6: (
             (wanted_size((x, h0, w_ih, w_hh, b_ih, b_hh), wanted),), x.dtype),
         scratch=_grad_scratch, onnx=_onnx_gru_layer_grad)


@aten(A.gru.input)
def _(b, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    """nn.GRU: one gru_layer per layer and direction (recurrent.rnn_layers)."""
    return rnn_layers(b, "gru_layer", _packed_parts, x, (hx,), params, has_biases, num_layers, bidirectional,
                      batch_first)
