"""Optimizers as ops in the training graph, numerically as torch.optim on the trained entries.

Each optimizer contributes one in-place update op per trainable parameter. The learning
rate and the step count are runtime inputs (`hyper`), so `trainer.lr` can change between
steps without recompiling. A partially trained parameter is updated only on its chosen
channels; its optimizer state has the shape of that slice. MeZO, the zeroth-order one, is
specified here too; its step is no update op but a graph of its own (edgetune.compiler.zo).
GaLore keeps its Adam moments in a low-rank projection of each targeted weight's gradient, and
Adafactor a matrix's second moment as row and column means, so their state has other shapes
than the gradient's: each optimizer says, per trained tensor, which op updates it and the shape
of each state tensor (`update_for`, an UpdateRule).
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from edgetune.compiler.ir.ops import register
from edgetune.compiler.scheme import SchemeError
from edgetune.runtime.seeds import MASK32, seeds_for


@dataclass(frozen=True)
class UpdateRule:
    """How one trained tensor is updated: the update op, its state tensors as (name, shape) in
    the op's input order, and the op's attributes."""

    op: str
    state: tuple[tuple[str, tuple[int, ...]], ...]
    attrs: dict


def _plain_rule(optimizer, shape: Sequence[int]) -> UpdateRule:
    """The update of an optimizer whose every state tensor has the shape of what it updates."""
    return UpdateRule(optimizer.op, tuple((s, tuple(shape)) for s in optimizer.state_names), optimizer.attrs())


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

    def update_for(self, name: str, shape: Sequence[int], *, table: bool = False, touched: bool = False) -> UpdateRule:
        """The update of trained tensor `name`, whose state has `shape` (see GaLore.update_for)."""
        return _plain_rule(self, shape)


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

    def update_for(self, name: str, shape: Sequence[int], *, table: bool = False, touched: bool = False) -> UpdateRule:
        """The update of trained tensor `name`, whose state has `shape` (see GaLore.update_for)."""
        return _plain_rule(self, shape)


@dataclass
class Adafactor:
    """Adafactor (Shazeer & Stern 2018), numerically as torch.optim.Adafactor on the trained
    entries: no first moment, and the second moment of a tensor of 2 or more dimensions kept as
    the means of its squared gradient over rows and over columns (its last two dimensions), so
    an m x n weight keeps m + n numbers where AdamW keeps 2mn. Each step moves a tensor by
    lr_t * max(eps[1], RMS(tensor)) times its gradient over the estimated RMS, that update clipped
    to RMS d, with lr_t = min(lr, 1/sqrt(step)) and the moment's decay 1 - step**beta2_decay.
    `eps[0]` None: the dtype's machine epsilon. Weight decay as AdamW's: p *= 1 - lr * weight_decay.
    A partially trained tensor's RMS and factors are those of its trained slice."""

    lr: float = 1e-2
    beta2_decay: float = -0.8
    eps: tuple[float | None, float] = (None, 1e-3)
    d: float = 1.0
    weight_decay: float = 0.0
    op: str = field(default="adafactor_update", init=False)

    def __post_init__(self) -> None:
        _check(self.lr >= 0, f"Adafactor lr must be >= 0, got {self.lr}")
        _check(self.beta2_decay <= 0, f"Adafactor beta2_decay must be <= 0, got {self.beta2_decay}")
        _check(len(self.eps) == 2 and (self.eps[0] is None or self.eps[0] >= 0) and self.eps[1] >= 0,
               f"Adafactor eps must be (None or >= 0, >= 0), got {self.eps!r}")
        _check(self.d >= 1, f"Adafactor d (the update's RMS clip) must be >= 1, got {self.d}")
        _check(self.weight_decay >= 0, f"Adafactor weight_decay must be >= 0, got {self.weight_decay}")
        self.eps = tuple(self.eps)

    def attrs(self) -> dict:
        return dict(beta2_decay=self.beta2_decay, eps1=self.eps[0], eps2=self.eps[1], d=self.d,
                    weight_decay=self.weight_decay)

    def update_for(self, name: str, shape: Sequence[int], *, table: bool = False, touched: bool = False) -> UpdateRule:
        """The update of trained tensor `name`, whose gradient has `shape`: factored state for 2+
        dimensions (torch's row_var [..., m, 1] and col_var [..., 1, n]), else one variance."""
        if touched:
            raise SchemeError(f"Adafactor cannot train {name!r} by its 'touched' rows: its factored moment "
                              "averages over all rows, and the rows a batch reads change from batch to batch; "
                              "train chosen rows ({'rows': [ids]}), the whole table, or use AdamW")
        shape = tuple(shape)
        if len(shape) < 2:
            return UpdateRule(self.op, (("variance", shape),), self.attrs())
        rows, cols = shape[:-1] + (1,), shape[:-2] + (1, shape[-1])
        return UpdateRule(self.op, (("row_var", rows), ("col_var", cols)), self.attrs())


@dataclass
class GaLore:
    """GaLore (Zhao et al. 2024): Adam on a low-rank projection of each targeted weight's
    gradient, numerically as galore-torch's GaLoreAdamW with proj_type "std".

    A targeted 2-D weight whose trained gradient G (m x n; the trained slice's, under a ratio
    rule) has min(m, n) > rank keeps its moments in R = G @ P^T (m >= n, P = V[:rank] of the
    SVD G = U S V^T) or R = P^T @ G (m < n, P = U[:, :rank]), and moves by -step_size * scale
    times the moments' Adam direction projected back. P is recomputed from G at steps 1,
    1 + update_gap, ... and kept in between; the moments are not re-projected when it changes
    (as galore-torch). Weight decay is applied after the update: p -= lr * weight_decay * p.
    Every other trained tensor (biases, norms, small or untargeted weights) gets AdamW with
    the same hyperparameters. `targets`: fnmatch patterns over parameter names; None: every
    2-D trained weight but embedding tables (weights an embedding lookup reads).

    The refresh steps count the trainer's steps, as AdamW's bias correction does: a refresh
    skipped for a non-finite gradient (on_nonfinite="skip") keeps the last projector until
    the next one (at step 1 there is none yet: until the next refresh only weight decay moves
    that weight). The memory plan counts the refresh's SVD at every step: the peak it predicts
    is that of a refresh step. ONNX has no SVD: the step runs on backend="torch" only."""

    lr: float = 1e-3
    rank: int = 128
    update_gap: int = 200
    scale: float = 0.25
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    targets: Sequence[str] | None = None
    op: str = field(default="galore_update", init=False)

    def __post_init__(self) -> None:
        _check(self.lr >= 0, f"GaLore lr must be >= 0, got {self.lr}")
        _check(_whole(self.rank) and self.rank >= 1, f"GaLore rank must be a whole number >= 1, got {self.rank!r}")
        _check(_whole(self.update_gap) and self.update_gap >= 1,
               f"GaLore update_gap must be a whole number >= 1, got {self.update_gap!r}")
        _check(self.scale > 0, f"GaLore scale must be > 0, got {self.scale}")
        _check(all(0 <= b < 1 for b in self.betas), f"GaLore betas must be in [0, 1), got {self.betas}")
        _check(self.eps >= 0, f"GaLore eps must be >= 0, got {self.eps}")
        _check(self.weight_decay >= 0, f"GaLore weight_decay must be >= 0, got {self.weight_decay}")
        if isinstance(self.targets, str):  # one pattern, not its characters
            self.targets = (self.targets,)
        if self.targets is not None:
            self.targets = tuple(self.targets)
            _check(bool(self.targets) and all(isinstance(t, str) and t for t in self.targets),
                   f"GaLore targets must be None or a non-empty list of parameter name patterns, got {self.targets!r}")

    def projects(self, name: str, shape: Sequence[int], table: bool = False) -> bool:
        """Whether trained tensor `name` (gradient `shape`; `table`: an embedding lookup reads
        it) is updated in a low-rank projection; otherwise AdamW updates it."""
        if len(shape) != 2 or min(shape) <= self.rank:
            return False
        if self.targets is None:
            return not table
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.targets)

    def update_for(self, name: str, shape: Sequence[int], *, table: bool = False, touched: bool = False) -> UpdateRule:
        """The update of trained tensor `name`: `shape` is its gradient's (the whole table's under a
        'touched' rule, whose rows change from batch to batch: no fixed matrix to project)."""
        adamw = AdamW(self.lr, self.betas, self.eps, self.weight_decay)
        if not self.projects(name, shape, table):
            return adamw.update_for(name, shape, table=table, touched=touched)
        if touched:
            raise SchemeError(f"GaLore cannot project {name!r}: its 'touched' rows rule trains other rows each "
                              "batch; train chosen rows ({'rows': [ids]}) or a ratio of it, or leave it out of "
                              "GaLore's targets (AdamW then updates it)")
        m, n = shape
        low, projector = ((m, self.rank), (self.rank, n)) if m >= n else ((self.rank, n), (m, self.rank))
        return UpdateRule(self.op, (("exp_avg", low), ("exp_avg_sq", low), ("projector", projector)),
                          dict(adamw.attrs(), update_gap=self.update_gap, scale=self.scale))


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


OPTIMIZERS = ("sgd", "adamw", "adafactor", "mezo")  # what every command offers
# What by_name knows: GaLore is offered only where its rank, gap and scale can be given
# (finetune-lm); ONNX export cannot run it.
ALL_OPTIMIZERS = OPTIMIZERS + ("galore",)


def by_name(name: str, lr: float, weight_decay: float | None = None, **galore):
    """The optimizer a command line or a settings file names: "sgd" (with momentum 0.9, as
    every edgetune run uses it), "adamw", "adafactor" (torch's defaults but the rate), "mezo"
    (zeroth-order, forward passes only: edgetune.compiler.zo), or "galore" (`galore`: its rank,
    update_gap, scale; each None or left out takes GaLore's default); weight decay defaults to
    each one's own default."""
    decay = {} if weight_decay is None else {"weight_decay": weight_decay}
    galore = {k: v for k, v in galore.items() if v is not None}
    if galore and name != "galore":
        raise ValueError(f"{', '.join(sorted(galore))} are GaLore's settings, but the optimizer is {name!r}")
    if name == "galore":
        return GaLore(lr=lr, **decay, **galore)
    if name == "sgd":
        return SGD(lr=lr, momentum=0.9, **decay)
    if name == "adamw":
        return AdamW(lr=lr, **decay)
    if name == "adafactor":
        return Adafactor(lr=lr, **decay)
    if name == "mezo":
        return MeZO(lr=lr, **decay)
    raise ValueError(f"unknown optimizer {name!r}: use one of {', '.join(ALL_OPTIMIZERS)}")


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


def _whole(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


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
    if weight_decay:  # (a multiply by 1.0 changes no bit: without decay it is a pass over w for nothing)
        w.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    step_size = lr / (1 - beta1 ** step)
    denom = (v.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
    w.addcdiv_(m, denom, value=-step_size)
    write_back(w)
    write_state()


def _adafactor_update(p, g, lr, step, *rest, beta2_decay, eps1, eps2, d, weight_decay, part, n_state):
    state, index = _split_state(rest, n_state)
    w, write_back = _trained_part(p, part, index)
    eps1 = torch.finfo(w.dtype).eps if eps1 is None else eps1
    decay = step ** beta2_decay  # the moment's weight on this step's squares (1 at step 1)
    alpha = max(eps2, float(torch.linalg.vector_norm(w)) / math.sqrt(w.numel())) * min(lr, step ** -0.5)
    if weight_decay:
        w.mul_(1 - lr * weight_decay)
    if g.dim() > 1:
        row_var, col_var = state
        # the mean squares over each row and column, from norms: no temporary of g's size
        row_var.lerp_(torch.linalg.vector_norm(g, dim=-1, keepdim=True).square_().div_(g.shape[-1]), decay)
        col_var.lerp_(torch.linalg.vector_norm(g, dim=-2, keepdim=True).square_().div_(g.shape[-2]), decay)
        variance = (row_var @ col_var).div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))
    else:
        (moment,) = state
        moment.lerp_(g * g, decay)
        variance = moment.clone()
    update = variance.clamp_(min=eps1 * eps1).rsqrt_().mul_(g)
    clip = max(1.0, float(torch.linalg.vector_norm(update)) / (math.sqrt(update.numel()) * d))
    w.add_(update, alpha=-alpha / clip)
    write_back(w)


def _adafactor_scratch(n) -> int:
    """The update (the variance estimate, rewritten in place), and a gathered slice's copy."""
    g = n.inputs[1]
    guard = 1 if n.attrs.get("guarded") else 0  # the condition an update runs under comes last
    gathered = n.attrs["part"] is not None and len(n.inputs) > 4 + n.attrs["n_state"] + guard
    return g.nbytes * (2 if gathered else 1)


# -- many small whole tensors at once (the torch backend groups their updates, backends/grouped.py)
# The same arithmetic as the kernels above, in torch's multi-tensor (_foreach_) ops: at batch 1 a
# bias's update is a few kernel calls on a few hundred numbers, and the calls are the cost.

def _sgd_update_many(ps, gs, lr, step, states, *, momentum, dampening, weight_decay, nesterov):
    ds = gs if weight_decay == 0 else torch._foreach_add(gs, ps, alpha=weight_decay)
    if momentum:
        bufs = states[0]
        if step == 1:
            torch._foreach_copy_(bufs, ds)
        else:
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, ds, alpha=1 - dampening)
        ds = torch._foreach_add(ds, bufs, alpha=momentum) if nesterov else bufs
    torch._foreach_add_(ps, ds, alpha=-lr)


def _adamw_update_many(ps, gs, lr, step, states, *, beta1, beta2, eps, weight_decay):
    ms, vs = states
    if weight_decay:
        torch._foreach_mul_(ps, 1 - lr * weight_decay)
    torch._foreach_lerp_(ms, gs, 1 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
    step_size = lr / (1 - beta1 ** step)
    denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, math.sqrt(1 - beta2 ** step))
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(ps, ms, denom, value=-step_size)


# Update op -> its kernel over lists of whole tensors (state as one list per state tensor).
MANY = {"sgd_update": _sgd_update_many, "adamw_update": _adamw_update_many}


def finite_each(loss_ok: bool, gs: list) -> list[bool]:
    """update_ok of each gradient (the loss finite, the gradient's norm finite), in one reduction."""
    if not loss_ok:
        return [False] * len(gs)
    return torch.stack(torch._foreach_norm(gs)).isfinite().tolist()


def _galore_update(p, g, lr, step, *rest, beta1, beta2, eps, weight_decay, update_gap, scale, part, n_state):
    (m, v, projector), index = _split_state(rest, n_state)
    w, write_back = _trained_part(p, part, index)
    wide = g.shape[0] < g.shape[1]  # m < n: P = U[:, :rank] projects from the left
    if (step - 1) % update_gap == 0:  # galore-torch's `iter % update_proj_gap == 0`, iter from 0
        projector.copy_(_galore_projector(g, projector.shape[1] if wide else projector.shape[0], wide))
    low = projector.T @ g if wide else g @ projector.T
    m.mul_(beta1).add_(low, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(low, low, value=1 - beta2)
    direction = m / v.sqrt().add_(eps)
    step_size = lr * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
    back = projector @ direction if wide else direction @ projector
    w.add_(back.mul_(scale), alpha=-step_size)  # scaled in place: one full-size temporary, not two
    if weight_decay > 0:
        w.add_(w, alpha=-lr * weight_decay)
    write_back(w)


def _galore_projector(g, rank: int, wide: bool):
    """The first `rank` left (wide) or right singular vectors of g, from an SVD in float32 at
    least (float64 stays float64), as galore-torch computes them."""
    u, _, vh = torch.linalg.svd(g.to(torch.promote_types(g.dtype, torch.float32)), full_matrices=False)
    return u[:, :rank] if wide else vh[:rank, :]


def _galore_scratch(n) -> int:
    """The larger of the refresh and the update. The refresh: torch copies G and U, V^T for
    LAPACK's column-major layout and gesdd works in about k^2 more (k = min(m, n)); this
    formula is within 5% of what a 2048x1024 float32 SVD was measured to take on this project's
    VM (small ones take a few MB more, fixed). The update: the low-rank gradient and its Adam
    direction, and the full-size direction projected back."""
    g, low = n.inputs[1], n.inputs[4]
    rows, cols = g.shape
    k = min(rows, cols)
    svd_bytes = torch.promote_types(g.dtype, torch.float32).itemsize
    refresh = (2 * (rows * cols + rows * k + k * cols) + k * k + k) * svd_bytes
    return max(refresh, 3 * low.nbytes + g.nbytes)


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


def _onnx_lerp_by(ctx, start, end, weight, dtype, shape):
    """torch.lerp's formula for a weight known only at run time (a scalar of `dtype`)."""
    diff = ctx.op("Sub", end, start)
    low = ctx.op("Add", start, ctx.op("Mul", weight, diff))
    high = ctx.op("Sub", end, ctx.op("Mul", diff, ctx.op("Sub", ctx.scalar(1.0, dtype), weight)))
    return ctx.choose(ctx.op("Less", weight, ctx.scalar(0.5, dtype)), low, high, dtype, shape)


def _onnx_rms(ctx, x, count: int):
    """The root mean square of all of x's entries, as a float64 scalar (the kernel's Python float)."""
    norm = ctx.op("Sqrt", ctx.reduce("ReduceSumSquare", x, [], keepdims=False))
    return ctx.op("Div", ctx.cast(norm, torch.float64), ctx.scalar(math.sqrt(count), torch.float64))


def _adafactor_update_onnx(ctx, n, xs):
    a, dtype, shape = n.attrs, n.inputs[0].dtype, tuple(n.inputs[1].shape)
    p, g, lr, step, state, index = _onnx_update_operands(n, xs)
    eps1 = torch.finfo(dtype).eps if a["eps1"] is None else a["eps1"]
    f64 = lambda v: ctx.scalar(v, torch.float64)  # noqa: E731
    count = math.prod(shape)
    w = _onnx_read_part(ctx, n, p, index)
    steps = ctx.cast(step, torch.float64)
    decay = ctx.cast(ctx.op("Pow", steps, f64(a["beta2_decay"])), dtype)
    rate = ctx.op("Min", lr, ctx.op("Pow", steps, f64(-0.5)))
    alpha = ctx.op("Mul", ctx.op("Max", _onnx_rms(ctx, w, count), f64(a["eps2"])), rate)
    if a["weight_decay"]:
        w = ctx.op("Mul", w, ctx.cast(ctx.op("Sub", f64(1.0), ctx.op("Mul", lr, f64(a["weight_decay"]))), dtype))
    squares = ctx.op("Mul", g, g)
    if len(shape) > 1:
        row_var = _onnx_lerp_by(ctx, state[0], ctx.reduce("ReduceMean", squares, [-1], keepdims=True), decay, dtype,
                                shape[:-1] + (1,))
        col_var = _onnx_lerp_by(ctx, state[1], ctx.reduce("ReduceMean", squares, [-2], keepdims=True), decay, dtype,
                                shape[:-2] + (1, shape[-1]))
        row_scale = ctx.op("Max", ctx.reduce("ReduceMean", row_var, [-2], keepdims=True), ctx.scalar(eps1, dtype))
        variance = ctx.op("Div", ctx.op("MatMul", row_var, col_var), row_scale)
        new_state = (row_var, col_var)
    else:
        variance = _onnx_lerp_by(ctx, state[0], squares, decay, dtype, shape)
        new_state = (variance,)
    root = ctx.op("Sqrt", ctx.op("Max", variance, ctx.scalar(eps1 * eps1, dtype)))
    update = ctx.op("Mul", ctx.op("Reciprocal", root), g)
    clip = ctx.op("Max", ctx.op("Div", _onnx_rms(ctx, update, count), f64(a["d"])), f64(1.0))
    new_w = ctx.op("Sub", w, ctx.op("Mul", update, ctx.cast(ctx.op("Div", alpha, clip), dtype)))
    return (_onnx_write_part(ctx, n, p, new_w, index), *new_state)


def _galore_update_onnx(ctx, n, xs):
    raise NotImplementedError("GaLore recomputes its projector by an SVD, which ONNX has no operator for: run "
                              "GaLore with backend='torch', or export a step with another optimizer (et.AdamW)")


register("is_finite", _is_finite, shape=_bool_scalar, onnx=lambda ctx, n, xs: _onnx_finite(ctx, xs[0]))
register("update_ok", _update_ok, shape=_bool_scalar,
         onnx=lambda ctx, n, xs: ctx.op("And", xs[0], _onnx_finite(ctx, xs[1])))
register("all_of", lambda *conditions: all(conditions), shape=_bool_scalar, onnx=_onnx_all)
register("sgd_update", _sgd_update, shape=_bool_scalar, mutates=_param_and_state, onnx=_sgd_update_onnx)
register("adamw_update", _adamw_update, shape=_bool_scalar, mutates=_param_and_state, onnx=_adamw_update_onnx)
register("adafactor_update", _adafactor_update, shape=_bool_scalar, mutates=_param_and_state,
         scratch=_adafactor_scratch, onnx=_adafactor_update_onnx)
register("galore_update", _galore_update, shape=_bool_scalar, mutates=_param_and_state, scratch=_galore_scratch,
         onnx=_galore_update_onnx)
register("assign", lambda dst, src: dst.copy_(src), shape=_bool_scalar, mutates=(0,),
         onnx=lambda ctx, n, xs: (ctx.convert(xs[1], n.inputs[1].dtype, n.inputs[0].dtype),))
