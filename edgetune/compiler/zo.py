"""Zeroth-order training (MeZO, Malladi et al. 2023; SPSA): a step made of forward passes only.

Per direction d, with z_d a random +-1 vector over the trained entries regenerated from a seed:
theta += eps z_d, loss L+; theta -= 2 eps z_d, loss L-; theta += eps z_d (restored). The
projected gradient g_d = (L+ - L-) / (2 eps) then moves theta by -lr (mean_d g_d z_d + wd theta).
Nothing is kept for a backward: no activations, gradients or optimizer state. The step's peak
is that of one forward pass (each forward's activations die at its loss).

z is a function of (seed, parameter, entry) alone: entry j of a parameter's trained part (its
chosen channels or rows, in the order the slice holds them) gets the top bit of a 32-bit
integer hash (lowbias32) of j, the seed and the parameter's name. Integer arithmetic only, so
torch and any ONNX runtime regenerate the same signs bit for bit: a client and a server that
share a seed share the direction (FedKSeed sends seeds and scalars, never tensors). Rademacher
directions (+-1) rather than MeZO's Gaussian ones: the same unbiased SPSA estimate with a lower
variance, and exact on every backend.

In the compiled graph the perturbations are in-place views of each trained tensor: the first
forward reads theta + eps z, the second theta - eps z, through the views, so their order is
data dependence, which any pass keeps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from edgetune.compiler.ir.builder import Builder
from edgetune.compiler.ir.graph import Graph, Node
from edgetune.compiler.ir.ops import register
from edgetune.compiler.optim import MeZO, _onnx_read_part, _onnx_write_part
from edgetune.runtime.seeds import MASK32, direction_base, mix32, parameter_key, signs

__all__ = ["MeZO", "direction", "add_directions", "parameter_key", "zo_graph"]
CHUNK = 1 << 16  # entries hashed at a time: the scratch stays in cache (4x faster than 1 << 18 here)


# -- the directions ------------------------------------------------------------------------

def direction(seed: int, key: int, start: int, stop: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """z[start:stop] of the direction for (seed, parameter key): +-1 entries. On the CPU numpy's
    wrapping uint32 arithmetic; elsewhere the same hash emulated in int64 on the device."""
    if torch.device(device or "cpu").type == "cpu":
        return torch.from_numpy(signs(seed, key, start, stop)).to(dtype)
    h = mix32(torch.arange(start, stop, dtype=torch.int64, device=device) ^ direction_base(seed, key))
    return ((h >> 31) * 2 - 1).to(dtype)


def add_directions(w: torch.Tensor, key: int, terms: list[tuple[int, float]]) -> None:
    """w += sum of scale * z(seed) over (seed, scale) terms, in place, a chunk at a time. w is
    a parameter's trained part (contiguous, or a copy written back by the caller)."""
    flat = w.view(-1)
    if flat.numel() > MASK32:
        raise ValueError(f"a zeroth-order step indexes a tensor's entries in 32 bits; this one has {flat.numel():,}")
    for start in range(0, flat.numel(), CHUNK):
        stop = min(start + CHUNK, flat.numel())
        for seed, scale in terms:
            flat[start:stop].add_(direction(seed, key, start, stop, w.dtype, w.device), alpha=scale)


# -- the ops -------------------------------------------------------------------------------

def _trained(p: torch.Tensor, part, index):
    """The trained entries of p as one contiguous tensor, and how to write them back."""
    if part is None and p.is_contiguous():
        return p, lambda w: None
    if part is None:
        return p.contiguous(), p.copy_
    axis, k = part
    if index is None:
        view = p.narrow(axis, 0, k)
        return view.contiguous(), view.copy_
    return p.index_select(axis, index).contiguous(), lambda w: p.index_copy_(axis, index, w)


def add_to_trained(p: torch.Tensor, key: int, part, terms: list[tuple[int, float]]) -> None:
    """p's trained entries (`part`: a ChannelSlice or None) += sum of scale * z(seed)."""
    index = part.index.attrs["value"].to(p.device) if part is not None and not part.first else None
    w, write_back = _trained(p, (part.axis, part.k) if part is not None else None, index)
    add_directions(w, key, terms)
    write_back(w)


def _zo_perturb(p, seed, after, *index, scale, key, part):
    """p's trained entries moved by scale * z(seed), in place; returns p. `after`: a value
    that must exist first (the loss of the forward that read p before this move)."""
    w, write_back = _trained(p, part, index[0] if index else None)
    add_directions(w, key, [(int(seed), scale)])
    write_back(w)
    return p


def _zo_update(p, lr, grads, *rest, key, part, weight_decay, directions):
    """theta -= lr (mean_d g_d z_d + weight_decay theta) on the trained entries."""
    seeds, index = rest[:directions], rest[directions:]
    w, write_back = _trained(p, part, index[0] if index else None)
    if weight_decay:
        w.mul_(1 - lr * weight_decay)
    g = grads.tolist()
    add_directions(w, key, [(int(s), -lr * g[d] / directions) for d, s in enumerate(seeds)])
    write_back(w)


def _zo_grads(*losses, eps):
    """[directions]: (L+ - L-) / (2 eps) of each pair (L+, L-)."""
    return torch.stack([(losses[i] - losses[i + 1]) / (2 * eps) for i in range(0, len(losses), 2)])


def _scratch(n: Node) -> int:
    # A chunk's int64 indices and hashes and its +-1 entries; a copy of a trained part that
    # is not contiguous in the parameter (a gathered slice).
    p = n.inputs[0]
    part = n.attrs["part"]
    trained = p.nbytes if part is None else p.nbytes // p.shape[part[0]] * part[1]
    chunk = min(CHUNK, trained // p.dtype.itemsize)
    return 3 * chunk * 8 + (trained if part is not None else 0)


# -- ONNX: the same hash in uint32 arithmetic (Mul wraps mod 2**32), the directions whole ------

def _onnx_u32(ctx, value: int) -> str:
    return ctx.cast(ctx.const(torch.tensor(value, dtype=torch.int64)), torch.uint32)


def _onnx_mix32(ctx, x: str) -> str:
    def xor_shift(v, k):
        return ctx.op("BitwiseXor", v, ctx.op("BitShift", v, _onnx_u32(ctx, k), direction="RIGHT"))

    x = ctx.op("Mul", xor_shift(x, 16), _onnx_u32(ctx, 0x7FEB352D))
    x = ctx.op("Mul", xor_shift(x, 15), _onnx_u32(ctx, 0x846CA68B))
    return xor_shift(x, 16)


def _onnx_direction(ctx, seed: str, key: int, count: int, dtype: torch.dtype) -> str:
    """z[0:count] for (seed, key), flat: as `direction`."""
    base = _onnx_mix32(ctx, ctx.op("BitwiseXor", _onnx_mix32(ctx, ctx.cast(seed, torch.uint32)), _onnx_u32(ctx, key)))
    word = lambda v: ctx.const(torch.tensor(v, dtype=torch.int64))  # noqa: E731
    entries = ctx.cast(ctx.op("Range", word(0), word(count), word(1)), torch.uint32)
    top = ctx.op("BitShift", _onnx_mix32(ctx, ctx.op("BitwiseXor", entries, base)), _onnx_u32(ctx, 31),
                 direction="RIGHT")
    return ctx.op("Sub", ctx.op("Mul", ctx.cast(top, dtype), ctx.scalar(2, dtype)), ctx.scalar(1, dtype))


def _onnx_trained(ctx, n: Node, p: str, index: list[str]) -> tuple[str, int]:
    """The trained part of p, flat, and its entry count."""
    shape = list(n.inputs[0].shape)
    if n.attrs["part"] is not None:
        axis, k = n.attrs["part"]
        shape[axis] = k
    return ctx.op("Reshape", _onnx_read_part(ctx, n, p, index), ctx.ints([-1])), int(torch.Size(shape).numel())


def _onnx_written(ctx, n: Node, p: str, flat: str, index: list[str]) -> str:
    shape = list(n.inputs[0].shape)
    if n.attrs["part"] is not None:
        axis, k = n.attrs["part"]
        shape[axis] = k
    return _onnx_write_part(ctx, n, p, ctx.op("Reshape", flat, ctx.ints(shape)), index)


def _zo_perturb_onnx(ctx, n, xs):
    p, seed, index = xs[0], xs[1], xs[3:]
    flat, count = _onnx_trained(ctx, n, p, index)
    z = _onnx_direction(ctx, seed, n.attrs["key"], count, n.dtype)
    return _onnx_written(ctx, n, p, ctx.op("Add", flat, ctx.op("Mul", z, ctx.scalar(n.attrs["scale"], n.dtype))), index)


def _zo_update_onnx(ctx, n, xs):
    a, dtype = n.attrs, n.inputs[0].dtype
    p, lr, grads = xs[:3]
    seeds, index = xs[3:3 + a["directions"]], xs[3 + a["directions"]:]
    w, count = _onnx_trained(ctx, n, p, index)
    f64 = lambda v: ctx.scalar(v, torch.float64)  # noqa: E731
    if a["weight_decay"]:
        w = ctx.op("Mul", w, ctx.cast(ctx.op("Sub", f64(1.0), ctx.op("Mul", lr, f64(a["weight_decay"]))), dtype))
    for d, seed in enumerate(seeds):
        g = ctx.cast(ctx.op("Gather", grads, ctx.const(torch.tensor(d, dtype=torch.int64)), axis=0), torch.float64)
        coefficient = ctx.cast(ctx.op("Div", ctx.op("Mul", ctx.op("Neg", lr), g), f64(float(a["directions"]))), dtype)
        w = ctx.op("Add", w, ctx.op("Mul", _onnx_direction(ctx, seed, a["key"], count, dtype), coefficient))
    return _onnx_written(ctx, n, p, w, index)


def _zo_grads_onnx(ctx, n, xs):
    pairs = [ctx.op("Div", ctx.op("Sub", xs[i], xs[i + 1]), ctx.scalar(2 * n.attrs["eps"], n.dtype))
             for i in range(0, len(xs), 2)]
    return ctx.op("Concat", *[ctx.op("Reshape", g, ctx.ints([1])) for g in pairs], axis=0)


def _zo_loss_onnx(ctx, n, xs):
    stacked = ctx.op("Concat", *[ctx.op("Reshape", x, ctx.ints([1])) for x in xs], axis=0)
    return ctx.reduce("ReduceMean", stacked, [0], keepdims=False)


# A view that computes (its input moved in place), as the `<op>_inplace` twins are.
register("zo_perturb_inplace", _zo_perturb, shape=lambda p, *rest, **attrs: (p.shape, p.dtype), view=True,
         scratch=_scratch, onnx=_zo_perturb_onnx)
register("zo_update", _zo_update, shape=lambda *inputs, **attrs: ((), torch.bool), mutates=(0,), scratch=_scratch,
         onnx=_zo_update_onnx)
register("zo_grads", _zo_grads, shape=lambda *losses, eps: ((len(losses) // 2,), losses[0].dtype),
         onnx=_zo_grads_onnx)
register("zo_loss", lambda *losses: torch.stack(list(losses)).mean(),
         shape=lambda *losses: ((), losses[0].dtype), onnx=_zo_loss_onnx)


# -- the step's graph ----------------------------------------------------------------------

@dataclass
class Trained:
    """One tensor the step moves: its input node, part (ChannelSlice or None) and hash key."""

    node: Node
    part: object
    key: int


def zo_graph(forward: Graph, trained: list[Trained], optimizer: MeZO, buffers: dict[str, Node],
             guard_mode: str) -> Graph:
    """The step: per direction two copies of `forward` (loss and buffer writes as outputs),
    each reading the trained tensors through their perturbed views; then the updates."""
    leaves = [n for n in forward.nodes if n.op in ("input", "const")]
    b = Builder(leaves)
    lr = b.input("lr", (), torch.float64, kind="hyper")
    seeds = [b.input(f"zo_seed{d}", (), torch.int64, kind="hyper") for d in range(optimizer.directions)]
    current = {t.node: t.node for t in trained}
    losses, buffer_values = [], None
    for seed in seeds:
        after = seed
        for sign in (1, -2):
            current = {t.node: _perturb(b, current[t.node], t, seed, after, sign * optimizer.eps) for t in trained}
            outputs = _copy(b, forward, current, tag=f"{len(losses)}")
            after = outputs["loss"]
            losses.append(after)
            if buffer_values is None:  # a train-mode norm's statistics: those of the first forward
                buffer_values = {k: v for k, v in outputs.items() if k.startswith("buffer:")}
        current = {t.node: _perturb(b, current[t.node], t, seed, after, optimizer.eps) for t in trained}  # restored
    grads = b.emit("zo_grads", *losses, eps=optimizer.eps)
    loss = b.emit("zo_loss", *losses)
    condition, attrs = _guard(b, guard_mode, losses)
    for t in trained:
        b.meta = {"module": t.node.attrs["target"].rpartition(".")[0], "update_of": t.node.attrs["target"]}
        b.emit("zo_update", current[t.node], lr, grads, *seeds, *_index(t), *condition, key=t.key,
               part=(t.part.axis, t.part.k) if t.part else None, weight_decay=optimizer.weight_decay,
               directions=optimizer.directions, **attrs)
    b.meta = {}
    for key, value in (buffer_values or {}).items():
        b.emit("assign", buffers[key.removeprefix("buffer:")], value, *condition, **attrs)
    return Graph(b.nodes, {"loss": loss, "zo_grads": grads})


def _perturb(b: Builder, value: Node, t: Trained, seed: Node, after: Node, scale: float) -> Node:
    b.meta = {"module": t.node.attrs["target"].rpartition(".")[0]}
    return b.emit("zo_perturb_inplace", value, seed, after, *_index(t), scale=scale, key=t.key,
                  part=(t.part.axis, t.part.k) if t.part else None)


def _index(t: Trained) -> list[Node]:
    return [t.part.index] if t.part is not None and not t.part.first else []


def _guard(b: Builder, mode: str, losses: list[Node]) -> tuple[list[Node], dict]:
    """The updates run where every loss is finite ("skip", "raise"); the restores always do."""
    if mode == "apply":
        return [], {}
    checks = [b.emit("is_finite", loss) for loss in losses]
    return [b.emit("all_of", *checks) if len(checks) > 1 else checks[0]], {"guarded": mode}


def _copy(b: Builder, forward: Graph, substitute: dict[Node, Node], tag: str) -> dict[str, Node]:
    """The forward's computation appended again, reading `substitute[x]` for each x in it."""
    mapping = dict(substitute)
    for n in forward.nodes:
        if n.op in ("input", "const"):
            continue
        b.meta = n.meta
        mapping[n] = b.redo(n, tuple(mapping.get(i, i) for i in n.inputs), f"{n.name}_{tag}")
    b.meta = {}
    return {k: mapping.get(v, v) for k, v in forward.outputs.items()}

