"""Update schemes: which parameter entries a step trains.

A scheme is an ordered mapping from fnmatch patterns over `model.named_parameters()` names
to a rule; the first matching pattern decides and unmatched parameters are frozen. Rules:
"full", "frozen", a ratio r in (0, 1] (ceil(r*C) channels chosen by weight magnitude),
{"ratio": r, "select": "magnitude" | "first"}, {"lora": r, "alpha": a} on a linear weight
(the weight stays frozen; two trainer-owned adapters train, see edgetune.compiler.lora), or
{"rows": [i, ...]} / {"rows": "touched"} on an embedding table (only those token rows train, or
only the rows each batch looks up, with the optimizer state of a row moving only when it is
looked up: a sparse, "lazy" update). Presets build
such mappings; those that need the model's structure (`last`, `tte`, the language-model
presets `lm_last`, `lm_sparse`, `norms_only`, `lora`) return a `Scheme` that resolves against
the model. `from_string` reads the short spellings the CLI takes ("lm-sparse:6", "lora:8").
"""
from __future__ import annotations

import difflib
import fnmatch
import glob
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union

import torch

SELECTIONS = ("magnitude", "first")
TOUCHED = "touched"  # {"rows": "touched"}: the rows each batch looks up
# PEFT's LoraConfig default (lora_alpha=8, whatever r is): scale = alpha / r, so 1.0 at r = 8
# and 0.5 at r = 16. Kept so an adapter behaves the same here and in PEFT with defaults.
LORA_ALPHA = 8.0


@dataclass(frozen=True)
class Rule:
    """The resolved rule of one parameter: trained fully, on a ratio of its channels, on some
    rows of an embedding table, or through a rank-`lora` adapter (the parameter itself then
    stays frozen)."""

    ratio: float = 1.0
    select: str = "magnitude"
    lora: int = 0  # LoRA rank; 0 = the parameter itself trains
    alpha: float = LORA_ALPHA  # LoRA only: the adapter's output is scaled by alpha / lora
    rows: tuple[int, ...] | str = ()  # embedding rows that train: sorted token ids, or TOUCHED

    @property
    def partial(self) -> bool:
        """Trained on a fixed part of the weight (a ratio of channels or chosen rows)."""
        return self.ratio < 1.0 or isinstance(self.rows, tuple) and bool(self.rows)

    @property
    def touched(self) -> bool:
        return self.rows == TOUCHED

    @property
    def scale(self) -> float:
        return self.alpha / self.lora

    def __repr__(self) -> str:
        if self.lora:
            return f"Rule(lora={self.lora}, alpha={self.alpha:g})"
        if self.rows:
            return f"Rule(rows={self.rows if self.touched else list(self.rows)!r})"
        return f"Rule(ratio={self.ratio:g}, select={self.select!r})"

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
            raise SchemeError(f"scheme pattern {pattern!r} matches no parameter of the model; {_closest(pattern, names)}")
    params = dict(model.named_parameters())
    resolved = {}
    for name in names:
        pattern = next((p for p in rules if fnmatch.fnmatchcase(name, p)), None)
        if pattern is not None and rules[pattern] is not None:
            if rules[pattern].lora:
                _check_lora_target(pattern, name, params[name])
            resolved[name] = rules[pattern]
    return resolved


def _closest(pattern: str, names: list[str]) -> str:
    """'did you mean ...?' with the spellings most like a pattern that matched nothing: the
    parameter names, every module's pattern ('features.3.*') and every leaf's ('*.bias'); or
    what the names look like where none is close."""
    close = difflib.get_close_matches(pattern, _spellings(names), n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    return f"names look like {names[:3]} (patterns are fnmatch over model.named_parameters())"


def _spellings(names: list[str]) -> list[str]:
    modules, leaves = {}, {}
    for name in names:
        parts = name.split(".")
        modules.update({".".join(parts[:k]) + ".*": None for k in range(1, len(parts))})
        leaves["*." + parts[-1]] = None
    return names + list(modules) + list(leaves)


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
    if isinstance(rule, Mapping) and "rows" in rule:
        return _rows_rule(pattern, rule)
    if isinstance(rule, Mapping):
        unknown = set(rule) - {"ratio", "select"}
        if unknown or "ratio" not in rule:
            raise SchemeError(f"rule for {pattern!r}: expected {{'ratio': r, 'select': ...}}, got {dict(rule)}")
        return Rule(_ratio(pattern, rule["ratio"]), _select(pattern, rule.get("select", "magnitude")))
    if isinstance(rule, (int, float)) and not isinstance(rule, bool):
        return Rule(_ratio(pattern, rule))
    raise SchemeError(f"unknown rule {rule!r} for {pattern!r}: use 'full', 'frozen', a ratio in (0, 1], "
                      "{'ratio': r, 'select': 'magnitude'|'first'}, {'lora': rank, 'alpha': a}, "
                      "or {'rows': [token ids] | 'touched'}")


def _rows_rule(pattern: str, rule: Mapping) -> Rule:
    if set(rule) != {"rows"}:
        raise SchemeError(f"rows rule for {pattern!r}: expected {{'rows': [token ids]}} or {{'rows': 'touched'}}, "
                          f"got {dict(rule)}")
    rows = rule["rows"]
    if rows == TOUCHED:
        return Rule(rows=TOUCHED)
    if (isinstance(rows, (str, bytes, Mapping)) or not hasattr(rows, "__iter__")
            or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in rows) or not rows):
        raise SchemeError(f"rows for {pattern!r} must be 'touched' or a non-empty list of token ids >= 0, "
                          f"got {rows!r}")
    return Rule(rows=tuple(sorted(set(rows))))


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
    if rule.rows:
        return {"rows": rule.rows if rule.touched else list(rule.rows)}
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


def bias_only() -> Scheme:
    """Every bias, nothing else: conv, linear and norm biases, those named `*_bias`
    (nn.MultiheadAttention's packed `in_proj_bias`) and `bias_*` (nn.LSTM's, nn.GRU's and
    nn.RNN's `bias_ih_l0`, `bias_hh_l0_reverse`), at any depth (a bare nn.Linear's `bias`)."""
    return Scheme(_every_bias, "bias_only()")  # a module-level function: the scheme pickles (apps.measure)


def _every_bias(model: torch.nn.Module) -> dict[str, Any]:
    biases = [name for name, _ in model.named_parameters() if _is_bias(name)]
    if not biases:
        raise SchemeError("bias_only(): the model has no bias (no parameter named 'bias', '*_bias' or 'bias_*'); "
                          "train its norms (norms_only()) or its last layers (last(k)) instead")
    return {glob.escape(name): "full" for name in biases}


def _is_bias(name: str) -> bool:
    leaf = name.rpartition(".")[2]
    return leaf == "bias" or leaf.endswith("_bias") or leaf.startswith("bias_")


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


# -- language-model presets -------------------------------------------------------------------
# Transformer blocks are found by name: `<prefix>.layers.N.` (HF decoders: Llama, Qwen2, Gemma,
# Mistral), `<prefix>.layer.N.` (BERT), `h.N.` (GPT-2), `blocks.N.` (ViT-style).

_BLOCK = re.compile(r"^((?:.*\.)?(?:layers|layer|h|blocks))\.(\d+)\.")
_BLOCK_NAMES = "'model.layers.N.' (HF decoders), 'encoder.layer.N.' (BERT), 'h.N.' or 'blocks.N.'"

# Where a block's projections live, relative to the block: a plain alias is a module's last
# name (q_proj), a dotted one its whole path in the block (BERT's output.dense is the FFN's
# second projection, attention.output.dense the attention's output).
PROJECTIONS = {
    "q": ("q_proj", "attention.self.query"), "k": ("k_proj", "attention.self.key"),
    "v": ("v_proj", "attention.self.value"), "o": ("o_proj", "attention.output.dense"),
    "gate": ("gate_proj",), "up": ("up_proj", "intermediate.dense"), "down": ("down_proj", "output.dense"),
}
# The benchmark scheme (PockEngine's finding for LLMs): in the last blocks, q on half
# its input channels, v fully, the FFN's first projection on a quarter, and the blocks' norms.
LM_SPARSE_ATTENTION = {"q": 0.5, "v": 1.0}
LM_SPARSE_FFN = {"up": 0.25}


def lm_last(k: int) -> Scheme:
    """The last k transformer blocks fully, plus the final norm after them (if the model has one)."""
    _check_k("lm_last", k)

    def build(model: torch.nn.Module) -> dict[str, Any]:
        blocks = _last_blocks(model, k, "lm_last")
        return {**{f"{b}.*": "full" for b in blocks}, **{f"{n}.*": "full" for n in _final_norms(model)}}

    return Scheme(build, f"lm_last({k})")


def lm_sparse(k: int, attention: Mapping[str, float] | None = None, ffn: Mapping[str, float] | None = None,
              norms: bool = True, select: str = "magnitude") -> Scheme:
    """PockEngine's sparse scheme for language models: in the last k blocks, the attention
    projections and the FFN's first projection at channel ratios ({"q": 0.5, "v": 1.0} and
    {"up": 0.25} by default; keys from PROJECTIONS, 1 = full, 0 = frozen), and the blocks'
    norms. A trained projection's bias (Qwen2's q/k/v, BERT's) trains fully: it saves nothing."""
    _check_k("lm_sparse", k)
    ratios = {**(LM_SPARSE_ATTENTION if attention is None else attention), **(LM_SPARSE_FFN if ffn is None else ffn)}
    for role, r in ratios.items():
        if role not in PROJECTIONS:
            raise SchemeError(f"lm_sparse: unknown projection {role!r}; known: {sorted(PROJECTIONS)}")
        if r != 0:
            _ratio(f"lm_sparse {role}", r)
    _select("lm_sparse", select)

    def build(model: torch.nn.Module) -> dict[str, Any]:
        params = dict(model.named_parameters())
        mapping: dict[str, Any] = {}
        for block in _last_blocks(model, k, "lm_sparse"):
            for role, r in ratios.items():
                if r == 0:
                    continue
                layer = _projection(model, block, role)
                mapping[f"{layer}.weight"] = "full" if r == 1 else {"ratio": float(r), "select": select}
                if f"{layer}.bias" in params:
                    mapping[f"{layer}.bias"] = "full"
            if norms:
                mapping.update({f"{n}.*": "full" for n in _norm_modules(model) if n.startswith(block + ".")})
        return mapping

    return Scheme(build, f"lm_sparse({k}, {ratios}, norms={norms})")


def norms_only() -> Scheme:
    """Every normalization layer's parameters (modules whose class name says Norm), nothing else."""

    def build(model: torch.nn.Module) -> dict[str, Any]:
        norms = _norm_modules(model)
        if not norms:
            raise SchemeError("norms_only: the model has no module whose class name contains 'Norm' "
                              "(LayerNorm, RMSNorm, BatchNorm...) with parameters")
        return {f"{n}.*" if n else "*": "full" for n in norms}

    return Scheme(build, "norms_only()")


def lora(r: int, targets: tuple[str, ...] = ("q_proj", "v_proj"), alpha: float = LORA_ALPHA,
         blocks: int | None = None) -> Scheme:
    """LoRA of rank r on every linear layer whose name is, or ends in '.', one of `targets` (as
    PEFT's target_modules matches), optionally only in the last `blocks` blocks. alpha defaults
    to PEFT's 8, whatever r is (scale = alpha / r)."""
    rule = {"lora": r, "alpha": alpha}
    _lora_rule("lora()", rule)
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if blocks is not None:
        _check_k("lora(blocks=...)", blocks)

    def build(model: torch.nn.Module) -> dict[str, Any]:
        within = _last_blocks(model, blocks, "lora") if blocks is not None else None
        linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        chosen = [n for n in linears if any(n == t or n.endswith("." + t) for t in targets)
                  and (within is None or any(n.startswith(b + ".") for b in within))]
        if not chosen:
            leaves = sorted({n.rpartition(".")[2] for n in linears})
            raise SchemeError(f"lora: no linear layer is named like {list(targets)}"
                              f"{' in the last %d blocks' % blocks if blocks else ''}; its linear layers are "
                              f"named {leaves[:12]}")
        return {f"{n}.weight": dict(rule) for n in chosen}

    return Scheme(build, f"lora({r}, targets={list(targets)}, alpha={alpha:g})")


def _check_k(what: str, k: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SchemeError(f"{what} needs a number of blocks >= 1, got {k!r}")


def block_of(name: str) -> str | None:
    """The transformer block a parameter or module is in ('model.layers.3.mlp.up_proj' ->
    'model.layers.3'), or None."""
    m = _BLOCK.match(name + ".")
    return f"{m.group(1)}.{m.group(2)}" if m else None


def transformer_blocks(model: torch.nn.Module, what: str) -> list[str]:
    """The transformer blocks' module paths in order, e.g. ['model.layers.0', ...]. Where names
    match in several containers (encoder and decoder), the one with the most blocks wins."""
    found: dict[str, set[int]] = {}
    for name, _ in model.named_parameters():
        m = _BLOCK.match(name)
        if m:
            found.setdefault(m.group(1), set()).add(int(m.group(2)))
    if not found:
        raise SchemeError(f"{what}: found no transformer blocks in {type(model).__name__}: looked for parameters "
                          f"under {_BLOCK_NAMES}; write the scheme as name patterns instead")
    container = max(found, key=lambda c: len(found[c]))
    return [f"{container}.{i}" for i in sorted(found[container])]


def _last_blocks(model: torch.nn.Module, k: int, what: str) -> list[str]:
    blocks = transformer_blocks(model, what)
    if k > len(blocks):
        raise SchemeError(f"{what}: asked for the last {k} blocks, but the model has {len(blocks)} "
                          f"({blocks[0]} .. {blocks[-1]})")
    return blocks[-k:]


def _projection(model: torch.nn.Module, block: str, role: str) -> str:
    """The module path of projection `role` (a PROJECTIONS key) in `block`."""
    for name, m in model.named_modules():
        rel = name.removeprefix(block + ".")
        if rel == name or not isinstance(m, torch.nn.Linear):
            continue
        if any(rel == a if "." in a else rel.rpartition(".")[2] == a for a in PROJECTIONS[role]):
            return name
    raise SchemeError(f"lm_sparse: block {block!r} has no '{role}' projection (a linear layer named "
                      f"{' or '.join(PROJECTIONS[role])}); leave {role!r} out of the ratios")


def _norm_modules(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if "norm" in type(m).__name__.lower() and any(True for _ in m.parameters(recurse=False))]


def _final_norms(model: torch.nn.Module) -> list[str]:
    """Norm modules after the last block (Llama's model.norm, GPT-2's ln_f); BERT has none."""
    names = [n for n, _ in model.named_modules()]
    last = transformer_blocks(model, "lm_last")[-1]
    end = max(i for i, n in enumerate(names) if n == last or n.startswith(last + "."))
    norms = set(_norm_modules(model))
    return [n for n in names[end + 1:] if n in norms]


# -- schemes as strings (the CLI's --scheme) -------------------------------------------------

STRING_FORMS = ("full", "bias_only", "last:K", "lm-last:K", "lm-sparse:K[:q=0.5,v=1,up=0.25]", "norms",
                "lora:R[:q_proj,v_proj,alpha=A,blocks=K]", "a published TTE name")


def from_string(spec: str) -> SchemeLike:
    """A scheme from its short spelling, e.g. "lm-sparse:6", "lora:8", "lora:16:q_proj,k_proj,v_proj,alpha=32",
    "lm-sparse:4:q=0.25,v=1,gate=0,up=0.5", "norms", "lm-last:2", "last:3", "full"."""
    kind, _, rest = spec.partition(":")
    head, _, options = rest.partition(":")
    try:
        if spec in ("full", "bias_only", "bias-only", "norms"):
            return {"full": full, "norms": norms_only}.get(spec, bias_only)()
        if spec in PUBLISHED_TTE:
            return published(spec)
        if kind in ("last", "lm-last") and not options:
            if not head.isdigit():
                raise ValueError(f"{kind}:K needs a whole number K of layers to train, e.g. {kind}:4")
            return (last if kind == "last" else lm_last)(int(head))
        if kind == "lm-sparse" and head.isdigit():
            ratios = _options(options, float)
            return lm_sparse(int(head), attention={}, ffn=ratios) if options else lm_sparse(int(head))
        if kind == "lora" and head.isdigit():
            return _lora_from_options(int(head), options)
    except ValueError as err:
        raise SchemeError(f"scheme {spec!r}: {err}") from None
    raise SchemeError(f"unknown scheme {spec!r}: use one of {', '.join(STRING_FORMS)}")


def _lora_from_options(r: int, options: str) -> Scheme:
    items = [x for x in options.split(",") if x]
    kw = _options(",".join(x for x in items if "=" in x), float)
    unknown = set(kw) - {"alpha", "blocks"}
    if unknown:
        raise SchemeError(f"lora: unknown options {sorted(unknown)}; known: alpha=A, blocks=K")
    targets = tuple(x for x in items if "=" not in x) or ("q_proj", "v_proj")
    blocks = int(kw["blocks"]) if "blocks" in kw else None
    return lora(r, targets, kw.get("alpha", LORA_ALPHA), blocks)


def _options(text: str, convert: Callable[[str], Any]) -> dict[str, Any]:
    """'a=1,b=2' -> {'a': convert('1'), ...}."""
    out = {}
    for item in filter(None, text.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"expected key=value, got {item!r}")
        out[key.strip()] = convert(value)
    return out


def parse(spec: str) -> SchemeLike:
    """A scheme as a user gives it on the command line: a JSON file, or a short spelling
    (`from_string`)."""
    if os.path.exists(spec):
        return from_file(spec)
    if spec.lower().endswith(".json"):  # meant as a file: say so, not "unknown scheme"
        raise SchemeError(f"scheme file {spec} does not exist (a scheme is a JSON file or a short spelling such "
                          "as full, bias_only, last:3)")
    return from_string(spec)


def from_file(path: str) -> SchemeLike:
    """A JSON object of {pattern: rule} (the scheme.json a run or a search saves), or
    {"tte": {...}} with the Tiny Training Engine's keys."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SchemeError(f"scheme file {path} is not JSON ({err}); write an object of "
                          '{"pattern": rule}, like the scheme.json a finetune run saves') from None
    if not isinstance(data, dict):
        raise SchemeError(f"scheme file {path} holds a {type(data).__name__}, not an object of "
                          '{"pattern": rule}')
    if set(data) != {"tte"}:
        return data
    try:
        return tte(**data["tte"])
    except TypeError as err:  # keys that tte() does not take, or not an object at all
        raise SchemeError(f"scheme file {path}: its \"tte\" entry must be an object of the Tiny Training "
                          f"Engine's keys (n_bias_update, manual_weight_idx, weight_update_ratio): {err}") from None
