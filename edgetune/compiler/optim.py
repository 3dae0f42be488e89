"""Optimizers as ops in the training graph, numerically as torch.optim on the trained entries.

Each optimizer contributes one in-place update op per trainable parameter. The learning
rate and the step count are runtime inputs (`hyper`), so `trainer.lr` can change between
steps without recompiling. A partially trained parameter is updated only on its chosen
channels; its optimizer state has the shape of that slice. MeZO, the zeroth-order one, is
specified here too; its step is no update op but a graph of its own (edgetune.compiler.zo).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from edgetune.compiler.ir.ops import register
from edgetune.runtime.seeds import MASK32, seeds_for


@dataclass
class SGD:
    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    op: str = field(default="sgd_update", init=False)

    def __post_init__(self) -> None:
        _check(self.lr >= 0, f"SGD lr must be >= 0, got {self.lr}")
        _check(self.momentum >= 0, f"SGD momentum must be >= 0, got {self.momentum}")
        _check(not self.nesterov or (self.momentum > 0 and self.dampening == 0),
               "SGD nesterov needs momentum > 0 and dampening 0")

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.momentum else ()

    def attrs(self) -> dict:
        return dict(momentum=self.momentum, dampening=self.dampening, weight_decay=self.weight_decay,
                    nesterov=self.nesterov)


@dataclass
class AdamW:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    op: str = field(default="adamw_update", init=False)

    def __post_init__(self) -> None:
        _check(self.lr >= 0, f"AdamW lr must be >= 0, got {self.lr}")
        _check(all(0 <= b < 1 for b in self.betas), f"AdamW betas must be in [0, 1), got {self.betas}")
        _check(self.eps >= 0, f"AdamW eps must be >= 0, got {self.eps}")

    state_names = ("exp_avg", "exp_avg_sq")

    def attrs(self) -> dict:
        return dict(beta1=self.betas[0], beta2=self.betas[1], eps=self.eps, weight_decay=self.weight_decay)


@dataclass
class MeZO:
    """Zeroth-order SGD (MeZO): `directions` SPSA estimates a step, each from two forward passes
    at theta +- eps z. `seeds`: a fixed pool the step's directions are drawn from (FedKSeed's
    K seeds); default: a fresh 32-bit seed each step, derived from `seed` and the step count
    (a resumed run draws the same ones)."""

    lr: float
    eps: float = 1e-3
    directions: int = 1
    weight_decay: float = 0.0
    seed: int = 0
    seeds: Sequence[int] | None = None
    op: str = field(default="zo_update", init=False)

    def __post_init__(self) -> None:
        _check(self.lr >= 0, f"MeZO lr must be >= 0, got {self.lr}")
        _check(self.eps > 0, f"MeZO eps must be > 0, got {self.eps}")
        _check(isinstance(self.directions, int) and self.directions >= 1,
               f"MeZO directions must be a whole number >= 1, got {self.directions!r}")
        _check(self.weight_decay >= 0, f"MeZO weight_decay must be >= 0, got {self.weight_decay}")
        if self.seeds is not None:
            self.seeds = tuple(int(s) for s in self.seeds)
            _check(bool(self.seeds) and all(0 <= s <= MASK32 for s in self.seeds),
                   "MeZO seeds must be a non-empty list of 32-bit seeds (0 .. 2**32 - 1)")

    state_names = ()  # nothing kept between steps but the seed

    def seeds_for(self, step: int) -> list[int]:
        """The seeds of step `step`'s directions: a function of the step count alone."""
        return seeds_for(step, self.seed, self.directions, self.seeds)


OPTIMIZERS = ("sgd", "adamw", "mezo")


def by_name(name: str, lr: float, weight_decay: float | None = None):
    """The optimizer a command line or a settings file names: "sgd" (with momentum 0.9, as
    every edgetune run uses it), "adamw", or "mezo" (zeroth-order, forward passes only:
    edgetune.compiler.zo); weight decay defaults to each one's own default."""
    decay = {} if weight_decay is None else {"weight_decay": weight_decay}
    if name == "sgd":
        return SGD(lr=lr, momentum=0.9, **decay)
    if name == "adamw":
        return AdamW(lr=lr, **decay)
    if name == "mezo":
        return MeZO(lr=lr, **decay)
    raise ValueError(f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


# -- the update kernels: inputs (param, grad, lr, step, *state[, index]) ---------------------

def _trained_part(p, part, index, touched=False):
    """The entries of p that train, and how to write them back (a view needs nothing).

    `touched`: `index` holds the rows a batch looked up, a row as often as it was read; each
    copy of a row computes the same new values (its gradient is the row's summed gradient),
    so writing them all back in any order leaves that value."""
    if touched:
        return p.index_select(0, index), lambda v: p.index_copy_(0, index, v)
    if part is None:
        return p, lambda v: None
    axis, k = part
    if index is None:
        return p.narrow(axis, 0, k), lambda v: None
    return p.index_select(axis, index), lambda v: p.index_copy_(axis, index, v)


def _split_state(rest, n_state):
    return rest[:n_state], (rest[n_state] if len(rest) > n_state else None)


def _touched_state(state, index, touched):
    """The optimizer state of the trained entries, and how to write it back: under a
    'touched' rule the state covers the whole table and is read and written by rows."""
    if not touched:
        return list(state), lambda: None
    rows = [s.index_select(0, index) for s in state]
    return rows, lambda: [s.index_copy_(0, index, r) for s, r in zip(state, rows)]


def _sgd_update(p, g, lr, step, *rest, momentum, dampening, weight_decay, nesterov, part, n_state, touched=False):
    whole_state, index = _split_state(rest, n_state)
    w, write_back = _trained_part(p, part, index, touched)
    state, write_state = _touched_state(whole_state, index, touched)
    d = g if weight_decay == 0 else g.add(w, alpha=weight_decay)
    if momentum:
        buf = state[0]
        if step == 1:
            buf.copy_(d)
        else:
            buf.mul_(momentum).add_(d, alpha=1 - dampening)
        d = d.add(buf, alpha=momentum) if nesterov else buf
    w.add_(d, alpha=-lr)
    write_back(w)
    write_state()


def _adamw_update(p, g, lr, step, *rest, beta1, beta2, eps, weight_decay, part, n_state, touched=False):
    whole_state, index = _split_state(rest, n_state)
    w, write_back = _trained_part(p, part, index, touched)
    (m, v), write_state = _touched_state(whole_state, index, touched)
    w.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    step_size = lr / (1 - beta1 ** step)
    denom = (v.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
    w.addcdiv_(m, denom, value=-step_size)
    write_back(w)
    write_state()


def _bool_scalar(*inputs, **attrs):
    # The shape rule of the guards (a condition) and of the updates (effects, whose value
    # nothing reads).
    return (), torch.bool


def _param_and_state(node):
    return (0,) + tuple(range(4, 4 + node.attrs["n_state"]))


# The guards of `compile(on_nonfinite=...)`. Each returns a Python bool, which the step's
# `if` reads anyway: no tensor ops for the `and`s (at batch 1 a step runs ~100 guards).

def _is_finite(x) -> bool:
    # One reduction and no temporary of x's size. A gradient whose squares overflow counts as
    # not finite too: AdamW's second moment would overflow on it.
    return math.isfinite(torch.linalg.vector_norm(x))


def _update_ok(loss_ok: bool, g) -> bool:
    return loss_ok and _is_finite(g)  # a non-finite loss skips the reduction


# -- ONNX lowerings (edgetune.compiler.backends.onnx): an update returns the new parameter and
# the new state. The hyperparameter arithmetic (lr, bias corrections) runs in float64 as the
# kernels' Python floats do, and is cast to the tensor's dtype where a kernel uses it.

def _onnx_finite(ctx, x):
    # The sum of squares overflows where torch's norm would not only for norms above the
    # square root of the dtype's largest value: stricter there, never looser.
    total = ctx.reduce("ReduceSumSquare", x, [], keepdims=False)
    return ctx.op("Not", ctx.op("Or", ctx.op("IsNaN", total), ctx.op("IsInf", total)))


def _onnx_all(ctx, n, conditions):
    out = conditions[0]
    for c in conditions[1:]:
        out = ctx.op("And", out, c)
    return out


def _onnx_read_part(ctx, n, p, index):
    """The trained entries of p (as _trained_part)."""
    if n.attrs.get("touched"):
        return ctx.op("Gather", p, index[0], axis=0)
    if n.attrs["part"] is None:
        return p
    axis, k = n.attrs["part"]
    if index:
        return ctx.op("Gather", p, index[0], axis=axis)
    return ctx.op("Slice", p, ctx.ints([0]), ctx.ints([k]), ctx.ints([axis]))


def _onnx_write_part(ctx, n, p, new, index):
    """p with its trained entries replaced by `new`; the other entries are copied unchanged."""
    if n.attrs.get("touched"):  # repeated rows carry equal values: any order of writes leaves them
        return ctx.op("ScatterND", p, ctx.op("Unsqueeze", index[0], ctx.ints([-1])), new)
    if n.attrs["part"] is None:
        return new
    axis, k = n.attrs["part"]
    shape = n.inputs[0].shape
    if not index:
        rest = ctx.op("Slice", p, ctx.ints([k]), ctx.ints([shape[axis]]), ctx.ints([axis]))
        return ctx.op("Concat", new, rest, axis=axis)
    along = ctx.op("Reshape", index[0], ctx.ints([1] * axis + [-1] + [1] * (len(shape) - axis - 1)))
    trained_shape = list(shape[:axis]) + [k] + list(shape[axis + 1:])
    return ctx.op("ScatterElements", p, ctx.op("Expand", along, ctx.ints(trained_shape)), new, axis=axis)


def _onnx_update_operands(n, names):
    """(param, grad, lr, step, state, index) of an update's inputs."""
    p, g, lr, step, *rest = names
    return p, g, lr, step, rest[:n.attrs["n_state"]], rest[n.attrs["n_state"]:]


def _onnx_state_rows(ctx, n, state, index):
    """The state of the trained entries: all of it, or under a 'touched' rule the looked-up rows."""
    return [ctx.op("Gather", s, index[0], axis=0) for s in state] if n.attrs.get("touched") else list(state)


def _onnx_new_state(ctx, n, state, new, index):
    """The whole new state: the rows written back into the table's state under 'touched'."""
    if not n.attrs.get("touched"):
        return list(new)
    rows = ctx.op("Unsqueeze", index[0], ctx.ints([-1]))
    return [ctx.op("ScatterND", s, rows, v) for s, v in zip(state, new)]


def _sgd_update_onnx(ctx, n, xs):
    a, dtype = n.attrs, n.inputs[0].dtype
    p, g, lr, step, whole_state, index = _onnx_update_operands(n, xs)
    state = _onnx_state_rows(ctx, n, whole_state, index)
    c = lambda v: ctx.scalar(v, dtype)  # noqa: E731
    w = _onnx_read_part(ctx, n, p, index)
    d = g if a["weight_decay"] == 0 else ctx.op("Add", g, ctx.op("Mul", w, c(a["weight_decay"])))
    new_state = []
    if a["momentum"]:
        damped = d if a["dampening"] == 0 else ctx.op("Mul", d, c(1 - a["dampening"]))
        later = ctx.op("Add", ctx.op("Mul", state[0], c(a["momentum"])), damped)
        first = ctx.op("Equal", step, ctx.scalar(1, torch.int64))  # step 1 starts the buffer at d
        buf = ctx.choose(first, d, later, dtype, n.inputs[1].shape)
        new_state.append(buf)
        d = ctx.op("Add", d, ctx.op("Mul", buf, c(a["momentum"]))) if a["nesterov"] else buf
    new_w = ctx.op("Sub", w, ctx.op("Mul", d, ctx.cast(lr, dtype)))
    return (_onnx_write_part(ctx, n, p, new_w, index), *_onnx_new_state(ctx, n, whole_state, new_state, index))


def _onnx_lerp(ctx, start, end, weight, dtype):
    """torch.lerp's formula for a constant weight (it switches form at 0.5 for accuracy)."""
    diff = ctx.op("Sub", end, start)
    if weight < 0.5:
        return ctx.op("Add", start, ctx.op("Mul", ctx.scalar(weight, dtype), diff))
    return ctx.op("Sub", end, ctx.op("Mul", diff, ctx.scalar(1 - weight, dtype)))


def _adamw_update_onnx(ctx, n, xs):
    a, dtype = n.attrs, n.inputs[0].dtype
    p, g, lr, step, whole_state, index = _onnx_update_operands(n, xs)
    m, v = _onnx_state_rows(ctx, n, whole_state, index)
    f64 = lambda v: ctx.scalar(v, torch.float64)  # noqa: E731
    w = _onnx_read_part(ctx, n, p, index)
    decay = ctx.op("Sub", f64(1.0), ctx.op("Mul", lr, f64(a["weight_decay"])))
    w = ctx.op("Mul", w, ctx.cast(decay, dtype))
    m = _onnx_lerp(ctx, m, g, 1 - a["beta1"], dtype)
    v = ctx.op("Add", ctx.op("Mul", v, ctx.scalar(a["beta2"], dtype)),
               ctx.op("Mul", ctx.op("Mul", ctx.scalar(1 - a["beta2"], dtype), g), g))  # addcmul's order
    steps = ctx.cast(step, torch.float64)
    correction = lambda beta: ctx.op("Sub", f64(1.0), ctx.op("Pow", f64(beta), steps))  # noqa: E731
    step_size = ctx.cast(ctx.op("Div", lr, correction(a["beta1"])), dtype)
    root = ctx.cast(ctx.op("Sqrt", correction(a["beta2"])), dtype)
    denom = ctx.op("Add", ctx.op("Div", ctx.op("Sqrt", v), root), ctx.scalar(a["eps"], dtype))
    new_w = ctx.op("Sub", w, ctx.op("Mul", step_size, ctx.op("Div", m, denom)))
    return _onnx_write_part(ctx, n, p, new_w, index), *_onnx_new_state(ctx, n, whole_state, (m, v), index)


register("is_finite", _is_finite, shape=_bool_scalar, onnx=lambda ctx, n, xs: _onnx_finite(ctx, xs[0]))
register("update_ok", _update_ok, shape=_bool_scalar,
         onnx=lambda ctx, n, xs: ctx.op("And", xs[0], _onnx_finite(ctx, xs[1])))
register("all_of", lambda *conditions: all(conditions), shape=_bool_scalar, onnx=_onnx_all)
register("sgd_update", _sgd_update, shape=_bool_scalar, mutates=_param_and_state, onnx=_sgd_update_onnx)
register("adamw_update", _adamw_update, shape=_bool_scalar, mutates=_param_and_state, onnx=_adamw_update_onnx)
register("assign", lambda dst, src: dst.copy_(src), shape=_bool_scalar, mutates=(0,),
         onnx=lambda ctx, n, xs: (ctx.convert(xs[1], n.inputs[1].dtype, n.inputs[0].dtype),))
