"""LSTM layers as one op each: the whole sequence in one kernel call, forward and backward.

torch.export decomposes `nn.LSTM` into its time steps, a dozen ops per step forward and
two dozen backward, each a call from the generated Python on a [batch, hidden] tensor: a
32-token LSTM step made 1424 kernel calls and ran at a third of eager's speed, where eager
runs oneDNN's fused RNN layer. The frontend keeps `aten.lstm` whole where this op applies
(`fused_rnn_applies`) and its converter emits one `lstm_layer` per layer and direction
(`rnn_layers`, which gru.py's converter shares for `nn.GRU`).

`lstm_layer(x [T, N, I], h0, c0 [N, H], w_ih, w_hh, b_ih, b_hh, reverse, workspace)` returns
one flat buffer: the outputs y [T, N, H], then the last h and c. `lstm_layer_grad` takes that
buffer's gradient, the buffer and the layer's inputs, and returns dx, dh0, dc0, dw_ih, dw_hh
and the bias gradient (the same for both biases), packed likewise.

On the CPU in float32 both kernels are oneDNN's (`mkldnn_rnn_layer`, the kernel eager's
nn.LSTM calls: the same bits), where this torch build's oneDNN runs them (`_onednn_runs_lstm`).
Its backward reads a workspace of the forward's (the gates and states of every step, ~15x the
output y). Where a backward follows, the pass `keep_rnn_workspace` gives the forward node its
size (`workspace` bytes): the kernel then attaches the workspace to its output (`WORKSPACE`),
the memory plan counts it with the output (`carries`), and the backward uses it. Without one
(a value that lost the attribute) the backward runs the layer again: the same values, one
forward more. Otherwise (float64, or no oneDNN LSTM) both kernels loop over the steps in torch
ops; the ONNX lowering spells the backward the same way, and the forward as ONNX's LSTM op.
"""
from __future__ import annotations

import functools
import math

import torch

from edgetune.compiler.ir.ops.nn import take_channels
from edgetune.compiler.ir.ops.registry import ChannelSlice, aten, register

A = torch.ops.aten

# Where each recurrent layer op (this file's and gru.py's, lstm_proj.py's, simple_rnn.py's)
# takes its weights among its inputs: input, hidden-state (and projection). What a
# partial-channel rule may cut (trainer.py), and the products the report counts (report.py).
RNN_WEIGHTS = {"lstm_layer": (3, 4), "gru_layer": (2, 3), "lstm_proj_layer": (3, 4, 7), "rnn_layer": (2, 3)}
_MKLDNN_LSTM = 2  # the mode number of an LSTM in ATen's mkldnn_rnn_layer


def fused_rnn_applies(x, params, has_biases, num_layers, bidirectional, device) -> bool:
    """Whether `lstm_layer` (`lstm_proj_layer`, `gru_layer`, `rnn_layer`) can stand for this
    aten.lstm (aten.gru, aten.rnn_tanh, aten.rnn_relu) call (torch.export's fake tensors): a
    3-D input on the CPU in float32/64. An LSTM with projections (`proj_size`) has a fifth
    weight a layer. (A call with dropout between its layers in train mode never gets here: the
    frontend splits it into one call a layer first.)"""
    per_layer = 4 if has_biases else 2
    return (device.type == "cpu" and x.dim() == 3 and x.dtype in (torch.float32, torch.float64)
            and len(params) in [num_layers * (2 if bidirectional else 1) * k for k in (per_layer, per_layer + 1)])


def _onednn(x) -> bool:
    return x.dtype == torch.float32 and x.device.type == "cpu" and _onednn_runs_lstm()


@functools.cache
def _onednn_runs_lstm() -> bool:
    """Whether this torch build's oneDNN runs an LSTM layer forward and backward (a build
    without oneDNN, or a CPU it has no RNN kernel for, takes the loop instead): tried once on a
    layer of one step."""
    if not torch.backends.mkldnn.is_available():
        return False
    x, states, w, bias = torch.zeros(1, 1, 1), torch.zeros(1, 1), torch.zeros(4, 1), torch.zeros(4)
    try:
        y, hy, cy, workspace = _onednn_layer(x, states, states, w, w, bias, bias, False, train=True)
        A.mkldnn_rnn_layer_backward(x, w, w, bias, bias, states, states, y, hy, cy, y, hy, cy, False, _MKLDNN_LSTM,
                                    1, 1, True, True, False, [], False, workspace)
    except RuntimeError:
        return False
    return True


def _dims(x, w_hh):
    return x.shape[0], x.shape[1], w_hh.shape[1]  # T, N, H


def _onednn_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, train):
    """y, hy, cy and, if `train`, the workspace the backward reads. ATen makes a workspace
    only with grad mode on (the step runs under no_grad), and then even when not `train`: it
    is on for `train` alone, the inputs detached, so that no autograd graph is recorded."""
    _, _, hidden = _dims(x, w_hh)
    inputs = [t.detach().contiguous() for t in (x, w_ih, w_hh, b_ih, b_hh, h0, c0)]
    with torch.set_grad_enabled(train):
        return A.mkldnn_rnn_layer(*inputs, reverse, [], _MKLDNN_LSTM, hidden, 1, True, False, False, train)


def _steps(length: int, reverse: bool) -> range:
    return range(length - 1, -1, -1) if reverse else range(length)


def _looped_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse):
    """The layer step by step, as nn.LSTM defines it (gates i, f, g, o): y, hy, cy and what
    the backward reads of each step, (i, f, g, o, c before, tanh(c after), h before)."""
    projected = torch.nn.functional.linear(x, w_ih, b_ih + b_hh)
    h, c, hidden = h0, c0, w_hh.shape[1]
    y = x.new_empty((x.shape[0], x.shape[1], hidden))
    saved = {}
    for t in _steps(x.shape[0], reverse):
        gates = torch.addmm(projected[t], h, w_hh.t())
        i, f, o = (torch.sigmoid(gates[:, k * hidden:(k + 1) * hidden]) for k in (0, 1, 3))
        g = torch.tanh(gates[:, 2 * hidden:3 * hidden])
        c_after = f * c + i * g
        tanh_c = torch.tanh(c_after)
        saved[t] = (i, f, g, o, c, tanh_c, h)
        h, c = o * tanh_c, c_after
        y[t] = h
    return y, h, c, saved


def _pack(*tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


# The attribute of a lstm_layer (gru_layer) output that holds the workspace its backward reads.
WORKSPACE = "edgetune_rnn_workspace"


def _lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, *, reverse, workspace=0):
    if not _onednn(x):
        return _pack(*_looped_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse)[:3])
    y, hy, cy, kept = _onednn_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, train=workspace > 0)
    out = _pack(y, hy, cy)
    if workspace:
        setattr(out, WORKSPACE, kept)
    return out


def workspace_bytes(x, w_hh, reverse: bool) -> int:
    """The size of oneDNN's training workspace for a layer of these shapes (0 where the
    layer does not run on oneDNN): one forward on zeros, at compile time."""
    if not _onednn(torch.empty(0, dtype=x.dtype)):
        return 0
    return _probed_workspace(tuple(x.shape), tuple(w_hh.shape), reverse)


@functools.cache
def _probed_workspace(x_shape, w_hh_shape, reverse) -> int:
    (steps, batch, inputs), (gates, hidden) = x_shape, w_hh_shape
    states, bias = torch.zeros(batch, hidden), torch.zeros(gates)
    x, w_ih, w_hh = torch.zeros(steps, batch, inputs), torch.zeros(gates, inputs), torch.zeros(gates, hidden)
    return _onednn_layer(x, states, states, w_ih, w_hh, bias, bias, reverse, train=True)[3].nbytes


def _packed_parts(steps, batch, hidden, cell=None) -> tuple:
    """(start, size, shape) of y, hy and cy in a lstm_layer buffer (and in its gradient);
    `cell`: the width of c where it differs from h's (a projected layer, lstm_proj.py)."""
    ny, nh, nc = steps * batch * hidden, batch * hidden, batch * (hidden if cell is None else cell)
    return (0, ny, (steps, batch, hidden)), (ny, nh, (batch, hidden)), (ny + nh, nc, (batch, nc // batch))


def _packed_size(x, w_hh, packed_parts=_packed_parts) -> int:
    return sum(size for _, size, _ in packed_parts(*_dims(x, w_hh)))


def _parts(packed, x, w_hh, packed_parts=_packed_parts):
    """y, hy and cy (or their gradients) as views of a lstm_layer buffer (or of its gradient);
    with gru.py's `packed_parts`, y and hy of a gru_layer buffer."""
    return tuple(packed[start:start + size].view(shape) for start, size, shape in packed_parts(*_dims(x, w_hh)))


def _looped_layer_grad(gy, ghy, gcy, x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse):
    """Backward through the steps, last first: each step's gate gradients [N, 4H] go back
    through w_hh to the step before; the weights' gradients are then one product each over
    all steps."""
    *_, saved = _looped_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse)
    dh, dc = ghy, gcy
    gate_grads = x.new_empty(x.shape[:2] + (w_hh.shape[0],))
    h_before = x.new_empty(gy.shape)
    for t in reversed(_steps(x.shape[0], reverse)):
        i, f, g, o, c, tanh_c, h = saved[t]
        dh = dh + gy[t]
        dc = dc + dh * o * (1 - tanh_c * tanh_c)
        torch.cat([dc * g * i * (1 - i), dc * c * f * (1 - f), dc * i * (1 - g * g), dh * tanh_c * o * (1 - o)],
                  dim=1, out=gate_grads[t])
        dh, dc = gate_grads[t] @ w_hh, dc * f
        h_before[t] = h
    flat = gate_grads.reshape(-1, gate_grads.shape[-1])
    return (gate_grads @ w_ih, dh, dc, flat.t() @ x.reshape(-1, x.shape[-1]),
            flat.t() @ h_before.reshape(-1, h_before.shape[-1]), flat.sum(0))


def _lstm_layer_grad(g, packed, x, h0, c0, w_ih, w_hh, b_ih, b_hh, *, reverse):
    gy, ghy, gcy = _parts(g, x, w_hh)
    if _onednn(x):
        workspace = getattr(packed, WORKSPACE, None)
        if workspace is not None:
            y, hy, cy = (part.contiguous() for part in _parts(packed, x, w_hh))  # views: the forward's values
        else:
            y, hy, cy, workspace = _onednn_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, train=True)
        dx, dw_ih, dw_hh, db, _, dh0, dc0 = A.mkldnn_rnn_layer_backward(
            x.contiguous(), w_ih, w_hh, b_ih, b_hh, h0.contiguous(), c0.contiguous(), y, hy, cy, gy.contiguous(),
            ghy.contiguous(), gcy.contiguous(), reverse, _MKLDNN_LSTM, w_hh.shape[1], 1, True, True, False, [], False,
            workspace)
    else:
        dx, dh0, dc0, dw_ih, dw_hh, db = _looped_layer_grad(gy, ghy, gcy, x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse)
    return _pack(dx, dh0, dc0, dw_ih, dw_hh, db)


def _lstm_layer_vjp(b, n, g, want):
    if not any(want):
        return (None,) * len(n.inputs)
    flat = b.emit("lstm_layer_grad", g, n, *n.inputs, reverse=n.attrs["reverse"])
    grads, start = [], 0
    for x, w in zip(n.inputs[:6], want[:6]):  # x, h0, c0, w_ih, w_hh, then the bias (one for both)
        size = math.prod(x.shape)
        grads.append(_piece(b, flat, start, x.shape, w) if w else None)
        start += size
    bias_start = start - math.prod(n.inputs[5].shape)
    grads.append(_piece(b, flat, bias_start, n.inputs[6].shape, want[6]) if want[6] else None)
    return tuple(grads)


def aten_layer(op, x, states, params, reverse):
    """One layer and direction of ATen's recurrent op `op` (aten.gru, aten.lstm, aten.rnn_*:
    eager's kernel), as a packed buffer: the outputs, then each last state; a reverse layer
    runs on the steps flipped. `states`: the initial states, one [N, H] each (aten.lstm takes
    [h0, c0], the others h0 alone)."""
    hx = [s[None] for s in states] if len(states) > 1 else states[0][None]
    outputs, *last = op(x.flip(0) if reverse else x, hx, params, True, 1, 0.0, False, False, False)
    return torch.cat([(outputs.flip(0) if reverse else outputs).reshape(-1), *(s.reshape(-1) for s in last)])


def taken_workspace(packed):
    """What a looped layer's forward attached to its output for the backward, taken off it: the
    backward writes over it (a second backward from the same output runs the forward again)."""
    saved = getattr(packed, WORKSPACE, None)
    if saved is not None:
        delattr(packed, WORKSPACE)
    return saved


def wanted_grads_vjp(grad_op: str, *attrs: str):
    """The vjp of a layer op whose `grad_op` packs the wanted inputs' gradients one after the
    other (its `wanted` attribute; a bias-only scheme, or a frozen layer under a trained
    embedding, skips the weights' products): gru.py's, lstm_proj.py's, simple_rnn.py's.
    `attrs`: the layer's attributes it passes on."""
    def vjp(b, n, g, want):
        if not any(want):
            return (None,) * len(n.inputs)
        wanted = tuple(bool(w) for w in want)
        flat = b.emit(grad_op, g, n, *n.inputs, wanted=wanted, **{k: n.attrs[k] for k in attrs})
        grads, start = [], 0
        for x, w in zip(n.inputs, want):
            grads.append(_piece(b, flat, start, x.shape, w) if w else None)
            start += math.prod(x.shape) if w else 0
        return tuple(grads)
    return vjp


def wanted_size(inputs, wanted) -> int:
    """Elements of such a grad op's buffer: the wanted inputs' gradients (tensors or nodes)."""
    return sum(math.prod(t.shape) for t, w in zip(inputs, wanted) if w)


def wanted_parts(out, inputs, wanted) -> list:
    """Each input's gradient as a view of such a buffer; None where not wanted."""
    parts, start = [], 0
    for t, w in zip(inputs, wanted):
        parts.append(out[start:start + t.numel()].view(t.shape) if w else None)
        start += t.numel() if w else 0
    return parts


def _piece(b, flat, start, shape, want):
    """One input's gradient from the packed ones; a partial-channel rule's channels of it (the
    kernel computes the whole weight's gradient: oneDNN's backward gives all of the layer's at once)."""
    piece = b.emit("reshape", b.emit("slice", flat, dim=0, start=start, end=start + math.prod(shape), step=1),
                   shape=tuple(shape))
    return take_channels(b, piece, want, dim=want.axis) if isinstance(want, ChannelSlice) else piece


# Scratch, measured (tests' shapes to SmolLM-sized layers, oneDNN on an x86 CPU): oneDNN lays
# the weights out in its own blocked format at every call (a copy of w_ih and w_hh), the
# backward holds the gates' gradients of every step, and both hold their results before
# they are packed. The workspace is carried (counted with the output), not scratch.

def _weight_bytes(w_ih, w_hh, dtype) -> int:
    return (math.prod(w_ih.shape) + math.prod(w_hh.shape)) * dtype.itemsize


def _forward_scratch(n) -> int:
    return _weight_bytes(n.inputs[3], n.inputs[4], n.dtype) + n.nbytes


def _grad_scratch(n) -> int:
    # Where the forward kept no workspace, the forward runs again: its workspace and output too.
    packed, x, w_ih, w_hh = n.inputs[1], n.inputs[2], n.inputs[5], n.inputs[6]
    steps, batch, _ = _dims(x, w_hh)
    gate_grads = steps * batch * w_hh.shape[0] * n.dtype.itemsize
    again = 0 if packed.attrs.get("workspace") else workspace_bytes(x, w_hh, n.attrs["reverse"]) + packed.nbytes
    return n.nbytes + _weight_bytes(w_ih, w_hh, n.dtype) + gate_grads + again


# -- ONNX: the forward as ONNX's LSTM op; the backward as _looped_layer_grad, step by step --

_ONNX_LSTM_GATES = (0, 3, 1, 2)  # torch's i, f, g, o as ONNX's i, o, f, c


def _onnx_gate_rows(ctx, w, hidden, order=_ONNX_LSTM_GATES):
    """A weight's (or bias's) gate blocks from torch's order to ONNX's: `order` lists, in ONNX's
    order, the index of each gate in torch's."""
    block = lambda k: ctx.op("Slice", w, ctx.ints([k * hidden]), ctx.ints([(k + 1) * hidden]), ctx.ints([0]))  # noqa: E731
    return ctx.op("Concat", *(block(k) for k in order), axis=0)


def _onnx_lstm_layer(ctx, n, xs):
    """ONNX's LSTM op; in float64, which onnxruntime's LSTM lacks, the steps one by one."""
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = xs
    hidden = n.inputs[4].shape[1]
    flat = lambda t: ctx.op("Reshape", t, ctx.ints([-1]))  # noqa: E731
    if n.dtype == torch.float64:
        h, c, saved = _onnx_steps(ctx, n.inputs[0].shape[0], hidden, n.attrs["reverse"], xs)
        return ctx.op("Concat", flat(_onnx_stacked(ctx, {t: step[7] for t, step in saved.items()})), flat(h), flat(c),
                      axis=0)
    first = lambda t: ctx.op("Unsqueeze", t, ctx.ints([0]))  # noqa: E731  (ONNX's num_directions axis)
    bias = ctx.op("Concat", _onnx_gate_rows(ctx, b_ih, hidden), _onnx_gate_rows(ctx, b_hh, hidden), axis=0)
    y, hy, cy = ctx.op("LSTM", x, first(_onnx_gate_rows(ctx, w_ih, hidden)), first(_onnx_gate_rows(ctx, w_hh, hidden)),
                       first(bias), "", first(h0), first(c0), outputs=3, hidden_size=hidden,
                       direction="reverse" if n.attrs["reverse"] else "forward")
    return ctx.op("Concat", flat(y), flat(hy), flat(cy), axis=0)


def _onnx_steps(ctx, steps, hidden, reverse, xs):
    """_looped_layer in ONNX: the last h and c, and each step's (i, f, g, o, c before,
    tanh(c after), h before, h after, o tanh(c after)). With an eighth input w_hr (lstm_proj.py),
    h after is the projection W_hr (o tanh(c after))."""
    x, h, c, w_ih, w_hh, b_ih, b_hh, *w_hr = xs
    mul = lambda *ts: _onnx_product(ctx, ts)  # noqa: E731
    piece = lambda t, k: ctx.op("Slice", t, ctx.ints([k * hidden]), ctx.ints([(k + 1) * hidden]), ctx.ints([1]))  # noqa: E731
    transposed = lambda t: ctx.op("Transpose", t, perm=[1, 0])  # noqa: E731
    projected = ctx.op("Add", ctx.op("MatMul", x, transposed(w_ih)), ctx.op("Add", b_ih, b_hh))
    w_hh_t, w_hr_t = transposed(w_hh), [transposed(w) for w in w_hr]
    saved = {}
    for t in _steps(steps, reverse):
        gates = ctx.op("Add", _onnx_at(ctx, projected, t), ctx.op("MatMul", h, w_hh_t))
        i, f, o = (ctx.op("Sigmoid", piece(gates, k)) for k in (0, 1, 3))
        gate = ctx.op("Tanh", piece(gates, 2))
        c_after = ctx.op("Add", mul(f, c), mul(i, gate))
        tanh_c = ctx.op("Tanh", c_after)
        gated = mul(o, tanh_c)
        h_after = ctx.op("MatMul", gated, w_hr_t[0]) if w_hr_t else gated
        saved[t] = (i, f, gate, o, c, tanh_c, h, h_after, gated)
        h, c = h_after, c_after
    return h, c, saved


def _onnx_unpacked(ctx, flat, parts):
    """The pieces of a packed buffer (a packed_parts' (start, size, shape) each) as ONNX values."""
    return [ctx.op("Reshape", ctx.op("Slice", flat, ctx.ints([start]), ctx.ints([start + size]), ctx.ints([0])),
                   ctx.ints(shape)) for start, size, shape in parts]


def _onnx_at(ctx, t, step):
    return ctx.op("Gather", t, ctx.scalar(step, torch.int64), axis=0)


def _onnx_stacked(ctx, values):
    """{step: [N, X]} as [T, N, X], in time order."""
    return ctx.op("Concat", *(ctx.op("Unsqueeze", values[t], ctx.ints([0])) for t in sorted(values)), axis=0)


def _onnx_lstm_layer_grad(ctx, n, xs):
    """_looped_layer_grad in ONNX: the layer again, then its steps backward."""
    g, _, x, h0, c0, w_ih, w_hh, b_ih, b_hh = xs
    steps, batch, hidden = _dims(n.inputs[2], n.inputs[6])
    one = ctx.scalar(1.0, n.dtype)
    mul = lambda *ts: _onnx_product(ctx, ts)  # noqa: E731
    minus_from_one = lambda t: ctx.op("Sub", one, t)  # noqa: E731
    _, _, saved = _onnx_steps(ctx, steps, hidden, n.attrs["reverse"], xs[2:])

    gy, dh, dc = _onnx_unpacked(ctx, g, _packed_parts(steps, batch, hidden))
    gate_grads = {}
    for t in reversed(_steps(steps, n.attrs["reverse"])):
        i, f, gate, o, c, tanh_c, *_ = saved[t]
        dh = ctx.op("Add", dh, _onnx_at(ctx, gy, t))
        dc = ctx.op("Add", dc, mul(dh, o, minus_from_one(mul(tanh_c, tanh_c))))
        gate_grads[t] = ctx.op("Concat", mul(dc, gate, i, minus_from_one(i)), mul(dc, c, f, minus_from_one(f)),
                               mul(dc, i, minus_from_one(mul(gate, gate))), mul(dh, tanh_c, o, minus_from_one(o)),
                               axis=1)
        dh, dc = ctx.op("MatMul", gate_grads[t], w_hh), mul(dc, f)
    grads = _onnx_stacked(ctx, gate_grads)
    before = _onnx_stacked(ctx, {t: step[6] for t, step in saved.items()})
    rows = lambda t, width: ctx.op("Reshape", t, ctx.ints([steps * batch, width]))  # noqa: E731
    flat_grads = rows(grads, 4 * hidden)
    flat_grads_t = ctx.op("Transpose", flat_grads, perm=[1, 0])
    flat = lambda t: ctx.op("Reshape", t, ctx.ints([-1]))  # noqa: E731
    return ctx.op("Concat", flat(ctx.op("MatMul", grads, w_ih)), flat(dh), flat(dc),
                  flat(ctx.op("MatMul", flat_grads_t, rows(x, n.inputs[2].shape[2]))),
                  flat(ctx.op("MatMul", flat_grads_t, rows(before, hidden))),
                  ctx.reduce("ReduceSum", flat_grads, [0], keepdims=False), axis=0)


def _onnx_product(ctx, factors):
    out = factors[0]
    for f in factors[1:]:
        out = ctx.op("Mul", out, f)
    return out


register("lstm_layer", _lstm_layer, _lstm_layer_vjp,
         shape=lambda x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, workspace=0: ((_packed_size(x, w_hh),), x.dtype),
         scratch=_forward_scratch, carries=lambda n: n.attrs.get("workspace", 0), onnx=_onnx_lstm_layer)
register("lstm_layer_grad", _lstm_layer_grad,
         shape=lambda g, packed, x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse: (
             (sum(math.prod(t.shape) for t in (x, h0, c0, w_ih, w_hh, b_ih)),), x.dtype),
         scratch=_grad_scratch, onnx=_onnx_lstm_layer_grad)


@aten(A.lstm.input)
def _(b, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    """nn.LSTM: one lstm_layer per layer and direction (rnn_layers); with projections
    (proj_size: a fifth weight a layer), one lstm_proj_layer (lstm_proj.py)."""
    if len(params) == num_layers * (2 if bidirectional else 1) * (4 if has_biases else 2):
        return rnn_layers(b, "lstm_layer", _packed_parts, x, hx, params, has_biases, num_layers, bidirectional,
                          batch_first)
    return rnn_layers(b, "lstm_proj_layer", _packed_parts, x, hx, params, has_biases, num_layers, bidirectional,
                      batch_first, widths=lambda weights: (weights[1].shape[1], weights[-1].shape[1]))


def rnn_layers(b, op, packed_parts, x, states, params, has_biases, num_layers, bidirectional, batch_first,
               widths=lambda weights: (weights[1].shape[1],), **attrs):
    """An nn.LSTM's, nn.GRU's or nn.RNN's layers as one `op` node per layer and direction,
    time-major; a reverse direction's outputs are concatenated after the forward one's, as
    torch lays them out. `states`: the initial states ([h0, c0], or [h0]), each [layers x directions, N, H];
    `packed_parts(T, N, *widths(weights))`: where y and the last states sit in the op's buffer
    (the widths: the output's, H, and a projected LSTM's cell's after it). A layer's weights
    are w_ih, w_hh, the biases (zeros where the layer has none), then any others (w_hr);
    `attrs`: the op's own attributes besides `reverse` (an nn.RNN's nonlinearity).
    Returns the output and the last states, as the aten op does."""
    directions = 2 if bidirectional else 1
    per_layer = len(params) // (num_layers * directions)
    layer_input = b.emit("permute", x, dims=(1, 0, 2)) if batch_first else x
    last = [[] for _ in states]
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            k = layer * directions + direction
            weights = list(params[k * per_layer:(k + 1) * per_layer])
            if not has_biases:
                weights[2:2] = [b.const(torch.zeros(weights[0].shape[0], dtype=x.dtype))] * 2
            firsts = [b.emit("select", s, dim=0, index=k) for s in states]
            packed = b.emit(op, layer_input, *firsts, *weights, reverse=direction == 1, **attrs)
            steps, batch, _ = layer_input.shape
            y, *ends = _unpacked(b, packed, packed_parts(steps, batch, *widths(weights)))
            outputs.append(y)
            for kept, end in zip(last, ends):
                kept.append(end)
        layer_input = outputs[0] if directions == 1 else b.emit("cat", *outputs, dim=2)
    out = b.emit("permute", layer_input, dims=(1, 0, 2)) if batch_first else layer_input
    return (out, *(b.emit("cat", *ends, dim=0) for ends in last))


def _unpacked(b, packed, parts):
    """y [T, N, H] and the last states [1, N, H], views of a layer's buffer."""
    views = []
    for start, size, shape in parts:
        piece = b.emit("slice", packed, dim=0, start=start, end=start + size, step=1)
        views.append(b.emit("reshape", piece, shape=shape if len(shape) == 3 else (1, *shape)))
    return tuple(views)
