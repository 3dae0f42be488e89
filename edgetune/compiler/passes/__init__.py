"""The pass pipeline: a flat list of named Graph -> Graph passes, each with why it runs.

FORWARD_PIPELINE rewrites the forward graph before autodiff, knowing what trains (its passes
take the trained parameter inputs too); PIPELINE optimizes the whole training graph after.

`EDGETUNE_DEBUG=1` prints one line per pass with its effect on the graph; `=2` also dumps
the graph after each pass. With `EDGETUNE_CHECK=1` the verifier runs after every pass.
"""
from __future__ import annotations

import os
from functools import partial
from typing import Callable

from edgetune.compiler.ir.graph import Graph
from edgetune.compiler.ir.verify import checks_enabled, verify
from edgetune.compiler.passes.blocks import recompute_blocks_to_fit
from edgetune.compiler.passes.dce import dce
from edgetune.compiler.passes.fold_bn import fold_frozen_batchnorm
from edgetune.compiler.passes.inplace import inplace_elementwise
from edgetune.compiler.passes.ln_stats import keep_ln_stats
from edgetune.compiler.passes.masks import bitmask_activations
from edgetune.compiler.passes.recompute import recompute_cheap
from edgetune.compiler.passes.reorder import update_early
from edgetune.compiler.passes.rnn_workspace import keep_rnn_workspace
from edgetune.compiler.passes.slices import save_channel_slices
from edgetune.compiler.passes.views import fold_views

Pass = Callable[[Graph], Graph]

FORWARD_PIPELINE: list[tuple[str, Callable, str]] = [
    ("fold_bn", fold_frozen_batchnorm, "an eval-mode BN after a frozen conv becomes part of its weight and bias"),
]
PIPELINE: list[tuple[str, Pass, str]] = [
    ("dce", dce, "drop values that neither the loss nor an update needs (the pruned backward's leftovers)"),
    ("rnn_workspace", keep_rnn_workspace, "an LSTM/GRU layer keeps what its backward reads, which need not run it again"),
    ("ln_stats", keep_ln_stats, "a layer norm's backward takes its row statistics from the forward's kernel"),
    ("slices", save_channel_slices, "a partially trained weight's gradient keeps only its k input channels"),
    ("recompute", recompute_cheap, "redo a BN/activation from the kept conv output in backward instead of keeping both"),
    ("bitmask", bitmask_activations, "a ReLU/ReLU6 backward keeps 1 bit per element instead of its float output"),
    ("reorder", update_early, "apply each update in place as soon as its gradient exists, so gradients die at once"),
    ("views", fold_views, "a chain of reshapes (of permutes) is one view; a permute that undoes one is none"),
    ("inplace", inplace_elementwise, "an elementwise op writes over an input that dies with it: one buffer, not two"),
]


def with_blocks_recomputed_to_fit(pipeline: list, budget: int) -> list:
    """`pipeline` with the block recompute (passes/blocks.py) under `budget` before its in-place
    pass (which must see the recompute's reads of the blocks' inputs), or last."""
    entry = ("blocks", partial(recompute_blocks_to_fit, budget=budget),
             "recompute the first transformer blocks in the backward, as few as bring the peak within the budget")
    names = [name for name, _, _ in pipeline]
    at = names.index("inplace") if "inplace" in names else len(pipeline)
    return pipeline[:at] + [entry] + pipeline[at:]


def split_passes(passes: list | None) -> tuple[list, list]:
    """(before autodiff, after autodiff) of a list drawn from both pipelines; None: both whole."""
    if passes is None:
        return FORWARD_PIPELINE, PIPELINE
    forward = {name for name, _, _ in FORWARD_PIPELINE}
    return [p for p in passes if p[0] in forward], [p for p in passes if p[0] not in forward]


def run_forward_pipeline(graph: Graph, trained: set, pipeline: list) -> Graph:
    return run_pipeline(graph, [(name, partial(fn, trained=trained), why) for name, fn, why in pipeline])


def run_pipeline(graph: Graph, pipeline: list[tuple[str, Pass, str]] = PIPELINE) -> Graph:
    level = int(os.environ.get("EDGETUNE_DEBUG", "0") or 0)
    for name, fn, _why in pipeline:
        before = _summary(graph) if level else None
        graph = fn(graph)
        if checks_enabled():
            verify(graph, where=name)
        if level:
            print(_line(name, before, _summary(graph)))
        if level >= 2:
            print(graph)
    return graph


def _summary(graph: Graph) -> dict[str, str]:
    from edgetune.compiler.memory import plan, saved_for_backward

    saved = sum(n.nbytes for n in saved_for_backward(graph.nodes))
    batch_norms = sum(n.op == "batch_norm" for n in graph.nodes)
    return {"nodes": str(len(graph.nodes)), "batch norms": str(batch_norms), "saved for backward": _mb(saved),
            "predicted peak": _mb(plan(graph).peak_bytes)}


def _line(name: str, before: dict[str, str], after: dict[str, str]) -> str:
    return f"[edgetune] {name:<8} " + ", ".join(f"{k} {before[k]} -> {after[k]}" for k in before)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"
