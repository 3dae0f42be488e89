"""Finding an update scheme under a memory budget: the Tiny Training Engine's search.

The Tiny Training Engine paper ("On-Device Training Under 256KB Memory") searches its sparse-update schemes in two steps,
and this module does the same:

1. Contribution analysis. A short fine-tuning run (the caller's `evaluate(scheme) -> accuracy`)
   per candidate: the head alone (the baseline); the head plus the biases of the last k layers,
   for a grid of k (Δacc_b[:k]); and, on top of all those biases, one layer's weight at channel
   ratio r (Δacc_{W_i,r}). Results are cached in a JSON file, so another budget costs nothing
   and an interrupted analysis resumes where it stopped.
2. Evolutionary search over (k, ratio per weight layer) that maximises the summed gains --
   assuming, as the paper does, that they add up -- subject to the memory plan's predicted peak
   (PeakPredictor, the number `Trainer.report().predicted_peak_bytes` gives) within the budget.

A budget is memory on top of the loaded weights, as in edgetune.apps.measure. The plan predicts
the step's tensors and its kernels' scratch, not what setup leaves resident (imported modules,
library caches); `search_verified` also measures the result (edgetune.apps.measure) and searches
again with the difference set aside until the measured peak fits.

    space = SearchSpace.from_model(model, weight_filter="pw1")
    gains = contributions(space, evaluate, cache="contrib.json", context="mbv2 fmnist 200 steps lr 0.01")
    predictor = PeakPredictor(model, F.cross_entropy, (x,), (y,), et.SGD(0.01, momentum=0.9))
    result = search(space, gains, predictor, budget_bytes=40 * 2**20)
    result.save("scheme.json")   # edgetune finetune --scheme scheme.json

PeakPredictor exports the model in this process (torch.export costs ~50 MB of modules); to keep
that out of a training process, run the search through edgetune.compiler.isolate.run_isolated.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

from edgetune.compiler import scheme as schemes
from edgetune.compiler.backends.scratch import measure_scratch
from edgetune.compiler.memory import BudgetError, plan
from edgetune.compiler.trainer import _as_tuple, _device_of, training_graph
from edgetune.files import write_json

RATIOS = (0.0, 0.125, 0.25, 0.5, 1.0)  # the paper's per-layer channel ratios; 0 = weight frozen
MB = 2 ** 20
Genome = tuple  # (index into bias_choices, index into ratios per weight unit...)


# -- the search space ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SearchSpace:
    """What a scheme may train besides the head: the biases of the last k `bias_units` (k from
    `bias_choices`) and each of `weight_units` at one of `ratios` of its input channels."""

    head: str  # module name of the classifier, always fully trained (it is new)
    bias_units: tuple[str, ...]  # bias parameters, forward order
    bias_choices: tuple[int, ...]  # the k that are analysed and searched, 0 and len(bias_units) included
    weight_units: tuple[str, ...]  # weight parameters of conv/linear layers
    ratios: tuple[float, ...] = RATIOS
    metric: str = "accuracy"  # what the contribution runs score, for the log

    @classmethod
    def from_model(cls, model: torch.nn.Module, *, head: str | None = None, ratios: Iterable[float] = RATIOS,
                   bias_steps: int = 8, later_fraction: float = 0.5,
                   weight_filter: str | Callable[[str, torch.nn.Module], bool] | None = None,
                   weight_layers: Iterable[str] | None = None) -> "SearchSpace":
        """The space of `model`. Layers count in registration order (as the TTE counts convs),
        which is forward order for the usual models.

        head: the classifier module (default: the last nn.Linear). bias_steps: how many k
        besides 0 to analyse, spread evenly up to all biases. Weight candidates are the conv
        and linear layers in the later `later_fraction` of the network, kept where
        `weight_filter(name, module)` is true; "pw1" keeps the first pointwise conv of each
        inverted-residual block (the one feeding a depthwise conv), which the paper found to
        contribute most in MobileNetV2. `weight_layers` (module names) overrides both."""
        ratios = tuple(sorted({0.0, *map(float, ratios)}))
        if not all(0 <= r <= 1 for r in ratios):
            raise ValueError(f"channel ratios must lie in [0, 1] (0 = frozen, 1 = the whole weight), got {list(ratios)}")
        head = _default_head(model) if head is None else head
        biases = [n for n, _ in model.named_parameters() if n.endswith(".bias") and not _is_in(n, head)]
        layers = _weight_layers(model, head)
        return cls(head, tuple(biases), _bias_grid(len(biases), bias_steps),
                   _weight_candidates(layers, later_fraction, weight_filter, weight_layers), ratios)

    def scheme(self, k: int, weights: Mapping[str, float] | None = None) -> dict[str, Any]:
        """The scheme dict: head, biases of the last k units, each weight at its ratio (0 = frozen)."""
        mapping: dict[str, Any] = {f"{self.head}.*": "full"}
        mapping.update({name: "full" for name in self.bias_units[len(self.bias_units) - k:] if k})
        for name, ratio in (weights or {}).items():
            if ratio > 0:
                mapping[name] = "full" if ratio >= 1 else ratio
        return mapping

    # How the contribution runs are named in the log (edgetune.apps.lm_search's space names its own).
    floor_label = "head only"

    @staticmethod
    def bias_label(k: int) -> str:
        return f"biases of the last {k}"

    def describe(self) -> str:
        return (f"biases of the last k of {len(self.bias_units)} layers (k in {list(self.bias_choices)}), "
                f"{len(self.weight_units)} weights at ratios {list(self.ratios)}")

    def decode(self, genome: Genome) -> tuple[int, dict[str, float]]:
        return self.bias_choices[genome[0]], {u: self.ratios[g] for u, g in zip(self.weight_units, genome[1:]) if g}

    def scheme_of(self, genome: Genome) -> dict[str, Any]:
        return self.scheme(*self.decode(genome))

    @property
    def size(self) -> int:
        return len(self.bias_choices) * len(self.ratios) ** len(self.weight_units)


def _is_in(param: str, module: str) -> bool:
    return param.startswith(module + ".") if module else True


def _default_head(model: torch.nn.Module) -> str:
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear to take for the classifier head; pass head='<module name>'")
    return linears[-1]


def _weight_layers(model: torch.nn.Module, head: str) -> list[tuple[str, torch.nn.Module]]:
    kinds = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds) and n != head
            and isinstance(getattr(m, "weight", None), torch.nn.Parameter)]


def _bias_grid(n: int, steps: int) -> tuple[int, ...]:
    return tuple(sorted({round(n * j / max(steps, 1)) for j in range(max(steps, 1) + 1)}))


def _weight_candidates(layers, later_fraction: float, weight_filter, weight_layers) -> tuple[str, ...]:
    if weight_layers is not None:
        known = {n for n, _ in layers}
        missing = [n for n in weight_layers if n not in known]
        if missing:
            raise ValueError(f"weight_layers {missing} are not conv/linear layers of the model (besides the head)")
        return tuple(f"{n}.weight" for n in weight_layers)
    keep = _expansion_convs(layers) if weight_filter == "pw1" else weight_filter
    if isinstance(keep, str):
        raise ValueError(f"unknown weight_filter {weight_filter!r}: use 'pw1' or a function (name, module) -> bool")
    later = layers[len(layers) - round(len(layers) * later_fraction):] if later_fraction > 0 else []
    return tuple(f"{n}.weight" for n, m in later if keep is None or keep(n, m))


def _expansion_convs(layers) -> Callable[[str, torch.nn.Module], bool]:
    """A filter keeping 1x1 convs whose next layer is a depthwise conv: MobileNet's pw1."""
    def depthwise(m):
        return isinstance(m, torch.nn.Conv2d) and 1 < m.groups == m.in_channels

    def pointwise(m):
        return isinstance(m, torch.nn.Conv2d) and m.groups == 1 and tuple(m.kernel_size) == (1, 1)

    chosen = {n for (n, m), (_, nxt) in zip(layers, layers[1:]) if pointwise(m) and depthwise(nxt)}
    return lambda name, module: name in chosen


# -- contribution analysis ----------------------------------------------------------------------

@dataclass
class Contributions:
    """Accuracy gains: `bias[k]` of the last k biases over the head alone (bias[0] = 0), and
    `weight[name][ratio]` of one weight at a ratio over all biases."""

    baseline: float
    bias: dict[int, float]
    weight: dict[str, dict[float, float]]

    def total(self, k: int, weights: Mapping[str, float]) -> float:
        """The predicted gain of a scheme, assuming the gains add up (as the paper does)."""
        return self.bias[k] + sum(self.weight[name][r] for name, r in weights.items() if r)


@contextlib.contextmanager
def seeded_run(seed: int, generators: Iterable[torch.Generator] = ()):
    """Inside: torch's default generator (dropout) and `generators` (a job's augmentation)
    seeded with `seed`; afterwards, each back in the state it was in. A contribution run is
    then a function of its scheme and seed alone, not of the runs before it (which a cache may
    skip), and the job's random state is as the search found it."""
    everything = [torch.default_generator, *generators]
    states = [g.get_state() for g in everything]
    try:
        for g in everything:
            g.manual_seed(seed)
        yield
    finally:
        for g, state in zip(everything, states):
            g.set_state(state)


def contributions(space: SearchSpace, evaluate: Callable[[dict], float], *, cache: str | None = None,
                  context: str = "", progress: Callable[[str], None] | None = None) -> Contributions:
    """Measure every gain the search needs with `evaluate(scheme) -> accuracy`.

    `cache`: a JSON file of measurements keyed by `context` (say what makes an accuracy
    comparable: model, data, steps, lr, seed) and the scheme; written after each one."""
    store = _Cache(cache, context)
    plan_ = _measurement_plan(space)
    accuracy = {}
    for i, (label, key, scheme) in enumerate(plan_, 1):
        cached = store.get(scheme_key(scheme))
        accuracy[key] = cached if cached is not None else store.put(scheme_key(scheme), float(evaluate(scheme)))
        if progress:
            progress(f"[{i}/{len(plan_)}] {label}: {space.metric} {accuracy[key]:.4f}"
                     f"{' (cached)' if cached is not None else ''}")
    return _gains(space, accuracy)


def _measurement_plan(space: SearchSpace) -> list[tuple[str, tuple, dict]]:
    """(label, key, scheme) of every run: head, biases for each k, each weight at each ratio."""
    k_all = space.bias_choices[-1]
    runs = [(space.floor_label, ("bias", 0), space.scheme(0))]
    runs += [(space.bias_label(k), ("bias", k), space.scheme(k)) for k in space.bias_choices if k]
    runs += [(f"{name} {option_label(r)} + {space.bias_label(k_all)}", ("weight", name, r), space.scheme(k_all, {name: r}))
             for name in space.weight_units for r in space.ratios if r]
    return runs


def _gains(space: SearchSpace, accuracy: dict) -> Contributions:
    base, all_biases = accuracy[("bias", 0)], accuracy[("bias", space.bias_choices[-1])]
    bias = {k: accuracy[("bias", k)] - base for k in space.bias_choices}
    weight = {name: {r: accuracy[("weight", name, r)] - all_biases for r in space.ratios if r}
              for name in space.weight_units}
    return Contributions(base, bias, weight)


def option_label(option) -> str:
    """How a unit's choice reads in a log: a channel ratio, or another option (e.g. "lora:8",
    which edgetune.apps.lm_search's spaces offer). 0 (frozen) is never measured."""
    return f"at ratio {option:g}" if isinstance(option, float) else f"as {option}"


def scheme_key(scheme: Mapping[str, Any]) -> str:
    """A stable text key of a scheme. Pattern order does not enter it: the schemes a
    SearchSpace builds name each parameter exactly, so their order never matters."""
    return json.dumps(dict(scheme), sort_keys=True, separators=(",", ":"))


class _Cache:
    """{context: {scheme key: accuracy}} in a JSON file, rewritten atomically on every put."""

    def __init__(self, path: str | None, context: str) -> None:
        self.path, self.context = path, context
        self.data: dict = {"version": 1, "measurements": {}}
        if path and os.path.exists(path):
            self.data = _read_cache(path)
        self.entries = self.data["measurements"].setdefault(context, {})

    def get(self, key: str) -> float | None:
        return self.entries.get(key)

    def put(self, key: str, value: float) -> float:
        self.entries[key] = value
        if self.path:
            write_json(self.path, self.data)
        return value


def _read_cache(path: str) -> dict:
    """A search cache's contents, or a ValueError that names the file and what to do."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a search cache (not JSON: {err}); give another --search-cache path, "
                         "or delete this file to measure again") from None
    if not isinstance(data, dict) or not isinstance(data.get("measurements"), dict):
        raise ValueError(f"{path} is not a search cache (a JSON object with 'measurements'; a scheme file, say); "
                         "give another --search-cache path")
    return data


# -- memory ---------------------------------------------------------------------------------------

class PeakPredictor:
    """The memory plan's predicted peak of a scheme, without a whole compile per scheme: the
    model is exported once; each scheme only differentiates, optimizes and plans (tens of ms
    for MobileNetV2). Equals edgetune.compile(...).report().predicted_peak_bytes, with the same
    `memory_budget`: under one, a scheme's transformer blocks are recomputed in the backward as
    far as it needs (edgetune.compiler.passes.blocks), so a deeper scheme may fit at some time."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, inputs: tuple, targets: tuple, optimizer,
                 passes: list | None = None, memory_budget: int | None = None) -> None:
        from edgetune.compiler.frontend.torch import export  # loads torch.export

        self.model, self.loss_fn, self.optimizer, self.passes = model, loss_fn, optimizer, passes
        self.memory_budget = memory_budget
        self.examples = (_as_tuple(inputs, "inputs"), _as_tuple(targets, "targets"))
        self.forward = export(model, loss_fn, *self.examples)
        self.device = _device_of(model, self.examples[0])
        self._peaks: dict[tuple, int] = {}

    def predict(self, scheme: schemes.SchemeLike) -> int:
        rules = schemes.resolve(scheme, self.model)
        key = (tuple(rules.items()), self.memory_budget)  # Rule is hashable: ratio, selection, LoRA rank count
        if key not in self._peaks:
            graph, _ = training_graph(self.forward, self.model, rules, self.optimizer, self.passes,
                                      memory_budget=self.memory_budget)
            self._peaks[key] = plan(graph, measure_scratch(graph, self.device)).peak_bytes
        return self._peaks[key]

    def measure(self, scheme: schemes.SchemeLike, steps: int = 2) -> int:
        """The measured peak of the same step (edgetune.apps.measure.measure_peak), in bytes."""
        from edgetune.apps.measure import measure_peak

        return measure_peak(self.model, self.loss_fn, *self.examples, scheme, self.optimizer, steps=steps,
                            memory_budget=self.memory_budget)


# -- evolutionary search ------------------------------------------------------------------------

@dataclass
class SearchResult:
    scheme: dict[str, Any]
    predicted_gain: float
    predicted_peak_bytes: int
    history: list[dict] = field(default_factory=list)  # per generation: best gain, its peak, predictions so far
    budget_bytes: int = 0
    measured_peak_bytes: int | None = None  # set by search_verified
    # Where set, the peaks are those of the step compiled with this memory_budget (its blocks
    # recomputed as far as it needs): train the scheme so (search_verified with a fitting predictor).
    memory_budget: int | None = None

    def save(self, path: str) -> str:
        """Write the scheme to `path` as the plain pattern dict that `edgetune finetune --scheme
        FILE` loads, and the search's figures to a side file (returned): the scheme file may
        hold nothing else, since every key of it must name parameters."""
        write_json(path, self.scheme)
        side = side_file(path)
        meta = {"scheme_file": os.path.basename(path), "budget_bytes": self.budget_bytes,
                "predicted_gain": self.predicted_gain, "predicted_peak_bytes": self.predicted_peak_bytes,
                "measured_peak_bytes": self.measured_peak_bytes, "memory_budget": self.memory_budget,
                "history": self.history}
        write_json(side, meta)
        return side


def side_file(scheme_path: str) -> str:
    """Where SearchResult.save puts the search's figures beside the scheme file it writes."""
    return os.path.splitext(scheme_path)[0] + ".search.json"


def search(space: SearchSpace, gains: Contributions, predictor: PeakPredictor, budget_bytes: int, *,
           population: int = 24, generations: int = 15, seed: int = 0, overhead_bytes: int = 0,
           exclude: Iterable[Mapping[str, Any]] = ()) -> SearchResult:
    """The scheme with the largest summed gain whose predicted peak + `overhead_bytes` fits
    `budget_bytes`, other than the schemes in `exclude`. Seeded: the same inputs give the same scheme."""
    evo = _Evolution(space, gains, predictor, budget_bytes - overhead_bytes, random.Random(seed),
                     {scheme_key(s) for s in exclude})
    smallest = evo.peak(evo.zero)
    if smallest > evo.limit:
        raise BudgetError(f"even the smallest scheme ({space.floor_label}) needs {(smallest + overhead_bytes) / MB:.2f} MB "
                          f"({smallest + overhead_bytes} bytes) above the weights, over the budget of "
                          f"{budget_bytes / MB:.2f} MB: the smallest achievable peak")
    if space.size <= population * generations:
        # No more schemes than the evolution would try: try them all, and the answer is exact.
        fitting = [g for g in itertools.product(*(range(n) for n in evo.choices)) if evo.fits(g)]
        best = evo.ranked(fitting or [evo.zero])[0]
        history = [{"exhaustive": True, "best_gain": evo.gain(best), "best_peak_bytes": evo.peak(best),
                    "predictions": len(evo.peaks)}]
        return SearchResult(space.scheme_of(best), evo.gain(best), evo.peak(best), history, budget_bytes)
    members = evo.initial(population)
    history = []
    for generation in range(generations):
        parents = evo.ranked(members)[:max(2, population // 2)]
        members = parents + evo.children(parents, population - len(parents))
        best = evo.ranked(members)[0]
        history.append({"generation": generation, "best_gain": evo.gain(best), "best_peak_bytes": evo.peak(best),
                        "predictions": len(evo.peaks)})
    best = evo.polish(evo.ranked(members)[0], predictions=population * generations)
    history.append({"polished": True, "best_gain": evo.gain(best), "best_peak_bytes": evo.peak(best),
                    "predictions": len(evo.peaks)})
    return SearchResult(space.scheme_of(best), evo.gain(best), evo.peak(best), history, budget_bytes)


def search_verified(space: SearchSpace, gains: Contributions, predictor: PeakPredictor, budget_bytes: int, *,
                    rounds: int = 4, steps: int = 2, **options) -> SearchResult:
    """search(), then measure the result's peak (edgetune.apps.measure); while it is over the budget,
    search again under a lower limit for the prediction. Returns a scheme whose measured peak
    fits: at worst the head alone, which is measured first (BudgetError if even it does not fit).

    The plan counts tensors and kernel scratch, not what else a running step adds (allocator
    slack, library caches, generated code): a few MB that vary from scheme to scheme. The head alone gives the first
    estimate; each scheme measured over the budget is excluded and lowers the limit. A predictor
    with a memory_budget recomputes blocks to fit the limit of each round, and the result says
    which budget to compile it with."""
    head_only = space.scheme(0)
    floor, floor_predicted = predictor.measure(head_only, steps), predictor.predict(head_only)
    if floor > budget_bytes:
        raise BudgetError(f"even the smallest scheme ({space.floor_label}) measures {floor / MB:.2f} MB ({floor} bytes) above the "
                          f"weights, over the budget of {budget_bytes / MB:.2f} MB: the smallest achievable peak")
    limit, checks, over = budget_bytes - max(0, floor - floor_predicted), [], []
    fitting = getattr(predictor, "memory_budget", None) is not None  # a stand-in may have none
    for _ in range(rounds):
        if limit < floor_predicted:
            break  # only the head could fit the lowered limit, and it has measured within the budget
        if fitting:
            predictor.memory_budget = limit
        result = search(space, gains, predictor, budget_bytes, overhead_bytes=budget_bytes - limit, exclude=over,
                        **options)
        result.measured_peak_bytes = predictor.measure(result.scheme, steps)
        result.memory_budget = limit if fitting else None
        checks.append({"limit_bytes": limit, "predicted_peak_bytes": result.predicted_peak_bytes,
                       "measured_peak_bytes": result.measured_peak_bytes})
        if result.measured_peak_bytes <= budget_bytes:
            result.history.append({"measured_checks": checks, "head_only_measured_bytes": floor})
            return result
        over.append(result.scheme)
        limit = _lower_limit(limit, result, budget_bytes, floor_predicted)
    return SearchResult(head_only, gains.bias[0], floor_predicted,
                        [{"measured_checks": checks, "head_only_measured_bytes": floor}], budget_bytes, floor)


def _lower_limit(limit: int, failed: SearchResult, budget_bytes: int, floor: int) -> int:
    """The next limit for predictions after `failed` measured over the budget: lower by its
    excess (the overhead was underestimated), or where that would leave only the head, just
    below the failed prediction (the overhead of that scheme alone was unusual)."""
    by_excess = limit - (failed.measured_peak_bytes - budget_bytes)
    return by_excess if by_excess > floor else min(limit, failed.predicted_peak_bytes - 1)


class _Evolution:
    """Genomes, their gains and (cached) predicted peaks, and the ways to make new ones."""

    def __init__(self, space: SearchSpace, gains: Contributions, predictor: PeakPredictor, limit: int,
                 rng: random.Random, excluded: set[str]) -> None:
        self.space, self.predictor, self.limit, self.rng, self.excluded = space, predictor, limit, rng, excluded
        self.choices = [len(space.bias_choices)] + [len(space.ratios)] * len(space.weight_units)
        self.zero: Genome = (0,) * len(self.choices)
        self.gene_gains = _gene_gains(space, gains)
        self.peaks: dict[Genome, int] = {}

    def gain(self, genome: Genome) -> float:
        return sum(table[g] for table, g in zip(self.gene_gains, genome))

    def peak(self, genome: Genome) -> int:
        if genome not in self.peaks:
            self.peaks[genome] = self.predictor.predict(self.space.scheme_of(genome))
        return self.peaks[genome]

    def fits(self, genome: Genome) -> bool:
        if self.excluded and scheme_key(self.space.scheme_of(genome)) in self.excluded:
            return False
        return self.peak(genome) <= self.limit

    def ranked(self, genomes: list[Genome]) -> list[Genome]:
        # Ties go to the smaller peak, then to the genome itself, so the order is reproducible.
        return sorted(set(genomes), key=lambda g: (-self.gain(g), self.peak(g), g))

    def initial(self, population: int) -> list[Genome]:
        members = [self.zero, self.greedy()]
        for _ in range(population * 10):
            if len(set(members)) >= population:
                break
            genome = self.random_genome()
            if self.fits(genome):
                members.append(genome)
        return list(dict.fromkeys(members))

    def random_genome(self) -> Genome:
        # Half the weight genes frozen: a random dense genome rarely fits a tight budget.
        k = self.rng.randrange(self.choices[0])
        return (k, *(self.rng.randrange(1, n) if n > 1 and self.rng.random() < 0.5 else 0 for n in self.choices[1:]))

    def greedy(self) -> Genome:
        """Raise one gene at a time by the best gain that still fits: a strong first member.
        A raise that does not fit is not tried again (more training rarely needs less memory)."""
        genome, ruled_out = self.zero, set()
        while True:
            raises = sorted(((self.gain(c) - self.gain(genome), i, c) for i, c in self._raises(genome)
                             if (i, c[i]) not in ruled_out), key=lambda r: (-r[0], r[1], r[2]))
            for delta, i, candidate in raises:
                if delta <= 0:
                    return genome
                if self.fits(candidate):
                    genome = candidate
                    break
                ruled_out.add((i, candidate[i]))
            else:
                return genome

    def _raises(self, genome: Genome):
        for i, n in enumerate(self.choices):
            for value in range(genome[i] + 1, n):
                yield i, genome[:i] + (value,) + genome[i + 1:]

    def polish(self, genome: Genome, predictions: int) -> Genome:
        """Local search from `genome`: the change of one gene, or of two at once (one down: memory
        moved from one layer to another), with the largest gain that still fits, until none
        does or `predictions` new peaks have been predicted. The evolution gets near the best;
        this finishes the way there."""
        start = len(self.peaks)
        while True:
            near = {self._changed(genome, {i: v}) for i, n in enumerate(self.choices) for v in range(n)}
            near |= {self._changed(genome, {i: v, j: w}) for i, n in enumerate(self.choices) for v in range(n)
                     for j in range(len(self.choices)) if j != i for w in range(genome[j])}
            better = sorted((g for g in near if self.gain(g) > self.gain(genome)), key=lambda g: (-self.gain(g), g))
            for candidate in better:
                if len(self.peaks) - start >= predictions:
                    return genome
                if self.fits(candidate):
                    genome = candidate
                    break
            else:
                return genome

    @staticmethod
    def _changed(genome: Genome, genes: dict[int, int]) -> Genome:
        return tuple(genes.get(i, g) for i, g in enumerate(genome))

    def children(self, parents: list[Genome], count: int) -> list[Genome]:
        seen, born = set(parents), []
        for _ in range(count * 10):
            if len(born) >= count:
                break
            a, b = self.rng.sample(parents, 2) if len(parents) > 1 else (parents[0], parents[0])
            child = self.mutate(self.crossover(a, b) if self.rng.random() < 0.5 else a)
            if child not in seen and self.fits(child):
                seen.add(child)
                born.append(child)
        return born

    def crossover(self, a: Genome, b: Genome) -> Genome:
        return tuple(x if self.rng.random() < 0.5 else y for x, y in zip(a, b))

    def mutate(self, genome: Genome) -> Genome:
        """Change one gene for sure and each other with probability 1/len, to another value."""
        genes, sure = list(genome), self.rng.randrange(len(genome))
        for i, n in enumerate(self.choices):
            if n > 1 and (i == sure or self.rng.random() < 1 / len(genome)):
                genes[i] = self.rng.choice([v for v in range(n) if v != genes[i]])
        return tuple(genes)


def _gene_gains(space: SearchSpace, gains: Contributions) -> list[list[float]]:
    """Per gene, the gain of each of its values (the search's sums are then table look-ups)."""
    try:
        bias = [gains.bias[k] for k in space.bias_choices]
        weights = [[0.0] + [gains.weight[name][r] for r in space.ratios[1:]] for name in space.weight_units]
    except KeyError as missing:
        raise KeyError(f"the contributions lack {missing}: were they measured for this search space?") from None
    return [bias, *weights]
