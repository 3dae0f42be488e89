"""A graph copy with local rewrites, the one tool the passes share.

`rewrite(graph, visit)` walks the nodes in order with their inputs already remapped;
`visit(b, node, inputs)` may emit nodes through `b` and return the node that stands for
`node` from then on, or None to keep it (copied only if its inputs changed); `keep` does
the same from inside `visit`, to emit nodes right after the original.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterable

from edgetune.compiler.ir.builder import Builder
from edgetune.compiler.ir.graph import Graph, Node

Visit = Callable[[Builder, Node, tuple[Node, ...]], "Node | None"]
# Activation gradients of the form g * (0 or 1, a function of the saved output): the bitmask
# pass turns their read of the output into bits, which the slices pass counts on.
MASK_GRADS = ("relu_grad", "hardtanh_grad")


def rewrite(graph: Graph, visit: Visit) -> Graph:
    b = Builder()
    b._names.update(n.name for n in graph.nodes)  # new nodes get names no original has
    mapping: dict[Node, Node] = {}
    for n in graph.nodes:
        inputs = tuple(mapping[i] for i in n.inputs)
        b.meta = dict(n.meta)
        new = visit(b, n, inputs)
        mapping[n] = keep(b, n, inputs) if new is None else new
    b.meta = {}
    return Graph(b.nodes, {k: mapping[v] for k, v in graph.outputs.items()})


def keep(b: Builder, n: Node, inputs: tuple[Node, ...]) -> Node:
    """Append `n` unchanged (or a copy on the remapped inputs) and return it."""
    new = n if inputs == n.inputs else replace(n, inputs=inputs)
    b.nodes.append(new)
    return new


def is_backward(n: Node) -> bool:
    return "grad_of" in n.meta


# A rewrite that saves memory but costs time (a mask, a recompute) is left out where the
# peak stays within this fraction of the lowest: a few kilobytes are not worth a kernel.
PEAK_SLACK = 0.02


def fewest_for_lowest_peak(graph: Graph, candidates: Iterable[Node], build: Callable[[set[Node]], Graph],
                           copy_of: Callable[[Node], str | None] = lambda n: None) -> set[Node]:
    """The candidates that `build` should apply: none if applying all does not lower the
    peak of `graph`; else all, dropping one at a time, those whose absence raises the peak
    least first, while the peak stays within PEAK_SLACK of the lowest. That takes two plans a
    candidate; past GLANCE_ABOVE (a language model's graph), those to drop are read off the
    plans with and without the rewrite instead (`_left_out_at_a_glance`, a plan to check each
    guess). `copy_of(node)`: the name of the candidate a node of the rewritten graph copies
    (a recompute's copy), or None."""
    from edgetune.compiler.memory import plan

    chosen = set(candidates)
    if not chosen:
        return chosen
    before = plan(graph)
    lowest = plan(build(chosen))
    if lowest.peak_bytes >= before.peak_bytes:
        return set()
    limit = lowest.peak_bytes * (1 + PEAK_SLACK)
    if len(chosen) * len(graph.nodes) > GLANCE_ABOVE:
        # The peak may move when a value is left out: each guess is checked, the boldest first.
        for left_out in _left_out_at_a_glance(before, lowest, chosen, limit - lowest.peak_bytes, copy_of):
            if plan(build(chosen - left_out)).peak_bytes <= limit:
                return chosen - left_out
    without = {n: plan(build(chosen - {n})).peak_bytes for n in chosen}
    for n in sorted(chosen, key=lambda n: (without[n], -n.nbytes)):
        if plan(build(chosen - {n})).peak_bytes <= limit:
            chosen.discard(n)
    return chosen


# Candidates x graph nodes above which the one-at-a-time search is first tried at a glance:
# SmolLM2 under LoRA (q,v) has 60 recompute candidates in 6,487 nodes, and their 122 plans took
# 3.3 s of a 12 s compile (a glance: 0.1 s). Vision models stay below (MobileNetV2: 51 in 1,284,
# 0.4 s), where the one-at-a-time search sometimes finds a peak below the lowest (ResNet).
GLANCE_ABOVE = 80_000


def _left_out_at_a_glance(before, lowest, chosen: set[Node], slack: float, copy_of) -> list[set[Node]]:
    """Sets of candidates to leave out, read off the plans without and with the rewrite,
    boldest first. A candidate left out keeps its value from its definition to its last
    reader in `before`; at the rewritten graph's peak that value would be
    - not alive: leaving it out cannot raise the peak there (every set leaves these out);
    - alive, where its copy is alive already: it takes the copy's place there, but lives
      longer (the first two sets);
    - alive, adding its bytes: the smallest of these, as many as the slack holds (the first set).
    Elsewhere the peak may move, which the caller checks. No sets where values of the rewrite
    that copy no candidate (a packed mask) are alive at the peak: what leaving one out does
    there is not read off so simply."""
    from edgetune.compiler.memory import allocates

    position = {n.name: pos for pos, n in enumerate(before.order)}
    peak = max(range(len(lowest.live_bytes)), key=lowest.live_bytes.__getitem__)
    new_at_peak = [n for pos, n in enumerate(lowest.order[:peak + 1])
                   if n.name not in position and allocates(n) and lowest.last_use.get(n, pos) >= peak]
    copied_names = {copy_of(n) for n in new_at_peak}
    if None in copied_names:
        return []
    # The peak's place among the original nodes: the last of them at or before it.
    at = next((position[n.name] for n in reversed(lowest.order[:peak + 1]) if n.name in position), -1)
    copied = {n for n in chosen if n.name in copied_names}
    alive = {n for n in chosen - copied if position[n.name] <= at < before.last_use.get(n, -1)}
    not_alive = chosen - copied - alive
    within_slack = set()
    for n in sorted(alive, key=lambda n: (n.nbytes, n.name)):
        if n.nbytes > slack:
            break
        slack -= n.nbytes
        within_slack.add(n)
    tries = [not_alive | copied | within_slack, not_alive | copied, not_alive]
    return [t for k, t in enumerate(tries) if t not in tries[:k]]
