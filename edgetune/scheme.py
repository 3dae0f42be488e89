"""Update schemes: which parameter entries a step trains.

A scheme is an ordered mapping from fnmatch patterns over `model.named_parameters()` names
to a rule; the first matching pattern decides and unmatched parameters are frozen. Rules:
"full", "frozen", a ratio r in (0, 1] (ceil(r*C) channels chosen by weight magnitude),
{"ratio": r, "select": "magnitude" | "first"}, or {"lora": r, "alpha": a} on a linear weight
(the weight stays frozen; two trainer-owned adapters train, see edgetune.lora). Presets build
such mappings; those that need the model's structure (`last`, `tte`, the language-model
presets) return a `Scheme` that resolves against the model.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union

import torch

SELECTIONS = ("magnitude", "first")
# PEFT's LoraConfig default (lora_alpha=8, whatever r is): scale = alpha / r, so 1.0 at r = 8
# and 0.5 at r = 16. Kept so an adapter behaves the same here and in PEFT with defaults.
LORA_ALPHA = 8.0


@dataclass(frozen=True)
class Rule:
    """The resolved rule of one parameter: trained fully, on a ratio of its channels, or
    through a rank-`lora` adapter (the parameter itself then stays frozen)."""

    ratio: float = 1.0
    select: str = "magnitude"
    lora: int = 0  # LoRA rank; 0 = the parameter itself trains
    alpha: float = LORA_ALPHA  # LoRA only: the adapter's output is scaled by alpha / lora

    @property
    def partial(self) -> bool:
        return self.ratio < 1.0

    @property
    def scale(self) -> float:
        return self.alpha / self.lora

    def channels(self, size: int) -> int:
        return math.ceil(self.ratio * size)


class Scheme:
    """A scheme that is built from the model (e.g. 'the last k layers')."""

    def __init__(self, build: Callable[[torch.nn.Module], Mapping[str, Any]], name: str) -> None:
        self.build, self.name = build, name

    def mapping(self, model: torch.nn.Module) -> Mapping[str, Any]:
        return self.build(model)

    def __repr__(self) -> str:
        return f"Scheme({self.name})"


SchemeLike = Union[Mapping[str, Any], Scheme]


class SchemeError(ValueError):
    """A scheme that names no parameter, or a rule that is not understood."""


def resolve(scheme: SchemeLike, model: torch.nn.Module) -> dict[str, Rule]:
    """{parameter name: Rule} for every trained parameter, in named_parameters order."""
    mapping = scheme.mapping(model) if isinstance(scheme, Scheme) else scheme
    if not isinstance(mapping, Mapping):
        raise SchemeError(f"a scheme is a mapping of name patterns to rules or a Scheme, got {type(mapping).__name__}")
    names = [n for n, _ in model.named_parameters()]
    rules = {pattern: parse_rule(pattern, rule) for pattern, rule in mapping.items()}
    for pattern in rules:
        if not fnmatch.filter(names, pattern):
            raise SchemeError(f"scheme pattern {pattern!r} matches no parameter of the model "
                              f"(names look like {names[:3]})")
    params = dict(model.named_parameters())
    resolved = {}
    for name in names:
        pattern = next((p for p in rules if fnmatch.fnmatchcase(name, p)), None)
        if pattern is not None and rules[pattern] is not None:
            if rules[pattern].lora:
                _check_lora_target(pattern, name, params[name])
            resolved[name] = rules[pattern]
    return resolved


def _check_lora_target(pattern: str, name: str, p: torch.Tensor) -> None:
    """A LoRA adapter is named after its layer (`<layer>.lora_A.weight`), as PEFT names it."""
    if p.dim() != 2 or name.rpartition(".")[2] != "weight":
        raise SchemeError(f"a LoRA rule needs the weight of a linear layer, but {pattern!r} matches {name!r} "
                          f"(shape {list(p.shape)}); narrow the pattern to linear weights, e.g. '*.q_proj.weight'")


def parse_rule(pattern: str, rule: Any) -> Rule | None:
    """A Rule, or None for frozen; raises SchemeError naming the pattern on a bad rule."""
    if rule == "frozen":
        return None
    if rule == "full":
        return Rule()
    if isinstance(rule, Mapping) and "lora" in rule:
        return _lora_rule(pattern, rule)
    if isinstance(rule, Mapping):
        unknown = set(rule) - {"ratio", "select"}
        if unknown or "ratio" not in rule:
            raise SchemeError(f"rule for {pattern!r}: expected {{'ratio': r, 'select': ...}}, got {dict(rule)}")
        return Rule(_ratio(pattern, rule["ratio"]), _select(pattern, rule.get("select", "magnitude")))
    if isinstance(rule, (int, float)) and not isinstance(rule, bool):
        return Rule(_ratio(pattern, rule))
    raise SchemeError(f"unknown rule {rule!r} for {pattern!r}: use 'full', 'frozen', a ratio in (0, 1], "
                      "{'ratio': r, 'select': 'magnitude'|'first'}, or {'lora': rank, 'alpha': a}")


def _lora_rule(pattern: str, rule: Mapping) -> Rule:
    unknown = set(rule) - {"lora", "alpha", "dropout"}
    if unknown:
        raise SchemeError(f"LoRA rule for {pattern!r}: unknown keys {sorted(unknown)}; "
                          "expected {'lora': rank, 'alpha': a, 'dropout': 0}")
    r, alpha = rule["lora"], rule.get("alpha", LORA_ALPHA)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise SchemeError(f"LoRA rank for {pattern!r} must be an integer >= 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise SchemeError(f"LoRA alpha for {pattern!r} must be a number > 0, got {alpha!r}")
    if rule.get("dropout", 0) != 0:
        raise SchemeError(f"LoRA dropout {rule['dropout']!r} for {pattern!r}: only dropout 0 is supported; "
                          "drop the 'dropout' key")
    return Rule(lora=r, alpha=float(alpha))


def _ratio(pattern: str, r: Any) -> float:
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
        raise SchemeError(f"ratio for {pattern!r} must be a number in (0, 1], got {r!r}")
    return float(r)


def _select(pattern: str, select: Any) -> str:
    if select not in SELECTIONS:
        raise SchemeError(f"select for {pattern!r} must be one of {SELECTIONS}, got {select!r}")
    return select


def as_mapping(rules: Mapping[str, Rule]) -> dict[str, Any]:
    """Resolved rules as a plain scheme, one exact name per trained parameter: it pickles, saves
    as JSON, and resolves to the same rules again."""
    return {name: _as_plain(rule) for name, rule in rules.items()}


def _as_plain(rule: Rule) -> Any:
    if rule.lora:
        return {"lora": rule.lora, "alpha": rule.alpha}
    return "full" if not rule.partial else {"ratio": rule.ratio, "select": rule.select}


def choose_channels(weight: torch.Tensor, axis: int, rule: Rule) -> torch.Tensor:
    """Sorted indices of the ceil(r*C) channels along `axis` that train, chosen once."""
    size = weight.shape[axis]
    k = rule.channels(size)
    if rule.select == "first":
        return torch.arange(k)
    dims = [d for d in range(weight.dim()) if d != axis]
    norms = weight.detach().float().pow(2).sum(dims).cpu()
    return torch.sort(torch.topk(norms, k, sorted=True).indices).values


# -- presets ---------------------------------------------------------------------------------

def full() -> dict[str, Any]:
    """Every parameter, fully."""
    return {"*": "full"}


def bias_only() -> dict[str, Any]:
    """Every bias (conv, linear and norm biases), nothing else."""
    return {"*.bias": "full"}


def last(k: int) -> Scheme:
    """The parameters of the last k layers (modules that own parameters), fully."""
    if k < 1:
        raise SchemeError(f"last(k) needs k >= 1, got {k}")

    def build(model: torch.nn.Module) -> dict[str, Any]:
        # Layers as named_parameters lists them: a tied weight counts once, where it first appears.
        layers = list(dict.fromkeys(name.rpartition(".")[0] for name, _ in model.named_parameters()))
        return {(f"{layer}.*" if layer else "*"): "full" for layer in layers[-k:]}

    return Scheme(build, f"last({k})")


def tte(n_bias_update: int | str = 0, manual_weight_idx: Any = None, weight_update_ratio: Any = None,
        weight_select_criteria: str = "magnitude+") -> Scheme:
    """The Tiny Training Engine's sparse-update config over the model's convolutions.

    Convs are counted in registration order; the last Linear is the classifier and is always
    trained. `n_bias_update` trains the biases of the last n convs (a conv without bias uses
    the bias of the norm layer right after it); `manual_weight_idx` lists conv indices whose
    weights train, each at its `weight_update_ratio` (0 skips the layer).
    """
    select = {"magnitude+": "magnitude", "magnitude": "magnitude", "first": "first"}.get(weight_select_criteria)
    if select is None:
        raise SchemeError(f"weight_select_criteria must be 'magnitude+' or 'first', got {weight_select_criteria!r}")
    idx = _int_list(manual_weight_idx)
    ratios = _float_list(weight_update_ratio, len(idx))

    def build(model: torch.nn.Module) -> dict[str, Any]:
        convs, bias_of, head = _tte_layers(model)
        n_bias = len(convs) if n_bias_update == "all" else int(n_bias_update)
        mapping: dict[str, Any] = {}
        for i, r in zip(idx, ratios):
            if not 0 <= i < len(convs):
                raise SchemeError(f"manual_weight_idx {i} is out of range: the model has {len(convs)} convs")
            if r > 0:
                mapping[f"{convs[i]}.weight"] = "full" if r >= 1 else {"ratio": r, "select": select}
        for conv in convs[len(convs) - n_bias:] if n_bias > 0 else []:
            if bias_of.get(conv):
                mapping[bias_of[conv]] = "full"
        if head:
            mapping[f"{head}.*"] = "full"
        return mapping

    return Scheme(build, f"tte(n_bias_update={n_bias_update}, manual_weight_idx={idx}, weight_update_ratio={ratios})")


def with_head(scheme: SchemeLike, head: str) -> Scheme:
    """`scheme`, plus the new classifier `head` (a module name) trained fully, whatever the
    scheme says about it: a freshly initialised head must learn."""

    def build(model: torch.nn.Module) -> dict[str, Any]:
        mapping = scheme.mapping(model) if isinstance(scheme, Scheme) else scheme
        return {f"{head}.*": "full", **{p: r for p, r in mapping.items() if p != f"{head}.*"}}

    return Scheme(build, f"{getattr(scheme, 'name', 'scheme')} + head {head}")


# The Tiny Training Engine's published MobileNetV2 schemes (§2 of its config), named by the
# analytic extra memory they were searched under. Conv indices count torchvision's
# MobileNetV2 convs in order, so every index that is a multiple of 3 is a block's first pointwise conv.
PUBLISHED_TTE = {
    "mbv2-49kb": dict(n_bias_update=16, manual_weight_idx=[36, 39, 40, 41, 42, 45, 48, 49],
                      weight_update_ratio=[1, 1, 0, 0.25, 0.125, 0.125, 0.125, 0.125]),
    "mbv2-73kb": dict(n_bias_update=20, manual_weight_idx=[32, 33, 36, 39, 41, 42, 45, 48],
                      weight_update_ratio=[0.125, 0.5, 0.5, 1, 0.25, 0.125, 0.125, 1]),
    "mbv2-99kb": dict(n_bias_update=25, manual_weight_idx=[27, 30, 33, 36, 39, 42, 45, 48],
                      weight_update_ratio=[1, 1, 1, 1, 1, 0.125, 0.5, 1]),
    "mbv2-123kb": dict(n_bias_update=31, manual_weight_idx=[27, 30, 33, 36, 39, 42, 45, 48],
                       weight_update_ratio=[1, 1, 1, 1, 1, 0.5, 1, 1]),
    "mbv2-138kb": dict(n_bias_update=34, manual_weight_idx=[27, 30, 33, 36, 39, 42, 45, 48],
                       weight_update_ratio=[1] * 8),
}


def published(name: str) -> Scheme:
    """One of the Tiny Training Engine's published schemes, e.g. published("mbv2-99kb")."""
    if name not in PUBLISHED_TTE:
        raise SchemeError(f"unknown published scheme {name!r}; known: {sorted(PUBLISHED_TTE)}")
    return tte(**PUBLISHED_TTE[name])


def _tte_layers(model: torch.nn.Module) -> tuple[list[str], dict[str, str], str | None]:
    modules = list(model.named_modules())
    convs, bias_of, head = [], {}, None
    for pos, (name, m) in enumerate(modules):
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)):
            convs.append(name)
            bias_of[name] = f"{name}.bias" if m.bias is not None else _next_norm_bias(modules, pos)
        elif isinstance(m, torch.nn.Linear):
            head = name
    return convs, bias_of, head


def _next_norm_bias(modules: list, pos: int) -> str | None:
    norms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.LayerNorm)
    for name, m in modules[pos + 1: pos + 3]:
        if isinstance(m, norms) and getattr(m, "bias", None) is not None:
            return f"{name}.bias"
    return None


def _int_list(v: Any) -> list[int]:
    if v is None:
        return []
    if isinstance(v, str):
        return [int(x) for x in v.split("-") if x]
    return [int(x) for x in v]


def _float_list(v: Any, n: int) -> list[float]:
    if v is None:
        return [1.0] * n
    if isinstance(v, (int, float)):
        return [float(v)] * n
    values = [float(x) for x in (v.split("-") if isinstance(v, str) else v)]
    if len(values) != n:
        raise SchemeError(f"weight_update_ratio has {len(values)} entries for {n} manual_weight_idx layers")
    return values
