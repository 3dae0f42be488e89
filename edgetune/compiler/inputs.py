"""The step's inputs: one table that says what every input of a training graph is.

Every `input` node has a kind (`attrs["kind"]`) that says where its value comes from and
whether it changes from step to step. Held inputs are tensors that live across steps (the
model's parameters and buffers, the Trainer's optimizer state, LoRA adapters and int8
weights); they are bound once and updated in place. Per-step inputs (the batch and the
hyperparameters) come with each call. The Trainer binds both through `Bindings`; a backend
or an exporter reads the same table (`step_inputs`) to name, order and feed them.

A new kind of step input (say, a mask for a pruned weight) is one entry in KINDS, one
`held` map in the Trainer and the pass that creates its input nodes: nothing else branches
on kinds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from edgetune.compiler.ir.graph import Graph, Node


@dataclass(frozen=True)
class Kind:
    name: str
    per_step: bool  # given with every step (else held across steps and bound once)
    meaning: str


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("param", False, "a model parameter, updated in place where the scheme trains it"),
    Kind("buffer", False, "a model buffer (BatchNorm running statistics), written in place in train mode"),
    Kind("state", False, "the optimizer state of one trained tensor, held by the Trainer"),
    Kind("adapter", False, "a LoRA adapter, held by the Trainer and trained like a parameter"),
    Kind("int8", False, "a frozen linear weight held as int8 values, by the Trainer"),
    Kind("int8_scale", False, "the per-row scales of an int8 weight, held by the Trainer"),
    Kind("hyper", True, "a hyperparameter given with every step: the learning rate, the step count"),
    Kind("input", True, "a model input of the batch"),
    Kind("target", True, "a target of the batch (what the loss compares with)"),
)}


@dataclass(frozen=True)
class StepInput:
    """One input of the compiled step, in the order the step takes them."""

    name: str  # the graph's name for it (the generated function's argument)
    kind: str
    key: str | int  # the tensor's name among its kind (a batch tensor: its position in inputs + targets)
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def per_step(self) -> bool:
        return KINDS[self.kind].per_step


def step_inputs(graph: Graph) -> list[StepInput]:
    """Every input of `graph` with its kind and key, in the graph's order."""
    return [_step_input(n) for n in graph.inputs]


def _step_input(n: Node) -> StepInput:
    kind = n.attrs.get("kind")
    if kind not in KINDS:
        raise ValueError(f"graph input {n.name!r} has kind {kind!r}; known kinds: {', '.join(KINDS)}")
    key = n.attrs["index"] if kind in ("input", "target") else n.name if kind == "hyper" else n.attrs["target"]
    return StepInput(n.name, kind, key, tuple(n.shape), n.dtype)


class Bindings:
    """The step's arguments: held inputs looked up once in `held[kind][key]` (the same tensor
    objects at every step, as torch.optim keeps its parameters), per-step ones from each call."""

    def __init__(self, inputs: list[StepInput], held: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        self.inputs = inputs
        self._held = [None if i.per_step else _lookup(held, i) for i in inputs]

    def arguments(self, per_step: Mapping[str, Any]) -> list[Any]:
        """`per_step[kind][key]` for the per-step inputs: {"hyper": {"lr": ..., "step": ...},
        "input": batch, "target": batch}, where batch lists the inputs, then the targets."""
        return [per_step[i.kind][i.key] if i.per_step else held for i, held in zip(self.inputs, self._held)]


def _lookup(held: Mapping[str, Mapping[str, torch.Tensor]], i: StepInput) -> torch.Tensor:
    try:
        return held[i.kind][i.key]
    except KeyError:
        raise KeyError(f"nothing holds the {i.kind} {i.key!r} that the step takes ({KINDS[i.kind].meaning})") from None
