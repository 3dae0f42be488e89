"""The pass pipeline: a flat list of named Graph -> Graph passes, each with why it runs.

`EDGETUNE_DEBUG=1` prints one line per pass with its effect on the graph; `=2` also dumps
the graph after each pass. With `EDGETUNE_CHECK=1` the verifier runs after every pass.
"""
from __future__ import annotations

import os
from typing import Callable

from edgetune.ir.graph import Graph, checks_enabled, verify
from edgetune.passes.dce import dce

Pass = Callable[[Graph], Graph]

PIPELINE: list[tuple[str, Pass, str]] = [
    ("dce", dce, "drop values that neither the loss nor an update needs (the pruned backward's leftovers)"),
]


def run_pipeline(graph: Graph, pipeline: list[tuple[str, Pass, str]] = PIPELINE) -> Graph:
    from edgetune.memory import plan

    level = int(os.environ.get("EDGETUNE_DEBUG", "0") or 0)
    for name, fn, _why in pipeline:
        before = plan(graph) if level else None
        graph = fn(graph)
        if checks_enabled():
            verify(graph, where=name)
        if level:
            after = plan(graph)
            print(f"[edgetune] {name:<12} nodes {len(before.order)} -> {len(after.order)}, "
                  f"predicted peak {_mb(before.peak_bytes)} -> {_mb(after.peak_bytes)}")
        if level >= 2:
            print(graph)
    return graph


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"
