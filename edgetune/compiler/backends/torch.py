"""Torch backend: the scheduled graph as straight-line Python calling torch kernels.

Each node is one line; each value is deleted right after its last use, so peak memory
follows the memory plan. Constants are moved to the step's device once, at compile time;
small values computed from held tensors that no step writes are computed once and kept
(backends/invariants.py). A kernel whose op binds one per node (OpDef.bind: a convolution on the
CPU) is called with the node's inputs alone, its choices made here once; a view is written as
the tensor method itself (OpDef.inline).
The generated source is readable (`EDGETUNE_DEBUG=2` prints it, `CompiledStep.source`).

A guarded effect (an update whose `attrs["guarded"]` is "skip" or "raise") takes a bool
condition as its last input: with "skip" it runs only where the condition holds and the step
counts the skipped ones (output "skipped"); with "raise" a false condition raises
NonFiniteError before the effect runs.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from edgetune.compiler.backends.grouped import UpdateGroup, group_updates, run_group
from edgetune.compiler.backends.invariants import MIN_BUDGET, Hoisted, Invariants, hoist
from edgetune.compiler.ir.graph import Graph, Node
from edgetune.compiler.ir.ops import OPS, is_effect
from edgetune.compiler.memory import MemoryPlan, plan
from edgetune import procmem

# Values every step computes the same (a frozen BN's scale) are computed once, before the
# step, and again only when what they read changes (backends/invariants.py).
HOIST_INVARIANTS = True
# The updates of small tensors (biases, norms) run together, as multi-tensor ops (backends/grouped.py).
GROUP_UPDATES = True
# Kernels with choices of their own (a 1x1 conv as a matrix product, the layout) make them
# once, at compile time, for each node (OpDef.bind).
BIND_KERNELS = True


class NonFiniteError(FloatingPointError):
    """The loss or a gradient of a step is not finite, and the step was compiled to raise."""


# A step frees and allocates the same large buffers each time. Where glibc gives them back to
# the OS between steps, they return as fresh pages, one page fault at each first touch, about
# 2 us each on this project's 2-core VM: MobileNetV2 bias-only at batch 8 took 8-9 thousand a
# step (PyTorch eager 11-13 thousand), TTE at batch 1 about 800, 7% of its step. Keeping the
# memory costs no time, only resident memory between steps, so the first steps are watched
# and where they fault more than this a step, glibc is told to keep freed memory for reuse
# (procmem.keep_freed_memory).
FAULTS_FOR_KEEPING = 200
WATCHED_STEPS = 2  # after the first, which faults in what any first step touches


class FaultWatch:
    """Counts minor page faults over the steps after the first, then decides, once."""

    def __init__(self) -> None:
        self.steps, self.start = 0, None
        self.faults_per_step: float | None = None  # None until decided
        self.kept_freed = False

    @property
    def deciding(self) -> bool:
        return self.faults_per_step is None

    def before_step(self) -> None:
        if self.steps == 1 and self.start is None:
            self.start = procmem.minor_faults()

    def after_step(self) -> None:
        self.steps += 1
        if self.steps == 1 + WATCHED_STEPS:
            self.faults_per_step = (procmem.minor_faults() - self.start) / WATCHED_STEPS
            self.kept_freed = self.faults_per_step > FAULTS_FOR_KEEPING and procmem.keep_freed_memory()


class CompiledStep:
    """`keep_bytes`: memory the values hoisted out of the step may hold between steps, and the
    gradients of a group of small updates until it runs."""

    def __init__(self, graph: Graph, device: torch.device, keep_bytes: int = MIN_BUDGET,
                 memory: MemoryPlan | None = None) -> None:
        self.inputs = graph.inputs
        self.watch = FaultWatch() if device.type == "cpu" and procmem.minor_faults() is not None else None
        hoisted = hoist(graph, keep_bytes) if HOIST_INVARIANTS else Hoisted()
        bound = bind_kernels(graph, device) if BIND_KERNELS else {}
        self.source = generate(graph, hoisted, keep_bytes if GROUP_UPDATES else 0, set(bound), memory)
        namespace: dict[str, Any] = {"torch": torch, "device": torch.device, "NonFiniteError": NonFiniteError}
        namespace.update({f"_op_{name}": op.kernel for name, op in OPS.items()})
        namespace["_op_update_group"] = run_group
        namespace.update({_bound_name(n): kernel for n, kernel in bound.items()})
        # The name in the step's namespace of each kernel it calls -> its op (for bench.profile,
        # and for tests that put a fault into one op's calls).
        self.kernel_ops = {f"_op_{name}": name for name in OPS} | {"_op_update_group": "update_group"} \
            | {_bound_name(n): n.op for n in bound}
        namespace.update({n.name: n.attrs["value"].to(device) for n in graph.nodes if n.op == "const"})
        exec(compile(self.source, "<edgetune step>", "exec"), namespace)
        self.fn = namespace["_edgetune_step"]
        if hoisted:
            namespace["_edgetune_invariants"] = self.invariants = Invariants(namespace["_edgetune_prologue"])
        if int(os.environ.get("EDGETUNE_DEBUG", "0") or 0) >= 2:
            print(self.source)

    def __call__(self, *args: Any) -> Any:
        watching = self.watch is not None and self.watch.deciding
        if watching:
            self.watch.before_step()
        with torch.no_grad():
            out = self.fn(*args)
        if watching:
            self.watch.after_step()
        return out


def generate(graph: Graph, hoisted: Hoisted | None = None, group_bytes: int = 0, bound: set[Node] = frozenset(),
             memory: MemoryPlan | None = None) -> str:
    """The step's source: `_edgetune_step` and, where values are hoisted out of it
    (backends/invariants.py), `_edgetune_prologue`, which computes them. With `group_bytes`,
    the small updates run in groups whose gradients hold at most that (backends/grouped.py).
    The nodes in `bound` call their own kernel (`bind_kernels`) with their inputs alone."""
    hoisted = hoisted or Hoisted()
    params = ", ".join(n.name for n in graph.inputs)
    lines = [f"def _edgetune_step({params}):", "    _skipped = 0"]
    if hoisted:
        kept, reads = _names(hoisted.kept), _names(hoisted.reads)
        lines.append(f"    {kept}, = _edgetune_invariants({reads})")
    step = [n for n in graph.nodes if n.op not in ("input", "const") and n not in hoisted.only_once]
    if group_bytes:
        step = group_updates(step, group_bytes, room_below_peak(graph, memory))
    lines += _body(step, keep=set(graph.outputs.values()), bound=bound)
    outputs = [f"{k!r}: {v.name}" for k, v in graph.outputs.items()] + ["'skipped': _skipped"]
    lines.append(f"    return {{{', '.join(outputs)}}}")
    if hoisted:
        lines = ([f"def _edgetune_prologue({reads}):"] + _body(hoisted.prologue, keep=set(hoisted.kept), bound=bound)
                 + [f"    return ({kept},)", ""] + lines)
    return "\n".join(lines) + "\n"


def room_below_peak(graph: Graph, memory: MemoryPlan | None = None) -> dict[Node, int]:
    """Bytes each node could have live beside what the memory plan (the trainer's, where given:
    it has measured the kernels' scratch) has live while it runs, without the step passing the
    plan's peak."""
    memory = memory or plan(graph)
    peak = max(memory.live_bytes, default=0)
    return {n: peak - b for n, b in zip(memory.order, memory.live_bytes)}


def _names(nodes: list[Node]) -> str:
    return ", ".join(n.name for n in nodes)


def _body(nodes: list[Node | UpdateGroup], keep: set[Node], bound: set[Node]) -> list[str]:
    """One line per node, each value deleted right after its last use unless `keep` has it."""
    last = _last_uses(nodes, keep)
    lines = []
    for pos, n in enumerate(nodes):
        lines += ["    " + line for line in ([n.line()] if isinstance(n, UpdateGroup) else _lines(n, n in bound))]
        if last.get(pos):
            lines.append(f"    del {', '.join(m.name for m in last[pos])}")
    return lines


def _lines(n: Node, bound: bool = False) -> list[str]:
    guard = n.attrs.get("guarded")
    inputs, attrs = (n.inputs[:-1], {k: v for k, v in n.attrs.items() if k != "guarded"}) if guard else (n.inputs, n.attrs)
    inline = OPS[n.op].inline
    if bound:  # its attributes are in the kernel; the comment keeps them for the reader
        call = f"{_bound_name(n)}({', '.join(i.name for i in inputs)})"
        facts = [n.op] + [f"{k}={_literal(v)}" for k, v in attrs.items()]
        where = f"  # {n.meta.get('module') or ''} {' '.join(facts)}".rstrip()
    elif inline is not None and not guard:
        call = inline(n, [i.name for i in inputs])
        where = f"  # {n.meta.get('module') or ''} {n.op}".rstrip()
    else:
        args = [i.name for i in inputs] + [f"{k}={_literal(v)}" for k, v in attrs.items()]
        call = f"_op_{n.op}({', '.join(args)})"
        where = f"  # {n.meta['module']}" if n.meta.get("module") else ""
    line = (call if is_effect(n) else f"{n.name} = {call}") + where
    if guard == "skip":
        return [f"if {n.inputs[-1].name}:", f"    {line}", "else:", "    _skipped += 1"]
    if guard == "raise":
        return [f"if not {n.inputs[-1].name}:", "    raise NonFiniteError('the loss or a gradient is not finite')", line]
    return [line]


def bind_kernels(graph: Graph, device: torch.device) -> dict[Node, Any]:
    """Node -> its own kernel, where its op binds one (OpDef.bind) and the node is not guarded."""
    bound = {}
    for n in graph.nodes:
        bind = getattr(OPS.get(n.op), "bind", None)
        kernel = bind(n, device) if bind is not None and "guarded" not in n.attrs else None
        if kernel is not None:
            bound[n] = kernel
    return bound


def _bound_name(n: Node) -> str:
    return f"_bound_{n.name}"


def _literal(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        raise TypeError("tensor attributes must be const nodes")
    return repr(v)


def _last_uses(nodes: list[Node | UpdateGroup], keep: set[Node]) -> dict[int, list[Node]]:
    """Position in `nodes` -> the values whose last reader (or definition, if unread) is there:
    the values `nodes` define or read, but graph inputs, constants, effects and `keep`."""
    last: dict[Node, int] = {}
    for pos, n in enumerate(nodes):
        for v in (*n.inputs, *([] if isinstance(n, UpdateGroup) else [n])):
            last[v] = pos
    by_pos: dict[int, list[Node]] = {}
    for v, pos in last.items():
        if v.op not in ("input", "const") and not is_effect(v) and v not in keep:
            by_pos.setdefault(pos, []).append(v)
    return by_pos
