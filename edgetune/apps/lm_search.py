"""Searching a transformer's sparse scheme by contribution, under a memory budget (issue 16).

PockEngine chose its LLaMA scheme by contribution analysis, as the Tiny Training Engine did
for vision. edgetune.apps.search does that for CNNs and classifier heads; this module gives it
a space that fits transformers and a score that fits language models:

- LMSearchSpace: the model's blocks are cut into `bands` of consecutive blocks over the
  whole depth (early blocks included). Per band, each projection kind (q, k, v, o, gate, up,
  down in a Llama block; query, key, value, dense ... in a BERT one) is one unit that trains
  at one option: frozen, a ratio of its input channels, or a LoRA adapter of some rank, so
  the search may pick LoRA where it wins. Besides, the norms (and biases) of the last k
  blocks train, k from a grid. Every scheme trains the floor: the final norm of a causal LM
  (or a classifier's new head).
- Contributions: a short run per candidate from the same weights, scored by the held-out
  loss afterwards (the score is minus the loss, so that a gain is positive). Runs are repeated
  over `seeds` (the data order differs), each seed cached on its own, and the search uses the
  mean gain; the spread across seeds is kept beside each gain, so one can tell a gain from
  noise.
- The search itself is edgetune.apps.search's: evolution under the memory plan's predicted
  peak, then the winner measured in a fresh process (search_verified).

    space = LMSearchSpace.from_model(lm.model, bands=6)
    gains = lm_contributions(space, lm.model, train, score, LMRunSettings(steps=30), seeds=(0, 1))
    result = search_verified(space, gains.mean, PeakPredictor(...), budget_bytes=300 * 2**20)
"""
from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from edgetune.apps.search import Contributions, contributions, option_label
from edgetune.compiler.scheme import transformer_blocks

LM_RATIOS = (0.125, 0.25, 0.5, 1.0)
LORA_RANKS = (8,)


def lora_option(rank: int) -> str:
    return f"lora:{rank}"


def _rule(option) -> Any:
    """A unit's option as a scheme rule. LoRA's alpha is twice the rank, as the LoRA rows of
    RESULTS.md use it (PEFT's default alpha of 8 would shrink larger ranks' updates)."""
    if isinstance(option, str):
        rank = int(option.removeprefix("lora:"))
        return {"lora": rank, "alpha": 2 * rank}
    return "full" if option >= 1 else float(option)


# -- the space --------------------------------------------------------------------------------

@dataclass(frozen=True)
class LMSearchSpace:
    """What a scheme may train besides `floor`: the norms and biases of the last k `blocks`
    (k from `bias_choices`), and each weight unit (one projection kind over a band of blocks)
    at one of `ratios`: 0.0 (frozen) first, then channel ratios and "lora:R" options.

    The attribute names are edgetune.apps.search.SearchSpace's, so contributions, search and
    search_verified take this space as they take that one."""

    floor: tuple[str, ...]  # parameter names every scheme trains
    blocks: tuple[str, ...]  # block module names, forward order
    bias_units: tuple[tuple[str, ...], ...]  # per block, its 1-D parameters (norms, biases)
    bias_choices: tuple[int, ...]  # how many of the last blocks' norms and biases train
    weight_units: tuple[str, ...]  # unit names, e.g. "model.layers.{0-4}.self_attn.q_proj.weight"
    members: Mapping[str, tuple[str, ...]] = field(hash=False)  # unit name -> its parameter names
    ratios: tuple = (0.0, *LM_RATIOS, *map(lora_option, LORA_RANKS))
    kinds: tuple[str, ...] = ()  # the projection kinds, names inside a block ("self_attn.q_proj")
    metric: str = "score (minus the loss)"  # what the contribution runs score, for the log

    @property
    def head(self) -> str:  # what search_verified's messages call the floor
        return ", ".join(self.floor)

    @property
    def floor_label(self) -> str:
        return f"floor ({self.head}) only"

    @staticmethod
    def bias_label(k: int) -> str:
        return f"norms and biases of the last {k} blocks"

    @classmethod
    def from_model(cls, model: torch.nn.Module, *, bands: int = 6, ratios: Iterable[float] = LM_RATIOS,
                   lora_ranks: Iterable[int] = LORA_RANKS, kinds: Iterable[str] | None = None,
                   norm_steps: int = 6, floor: Sequence[str] | None = None,
                   metric: str = "score (minus the loss)") -> "LMSearchSpace":
        """The space of `model`'s transformer blocks (edgetune.compiler.scheme.transformer_blocks),
        cut into `bands` bands (at most one a block). kinds: the projection kinds to search
        (names inside a block, e.g. "self_attn.q_proj"; default: every linear of a block). floor: parameter names always
        trained (default: the 1-D parameters after the last block, e.g. a causal LM's final
        norm; a classifier's new head is given here). norm_steps: how many k besides 0 to
        analyse for the blocks' norms and biases."""
        options = _options(ratios, lora_ranks)
        blocks = transformer_blocks(model, "the LM search")
        if bands < 1:
            raise ValueError(f"bands must be at least 1, got {bands}")
        bands = min(bands, len(blocks))  # a model with fewer blocks: a band each
        params = dict(model.named_parameters())
        floor = tuple(floor) if floor is not None else _final_norms(params, blocks[-1])
        if not floor:
            raise ValueError("found nothing after the last block to train as the floor of every scheme "
                             "(a final norm or a head): pass floor=[parameter names]")
        unknown = [n for n in floor if n not in params]
        if unknown:
            raise ValueError(f"floor names {unknown}, which are not parameters of the model")
        linears = _block_linears(model, blocks[0])
        kinds = tuple(linears if kinds is None else kinds)
        missing = [k for k in kinds if k not in linears]
        if missing or not kinds:
            raise ValueError(f"kinds {missing or list(kinds)} are not linear layers of a block; a block has "
                             f"{', '.join(linears)}")
        units = {_unit_name(blocks, band, kind): tuple(f"{blocks[i]}.{kind}.weight" for i in band)
                 for band in _bands(len(blocks), bands) for kind in kinds}
        bias_units = tuple(tuple(n for n, p in params.items() if n.startswith(b + ".") and p.dim() == 1) for b in blocks)
        steps = max(1, min(norm_steps, len(blocks)))
        choices = tuple(sorted({round(len(blocks) * j / steps) for j in range(steps + 1)}))
        return cls(floor, tuple(blocks), bias_units, choices, tuple(units), units, options, kinds, metric)

    def scheme(self, k: int, weights: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The scheme dict: the floor, norms and biases of the last k blocks, each unit at its option."""
        mapping: dict[str, Any] = {name: "full" for name in self.floor}
        for block in self.bias_units[len(self.bias_units) - k:] if k else ():
            mapping.update({name: "full" for name in block})
        for unit, option in (weights or {}).items():
            if option:
                mapping.update({name: _rule(option) for name in self.members[unit]})
        return mapping

    def decode(self, genome) -> tuple[int, dict[str, Any]]:
        return self.bias_choices[genome[0]], {u: self.ratios[g] for u, g in zip(self.weight_units, genome[1:]) if g}

    def scheme_of(self, genome) -> dict[str, Any]:
        return self.scheme(*self.decode(genome))

    @property
    def size(self) -> int:
        return len(self.bias_choices) * len(self.ratios) ** len(self.weight_units)

    def describe(self) -> str:
        return (f"norms and biases of the last k of {len(self.blocks)} blocks (k in {list(self.bias_choices)}); "
                f"{len(self.weight_units)} units ({len(self.weight_units) // max(1, len(self.kinds))} bands x "
                f"{len(self.kinds)} projections), each frozen, at a ratio of "
                f"{', '.join(f'{o:g}' for o in self.ratios[1:] if not isinstance(o, str)) or '-'} or as "
                f"{', '.join(o for o in self.ratios[1:] if isinstance(o, str)) or '-'}; "
                f"always: {self.head}")


def _options(ratios: Iterable[float], lora_ranks: Iterable[int]) -> tuple:
    ratios = sorted({float(r) for r in ratios} - {0.0})
    if not all(0 < r <= 1 for r in ratios):
        raise ValueError(f"channel ratios must lie in (0, 1], got {ratios}")
    ranks = sorted({int(r) for r in lora_ranks})
    if any(r < 1 for r in ranks):
        raise ValueError(f"LoRA ranks must be whole numbers >= 1, got {ranks}")
    if not ratios and not ranks:
        raise ValueError("the search needs at least one way to train a weight: a channel ratio or a LoRA rank")
    return (0.0, *ratios, *map(lora_option, ranks))


def _block_linears(model: torch.nn.Module, block: str) -> list[str]:
    module = model.get_submodule(block)
    return [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)
            and isinstance(getattr(m, "weight", None), torch.nn.Parameter)]


def _final_norms(params: Mapping[str, torch.Tensor], last_block: str) -> tuple[str, ...]:
    """The 1-D parameters registered after the last block (a final norm), in their order."""
    names = list(params)
    after = [i for i, n in enumerate(names) if n.startswith(last_block + ".")]
    return tuple(n for n in names[after[-1] + 1:] if params[n].dim() == 1) if after else ()


def _bands(n_blocks: int, bands: int) -> list[range]:
    edges = [round(n_blocks * j / bands) for j in range(bands + 1)]
    return [range(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def _unit_name(blocks: Sequence[str], band: range, kind: str) -> str:
    """"model.layers.{0-4}.self_attn.q_proj.weight": the blocks' common prefix and their range
    (a band of one block is named as its parameter)."""
    if len(band) == 1:
        return f"{blocks[band[0]]}.{kind}.weight"
    prefix = re.sub(r"\d+$", "", blocks[band[0]])
    return f"{prefix}{{{band[0]}-{band[-1]}}}.{kind}.weight"


# -- contributions over seeds ----------------------------------------------------------------

@dataclass
class SeededContributions:
    """Contributions measured once per seed: `mean` is what the search sums; `spread` holds,
    per gain, the largest minus the smallest over the seeds."""

    seeds: tuple[int, ...]
    per_seed: list[Contributions]
    mean: Contributions
    spread: Contributions

    def noise_summary(self) -> str:
        """The median |gain| against the median spread: whether repeated estimates agree."""
        gains = _flat(self.mean)
        spreads = _flat(self.spread)
        if len(self.seeds) < 2:
            return "one seed: no spread measured"
        return (f"median |gain| {statistics.median(map(abs, gains)):.4f}, median spread across {len(self.seeds)} "
                f"seeds {statistics.median(spreads):.4f}, largest spread {max(spreads):.4f}")

    def table(self) -> list[dict]:
        """Every gain with its spread, largest first: what the search's side file keeps."""
        rows = [{"candidate": f"norms and biases of the last {k} blocks", "gain": g, "spread": self.spread.bias[k]}
                for k, g in self.mean.bias.items() if k]
        rows += [{"candidate": f"{unit} {option_label(o)}", "gain": g, "spread": self.spread.weight[unit][o]}
                 for unit, by_option in self.mean.weight.items() for o, g in by_option.items()]
        return sorted(rows, key=lambda r: -r["gain"])


def _flat(c: Contributions) -> list[float]:
    return [g for k, g in c.bias.items() if k] + [g for by in c.weight.values() for g in by.values()]


def seeded_contributions(space, evaluate_with_seed: Callable[[int], Callable[[dict], float]],
                         seeds: Sequence[int], *, cache: str | None, context: str,
                         progress: Callable[[str], None] | None = None) -> SeededContributions:
    """contributions() once per seed (each cached under its own context), then their mean and spread."""
    if not seeds:
        raise ValueError("give at least one seed")
    per_seed = [contributions(space, evaluate_with_seed(s), cache=cache, context=f"{context} | seed {s}",
                              progress=progress) for s in seeds]
    combine = lambda f: _combined(per_seed, f)  # noqa: E731
    return SeededContributions(tuple(seeds), per_seed, combine(statistics.fmean),
                               combine(lambda xs: max(xs) - min(xs)))


def _combined(runs: list[Contributions], f: Callable[[list[float]], float]) -> Contributions:
    first = runs[0]
    return Contributions(f([r.baseline for r in runs]),
                         {k: f([r.bias[k] for r in runs]) for k in first.bias},
                         {u: {o: f([r.weight[u][o] for r in runs]) for o in by} for u, by in first.weight.items()})


# -- short runs on a language model, and the search -------------------------------------------

@dataclass
class LMSearchSettings:
    """How the contribution runs train and score: each candidate trains `steps` steps of
    [batch, seq_len] with a cosine schedule from `lr`, from the same weights, on part of the
    training split, and is scored by its loss on `score_items` other training examples (the
    run's held-out split stays unseen by the search). Once per seed in `seeds`."""

    steps: int = 30
    batch: int = 4
    seq_len: int = 128
    optimizer: str = "adamw"
    lr: float = 1e-3
    score_items: int = 64
    seeds: tuple[int, ...] = (0, 1)
    bands: int = 6
    ratios: tuple[float, ...] = LM_RATIOS
    lora_ranks: tuple[int, ...] = LORA_RANKS
    kinds: tuple[str, ...] | None = None
    cache: str | None = None
    # Schemes may fit the budget by recomputing transformer blocks in the backward (compiled
    # under SearchResult.memory_budget): deeper schemes fit, each recomputed block costing a forward.
    recompute_blocks: bool = False

    def context(self, model_name: str, data: str) -> str:
        return (f"lm {model_name} | {data} | batch {self.batch} x {self.seq_len} | {self.optimizer} lr {self.lr:g} "
                f"cosine | {self.steps} steps | {self.score_items} scored")


# A diverged run's loss stands in as this, so that its score stays a finite, very bad number.
WORST_LOSS = 1e3


def short_lm_run(model: torch.nn.Module, train, score, settings: LMSearchSettings, seed: int
                 ) -> Callable[[dict], float]:
    """evaluate(scheme) -> minus the held-out loss after a short run; the weights restored after."""
    from edgetune.apps.finetune import learning_rate
    from edgetune.apps.lm import _endless, causal_lm_loss, compile_lm, evaluate_lm, lm_example, trained_names
    from edgetune.apps.peft import adapters_merged
    from edgetune.compiler.isolate import warm_forked_compiles
    from edgetune.compiler.optim import by_name

    params = dict(model.named_parameters())

    def run(scheme: dict) -> float:
        warm_forked_compiles(model, causal_lm_loss, *lm_example(settings.batch, settings.seq_len))  # once: each compiles
        trainer = compile_lm(model, scheme, settings.batch, settings.seq_len, by_name(settings.optimizer, settings.lr))
        before = {n: params[n].detach().clone() for n in trained_names(trainer)}
        try:
            # Batches as finetune_lm draws them: reshuffled each pass, a short last one filled.
            for i, (ids, mask, labels) in enumerate(_endless(train, settings.batch, seed, settings.steps, None)):
                trainer.lr = learning_rate(i, settings.steps, settings.lr, "cosine")
                trainer.step((ids, mask), (labels,))
            with adapters_merged(trainer) as trained:
                loss = evaluate_lm(trained, score, settings.batch)
            return -(loss if loss < WORST_LOSS else WORST_LOSS)  # nan too
        finally:
            with torch.no_grad():
                for n, value in before.items():
                    params[n].copy_(value)

    return run


def search_lm(model: torch.nn.Module, model_name: str, data_name: str, train, budget_bytes: int,
              settings: LMSearchSettings, log: Callable[[str], None] = print):
    """The best scheme for fine-tuning `model` on `train` whose measured peak fits `budget_bytes`
    above the weights: (SearchResult, SeededContributions). Contributions come from short runs
    or from settings.cache."""
    from edgetune.apps.lm import causal_lm_loss, lm_example
    from edgetune.apps.search import PeakPredictor, search_verified
    from edgetune.compiler.isolate import run_isolated
    from edgetune.compiler.optim import by_name

    s = settings
    if len(train) < s.batch + 1:
        raise ValueError(f"the search trains on part of the training split and scores on the rest: it needs more "
                         f"than --batch ({s.batch}) training examples, and there are {len(train)}")
    space = LMSearchSpace.from_model(model, bands=s.bands, ratios=s.ratios, lora_ranks=s.lora_ranks, kinds=s.kinds)
    log(f"search space: {space.describe()}")
    rest, score = train.split(val_count=min(s.score_items, len(train) - s.batch), seed=s.seeds[0] + 1)
    gains = seeded_contributions(space, lambda seed: short_lm_run(model, rest, score, s, seed), s.seeds,
                                 cache=s.cache, context=s.context(model_name, f"{data_name} ({len(train)} train)"),
                                 progress=lambda line: log(f"  {line}"))
    log(f"contributions: {gains.noise_summary()}")
    inputs, targets = lm_example(s.batch, s.seq_len)
    optimizer = by_name(s.optimizer, s.lr)
    # The predictor loads torch.export; a forked child keeps it out of the training process.
    fit_to = budget_bytes if s.recompute_blocks else None
    result = run_isolated(lambda: search_verified(space, gains.mean, PeakPredictor(model, causal_lm_loss, inputs,
                                                                                   targets, optimizer,
                                                                                   memory_budget=fit_to),
                                                  budget_bytes),
                          torch.device("cpu"))
    result.history.append({"contributions": gains.table(), "seeds": list(gains.seeds),
                           "noise": gains.noise_summary()})
    return result, gains
