"""LoRA as a scheme rule: `{"lora": r, "alpha": a}` on a linear layer's weight.

The weight stays frozen (bitwise unchanged). The trainer owns two adapters per layer, PEFT's
A [r, in] (kaiming-uniform, a=sqrt(5)) and B [out, r] (zeros), and the layer computes
`linear(x, W, b) + alpha/r * linear(linear(x, A), B)` -- PEFT's forward, op for op. The
rewrite happens in the IR between export and autodiff, so the compiled step differentiates
only the adapters and the frozen base linear keeps no input for a weight gradient.

    trainer = et.compile(model, loss, ..., scheme=et.schemes.lora(8))

Adapters are named as PEFT names them, without its prefix: `<layer>.lora_A.weight`. Saving
them in PEFT's format, or folding them into the weights: edgetune.apps.peft.
"""
from __future__ import annotations

import math
import zlib

import torch

from edgetune.compiler.ir.builder import Builder
from edgetune.compiler.ir.graph import Graph, Node
from edgetune.compiler.ir.ops.core import scalar
from edgetune.compiler.passes.rewrite import keep, rewrite
from edgetune.compiler.scheme import Rule, SchemeError

_A, _B = ".lora_A.weight", ".lora_B.weight"


def lora_rules(rules: dict[str, Rule]) -> dict[str, Rule]:
    """{base weight name: rule} of the LoRA rules among resolved rules."""
    return {name: rule for name, rule in rules.items() if rule.lora}


def layer_of(name: str) -> str:
    """The layer a base weight or an adapter belongs to: 'm.q_proj' for 'm.q_proj.weight'
    and for 'm.q_proj.lora_A.weight'."""
    for suffix in (_A, _B, ".weight"):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name.rpartition(".")[0]


def adapter_names(weight: str) -> tuple[str, str]:
    layer = layer_of(weight)
    return layer + _A, layer + _B


# -- the adapters' values ----------------------------------------------------------------------

def init_adapters(model: torch.nn.Module, rules: dict[str, Rule]) -> dict[str, torch.Tensor]:
    """{adapter name: tensor}, initialised as PEFT does, on the weight's device and dtype.
    A's seed comes from the layer name: the same model and scheme always start the same."""
    params = dict(model.named_parameters())
    adapters = {}
    for name, rule in lora_rules(rules).items():
        w = params[name]
        a_name, b_name = adapter_names(name)
        generator = torch.Generator().manual_seed(zlib.crc32(layer_of(name).encode()))
        a = torch.empty(rule.lora, w.shape[1], dtype=w.dtype)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        adapters[a_name] = a.to(w.device)
        adapters[b_name] = torch.zeros(w.shape[0], rule.lora, dtype=w.dtype, device=w.device)
    return adapters


# -- the IR rewrite ----------------------------------------------------------------------------

def attach(graph: Graph, params: dict[str, Node], rules: dict[str, Rule]) -> tuple[Graph, dict[str, Node]]:
    """The forward graph with every linear of a LoRA weight also running its adapters, and
    {adapter name: its input node} (kind "adapter", bound by the trainer like optimizer state)."""
    targets = {params[name]: (name, rule) for name, rule in lora_rules(rules).items() if name in params}
    if not targets:
        return graph, {}
    users = graph.users()
    for w, (name, _) in targets.items():
        _check_linear_weight(name, w, users[w])
    inputs: dict[str, Node] = {}

    def visit(b: Builder, n: Node, new_inputs: tuple[Node, ...]) -> Node | None:
        if n.op != "linear" or n.inputs[1] not in targets:
            return None
        name, rule = targets[n.inputs[1]]
        a, bw = _adapter_inputs(b, inputs, name, rule, n.inputs[1])
        base = keep(b, n, new_inputs)
        up = b.emit("linear", b.emit("linear", new_inputs[0], a), bw)  # PEFT: lora_B(lora_A(x)) * scaling
        return b.emit("add", base, b.emit("mul", up, scalar(b, rule.scale, like=up)))

    return rewrite(graph, visit), inputs


def _check_linear_weight(name: str, w: Node, users: list[Node]) -> None:
    for u in users:
        if u.op != "linear" or u.inputs[1] is not w or u.inputs[0] is w or u.inputs[2:] == (w,):
            raise SchemeError(f"a LoRA rule needs the weight of a linear layer, but {name!r} is used by op "
                              f"'{u.op}' (module '{u.meta.get('module', '?')}'); give it 'full', a ratio or "
                              "'frozen' instead")


def _adapter_inputs(b: Builder, inputs: dict[str, Node], name: str, rule: Rule, w: Node) -> tuple[Node, Node]:
    """A and B of the weight `name`, made at its first use (a shared weight has one pair)."""
    out_features, in_features = w.shape
    shapes = ((rule.lora, in_features), (out_features, rule.lora))
    for key, shape in zip(adapter_names(name), shapes):
        if key not in inputs:
            inputs[key] = b.input(key.replace(".", "_"), shape, w.dtype, kind="adapter", target=key)
    return tuple(inputs[key] for key in adapter_names(name))
