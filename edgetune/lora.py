"""LoRA as a scheme rule: `{"lora": r, "alpha": a}` on a linear layer's weight.

The weight stays frozen (bitwise unchanged). The trainer owns two adapters per layer, PEFT's
A [r, in] (kaiming-uniform, a=sqrt(5)) and B [out, r] (zeros), and the layer computes
`linear(x, W, b) + alpha/r * linear(linear(x, A), B)` -- PEFT's forward, op for op. The
rewrite happens in the IR between export and autodiff, so the compiled step differentiates
only the adapters and the frozen base linear keeps no input for a weight gradient.

    trainer = et.compile(model, loss, ..., scheme=et.schemes.lora(8))
    save_peft_adapter(trainer, "out/")   # loads with peft.PeftModel.from_pretrained(base, "out/")
    model.load_state_dict(merged_state(trainer), strict=False)   # or fold the adapters in

Adapters are named as PEFT names them, without its prefix: `<layer>.lora_A.weight`.
"""
from __future__ import annotations

import json
import math
import os
import zlib
from typing import TYPE_CHECKING, Any

import torch

from edgetune.ir.builder import Builder
from edgetune.ir.graph import Graph, Node
from edgetune.ir.ops.core import scalar
from edgetune.passes.rewrite import keep, rewrite
from edgetune.scheme import Rule, SchemeError

if TYPE_CHECKING:
    from edgetune.trainer import Trainer

PEFT_PREFIX = "base_model.model."  # what PeftModel prepends to the base model's module paths
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


# -- export ------------------------------------------------------------------------------------

def peft_state(trainer: "Trainer") -> dict[str, torch.Tensor]:
    """The adapters under the keys PEFT's save_pretrained writes (contiguous CPU copies)."""
    return {PEFT_PREFIX + name: t.detach().cpu().contiguous().clone() for name, t in trainer.adapters.items()}


def merged_state(trainer: "Trainer") -> dict[str, torch.Tensor]:
    """{base weight name: W + alpha/r * B @ A} for every LoRA weight: load it with
    `model.load_state_dict(merged_state(trainer), strict=False)` to fold the adapters in."""
    params = dict(trainer.model.named_parameters())
    merged = {}
    for name, rule in lora_rules(trainer.rules).items():
        a, b = (trainer.adapters[k] for k in adapter_names(name))
        merged[name] = params[name].detach() + (b @ a) * rule.scale
    return merged


def save_peft_adapter(trainer: "Trainer", out_dir: str, base_model_name: str | None = None,
                      task_type: str | None = "auto") -> None:
    """Write `adapter_model.safetensors` and `adapter_config.json` as PEFT does, each
    atomically (the config last, so a directory with a config has its weights)."""
    from safetensors.torch import save_file

    from edgetune.finetune import _atomic_write

    rules = lora_rules(trainer.rules)
    if not rules:
        raise ValueError("this trainer has no LoRA rule, so there is no adapter to save; "
                         "compile with a scheme such as {'*.q_proj.weight': {'lora': 8}}")
    os.makedirs(out_dir, exist_ok=True)
    state = peft_state(trainer)
    _atomic_write(os.path.join(out_dir, "adapter_model.safetensors"),
                  lambda path: save_file(state, path, metadata={"format": "pt"}))
    config = peft_config(trainer.model, rules, base_model_name, task_type)
    _atomic_write(os.path.join(out_dir, "adapter_config.json"), lambda path: _write_json(path, config))


def peft_config(model: torch.nn.Module, rules: dict[str, Rule], base_model_name: str | None = None,
                task_type: str | None = "auto") -> dict[str, Any]:
    """PEFT's LoraConfig as JSON. The commonest rank and alpha are `r` and `lora_alpha`;
    layers that differ go in rank_pattern / alpha_pattern under their full path."""
    layers = {layer_of(name): rule for name, rule in rules.items()}
    r = _commonest([rule.lora for rule in layers.values()])
    alpha = _commonest([rule.alpha for rule in layers.values()])
    return {
        "peft_type": "LORA", "task_type": _task_type(model) if task_type == "auto" else task_type,
        "base_model_name_or_path": base_model_name, "revision": None, "inference_mode": True,
        "r": r, "lora_alpha": _number(alpha), "lora_dropout": 0.0,
        "target_modules": _target_modules(model, list(layers)), "exclude_modules": None,
        "rank_pattern": {layer: rule.lora for layer, rule in layers.items() if rule.lora != r},
        "alpha_pattern": {layer: _number(rule.alpha) for layer, rule in layers.items() if rule.alpha != alpha},
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
    }


def _target_modules(model: torch.nn.Module, layers: list[str]) -> list[str]:
    """Short names ('q_proj') when they select exactly these layers in PEFT's suffix
    matching; else the full paths, so PEFT adds no adapter the trainer did not train."""
    short = sorted({layer.rpartition(".")[2] for layer in layers})
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if {n for n in linears if n.rpartition(".")[2] in short} == set(layers):
        return short
    return sorted(layers)


def _task_type(model: torch.nn.Module) -> str | None:
    kind = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS")):
        if kind.endswith(suffix):
            return task
    return None


def _commonest(values: list) -> Any:
    return max(dict.fromkeys(values), key=values.count)


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
