"""Recompute whole transformer blocks in the backward, only where a memory budget needs it.

A backward that crosses a block keeps what the block's gradients read: the inputs of its norms,
its attention's q, k, v and output, the FFN's hidden map (MiniLM at batch 32 x 32 tokens: about
16 MB a block, against 1.5 MB for the block's input). Activation checkpointing keeps none of
that: right before the block's backward begins, its forward runs again from the values it read
from outside (the block's input, its parameters, the attention mask), and what the backward
reads comes from that second run. Each block so recomputed costs one more forward of it, so a
step gets it only under `memory_budget` (edgetune.compile), for the fewest blocks that bring the
predicted peak within it, the first blocks first: their kept values live longest (from early in
the forward to the end of the backward), and the last block's backward starts right after its
forward, when redoing it would save nothing. Same kernels on the same inputs: the numbers do
not change.

The cheap recompute (passes/recompute.py) runs always, as it costs a few elementwise passes;
this one is its expensive sibling and reuses its rewrite.
"""
from __future__ import annotations

from functools import cache

from edgetune.compiler.ir.graph import Graph, Node
from edgetune.compiler.memory import plan, saved_for_backward, storage_of
from edgetune.compiler.passes.recompute import with_recompute
from edgetune.compiler.passes.rewrite import is_backward
from edgetune.compiler.scheme import block_of


def recompute_blocks_to_fit(graph: Graph, budget: int) -> Graph:
    """`graph` with its first k blocks recomputed in the backward, the smallest k whose predicted
    peak is within `budget` (every block if none is: the compile's budget check then says by
    how much). Unchanged where the peak already fits or nothing recomputes."""
    if plan(graph).peak_bytes <= budget:
        return graph
    blocks = safe_blocks(graph, block_chains(graph))
    if not blocks:
        return graph
    names = list(blocks)

    @cache  # the bisection's last answer is the graph returned
    def first(k: int) -> Graph:
        return recomputed(graph, {name: blocks[name] for name in names[:k]})

    lo, hi = 1, len(names)  # the peak falls (near enough) as blocks are added: bisect for the fewest
    while lo < hi:
        mid = (lo + hi) // 2
        if plan(first(mid)).peak_bytes <= budget:
            hi = mid
        else:
            lo = mid + 1
    return first(lo)


def recomputed(graph: Graph, blocks: dict[str, dict[Node, list[Node]]]) -> Graph:
    """`graph` with `blocks` (block_chains' entries) recomputed; each copy's meta names its
    block (`recomputed_block`)."""
    chains = {v: c for block in blocks.values() for v, c in block.items()}
    mark = {m: {"recomputed_block": name} for name, block in blocks.items() for c in block.values() for m in c}
    return with_recompute(graph, chains, mark)


def block_chains(graph: Graph) -> dict[str, dict[Node, list[Node]]]:
    """{block: {value the backward reads: the block's forward nodes that recompute it, inputs
    first}}, blocks in forward order. Chains stop at values from outside the block (its input,
    parameters, constants), which the recompute then reads: those are kept instead."""
    saved = saved_for_backward(graph.nodes)
    # A value's block, from the module it was computed in (the scheme presets' block names).
    block = {n: b for n in graph.nodes
             if not is_backward(n) and n.op not in ("input", "const") and (b := block_of(n.meta.get("module", "")))}
    members: dict[str, set[Node]] = {}
    for n, b in block.items():
        members.setdefault(b, set()).add(n)
    read: dict[str, dict[Node, None]] = {}
    for n in graph.nodes:
        if is_backward(n):
            for i in n.inputs:
                if i in block and storage_of(i) in saved:
                    read.setdefault(block[i], {})[i] = None
    position = {n: k for k, n in enumerate(graph.nodes)}
    chains = {}
    for name in sorted(read, key=lambda b: min(position[v] for v in read[b])):
        chains[name] = {v: _chain(v, members[name], position) for v in read[name]}
    return chains


def _chain(v: Node, members: set[Node], position: dict[Node, int]) -> list[Node]:
    """`v` and the block members it depends on, in graph order."""
    found, todo = set(), [v]
    while todo:
        n = todo.pop()
        if n in found:
            continue
        found.add(n)
        todo += [i for i in n.inputs if i in members]
    return sorted(found, key=position.__getitem__)


def safe_blocks(graph: Graph, blocks: dict[str, dict[Node, list[Node]]]) -> dict[str, dict[Node, list[Node]]]:
    """The blocks whose recompute reads no parameter after its in-place update (which the
    update-early pass may have moved before it): a recompute must see the forward's weights.
    Read off the graph with every block recomputed."""
    updated: set[Node] = set()
    stale: set[str] = set()
    for n in recomputed(graph, blocks).nodes:
        if "update_of" in n.meta and n.inputs:
            updated.add(n.inputs[0])
        elif "recomputed_block" in n.meta and any(i in updated for i in n.inputs):
            stale.add(n.meta["recomputed_block"])
    return {name: chains for name, chains in blocks.items() if name not in stale}
