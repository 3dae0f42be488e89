"""LoRA adapters in PEFT's format: save them for `peft.PeftModel.from_pretrained`, or fold them
into the base weights.

    trainer = et.compile(model, loss, ..., scheme=et.schemes.lora(8))   # edgetune.compiler.lora
    ...
    save_peft_adapter(trainer, "out/")   # loads with peft.PeftModel.from_pretrained(base, "out/")
    model.load_state_dict(merged_state(trainer), strict=False)   # or fold the adapters in
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from edgetune.compiler.lora import adapter_names, layer_of, lora_rules
from edgetune.compiler.scheme import Rule
from edgetune.compiler.trainer import Trainer
from edgetune.files import atomic_write, write_json

PEFT_PREFIX = "base_model.model."  # what PeftModel prepends to the base model's module paths


def peft_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The adapters under the keys PEFT's save_pretrained writes (contiguous CPU copies)."""
    return {PEFT_PREFIX + name: t.detach().cpu().contiguous().clone() for name, t in trainer.adapters.items()}


def merged_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """{base weight name: W + alpha/r * B @ A} for every LoRA weight: load it with
    `model.load_state_dict(merged_state(trainer), strict=False)` to fold the adapters in."""
    params = dict(trainer.model.named_parameters())
    merged = {}
    for name, rule in lora_rules(trainer.rules).items():
        a, b = (trainer.adapters[k] for k in adapter_names(name))
        merged[name] = params[name].detach() + (b @ a) * rule.scale
    return merged


@contextlib.contextmanager
def adapters_merged(trainer: Trainer):
    """The trainer's model as plain PyTorch should see the trained step, for evaluation:
    weights the step holds as int8 lent back as floats (Trainer.dequantized), and LoRA
    adapters folded in. The adapters live in the trainer, not the model, and the compiled
    step adds them to the frozen weights itself, so the frozen weights are put back, bitwise,
    afterwards."""
    with trainer.dequantized():
        if not getattr(trainer, "adapters", None):
            yield trainer.model
            return
        with _lora_folded_in(trainer):
            yield trainer.model


@contextlib.contextmanager
def _lora_folded_in(trainer: Trainer):
    params = dict(trainer.model.named_parameters())
    merged = merged_state(trainer)
    frozen = {n: params[n].detach().clone() for n in merged}
    try:
        with torch.no_grad():
            for n, w in merged.items():
                params[n].copy_(w)
        yield
    finally:
        with torch.no_grad():
            for n, w in frozen.items():
                params[n].copy_(w)


def save_peft_adapter(trainer: Trainer, out_dir: str, base_model_name: str | None = None,
                      task_type: str | None = "auto") -> None:
    """Write `adapter_model.safetensors` and `adapter_config.json` as PEFT does, each
    atomically (the config last, so a directory with a config has its weights)."""
    from safetensors.torch import save_file

    rules = lora_rules(trainer.rules)
    if not rules:
        raise ValueError("this trainer has no LoRA rule, so there is no adapter to save; "
                         "compile with a scheme such as {'*.q_proj.weight': {'lora': 8}}")
    os.makedirs(out_dir, exist_ok=True)
    state = peft_state(trainer)
    atomic_write(os.path.join(out_dir, "adapter_model.safetensors"),
                  lambda path: save_file(state, path, metadata={"format": "pt"}))
    config = peft_config(trainer.model, rules, base_model_name, task_type)
    write_json(os.path.join(out_dir, "adapter_config.json"), config, indent=2)  # as PEFT writes it


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
