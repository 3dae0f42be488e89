"""A fine-tuning job: a model (pretrained or built-in), its data split into train and held-out,
and the function that turns raw data items into the model's inputs.

    job = build_job("mobilenetv2-imagenet", "fashion-mnist", size=96, train_limit=3000)
    trainer = edgetune.compile(job.model, job.loss_fn, *job.example(32), scheme=..., optimizer=...)

Shared by `edgetune finetune`, `edgetune search` and the demo, so that all three see the
same data, preprocessing and head.
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from edgetune.apps.finetune import Prepare, fit_batch, image_task, text_task
from edgetune.compiler.optim import by_name

# Normalisation for built-in models trained from scratch: inputs scaled to about [-1, 1].
_FROM_SCRATCH_MEAN, _FROM_SCRATCH_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@dataclass
class Job:
    model_name: str
    data_name: str
    model: torch.nn.Module
    head: str  # module name of the (new) classifier, always trained
    train: object  # edgetune.data.LabeledData
    val: object
    prepare: Prepare
    describe_input: str
    loss_fn: Callable = field(default=F.cross_entropy)

    def example(self, batch_size: int) -> tuple[tuple, tuple]:
        """(inputs, targets) of one training batch, to compile the step for."""
        if not 0 < batch_size <= len(self.train):
            raise ValueError(f"a batch of {batch_size} needs that many training items, and there are "
                             f"{len(self.train)}: clip it with edgetune.apps.finetune.fit_batch")
        items, labels = next(iter(self.train.batches(batch_size, shuffle=False)))
        return self.prepare(items, True), (labels,)


def build_job(model: str, data: str, *, size: int | None = None, max_len: int | None = None,
              val_data: str | None = None, val_fraction: float = 0.2, train_limit: int | None = None,
              val_limit: int | None = None, seed: int = 0, augment: bool = True, strict: bool = False) -> Job:
    """Load `data`, hold out a split, and build `model` with a head for its classes. An image
    folder's unreadable or non-image files are skipped and counted, or with `strict` an error."""
    train, val = _splits(data, val_data, val_fraction, seed, strict)
    _check_classes(data, train)
    if train_limit:
        train = train.take(min(train_limit, len(train)), seed=seed)
    if val_limit:
        val = val.take(min(val_limit, len(val)), seed=seed)
    net, head, prepare, describe = _model_and_task(model, len(train.classes), size, max_len, augment)
    _check_kind(model, data, train, prepare_is_text=describe.startswith("text"))
    net.eval()  # eval-mode norms: a pretrained BN keeps its running statistics (and folds away)
    if not describe.startswith("text"):
        check_input_fits(net, prepare(train.items[:1], False), describe.split(",")[0])
    return Job(model, data, net, head, train, val, prepare, describe)


def _splits(data: str, val_data: str | None, val_fraction: float, seed: int, strict: bool):
    from edgetune.data import load_data

    if val_data:
        train = _loaded_for_training(data, load_data(data, split="train", strict=strict))
        # A held-out .csv is read against the training classes, so that an unknown label is named by its line.
        val = load_data(val_data, split="test", strict=strict, classes=train.classes)
        if val.classes != train.classes:  # labels are indices into each one's own class list
            raise ValueError(f"--val-data {val_data!r} has classes {val.classes}, but {data!r} has "
                             f"{train.classes}: both must have the same classes")
        return train, val
    if data == "fashion-mnist" or Path(data, "train").is_dir():  # sources with their own test split
        train = _loaded_for_training(data, load_data(data, split="train", strict=strict))
        return train, load_data(data, split="test", strict=strict)
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    return _loaded_for_training(data, load_data(data, strict=strict)).split(val_fraction, seed=seed)


def _loaded_for_training(data: str, loaded):
    """`loaded`, once every class has an item: a class with none (an empty class folder, or one
    whose every file was skipped as unreadable) could never be learned. Checked before any
    split, so that the error does not blame the held-out split."""
    present = set(loaded.labels.tolist())
    empty = [c for i, c in enumerate(loaded.classes) if i not in present]
    if empty:
        raise ValueError(f"class(es) {empty} of {data!r} have no items at all (an empty class folder, or every file "
                         "in it skipped?): add items for them, or remove them")
    return loaded


def _check_classes(data: str, train) -> None:
    """A classifier needs two classes, and a class without a training item cannot be learned."""
    if len(train.classes) < 2:
        raise ValueError(f"{data!r} holds a single class ({train.classes}): a classifier needs at least two; "
                         "add a sub-folder of images for each class")
    present = set(train.labels.tolist())
    missing = [c for i, c in enumerate(train.classes) if i not in present]
    if missing:
        raise ValueError(f"class(es) {missing} of {data!r} have no training item (their only items were held "
                         "out): give every class at least 2 items, or pass --val-data")


def check_input_fits(model: torch.nn.Module, inputs: tuple, what: str) -> None:
    """One plain forward pass of one item, before compiling: an input the model cannot take (an
    image smaller than its kernels or patches) is reported as such, not as a compiler error."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*(x[:1] for x in inputs))
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[0]
        raise ValueError(f"the model cannot take {what} ({reason}); try a larger --size") from err
    finally:
        model.train(was_training)


def _model_and_task(name: str, num_classes: int, size: int | None, max_len: int | None, augment: bool):
    from edgetune.models import MODELS, build
    from edgetune.models.pretrained import PRETRAINED, load_pretrained

    if name in PRETRAINED:
        p = load_pretrained(name, num_classes, **({"max_len": max_len} if max_len else {}))
        if p.kind == "text":
            return p.model, p.head, text_task(p.tokenizer), f"text, {p.max_len} tokens"
        side = size or p.image_size
        return p.model, p.head, image_task(side, p.mean, p.std, augment), f"images {side}x{side}"
    if name in MODELS:
        side = size or 64
        # A ViT's position embeddings are sized for one image side: build it for this one.
        model = build(name, num_classes=num_classes, **({"image_size": side} if name == "vit" else {}))
        prepare = image_task(side, _FROM_SCRATCH_MEAN, _FROM_SCRATCH_STD, augment)
        return model, _last_linear(model), prepare, f"images {side}x{side}, random init"
    raise ValueError(f"unknown model {name!r}; pretrained: {sorted(PRETRAINED)}; built-in (random init): "
                     f"{sorted(MODELS)}")


def _last_linear(model: torch.nn.Module) -> str:
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError("the model has no Linear layer to serve as the classifier head")
    return linears[-1]


def _check_kind(model: str, data: str, train, prepare_is_text: bool) -> None:
    data_is_text = isinstance(train.items, list)
    if data_is_text != prepare_is_text:
        raise ValueError(f"model {model!r} takes {'text' if prepare_is_text else 'images'} but data {data!r} "
                         f"holds {'text' if data_is_text else 'images'}")


# -- searching a scheme for a job -----------------------------------------------------------

@dataclass
class SearchSettings:
    """How contributions are measured: each candidate scheme trains `steps` steps from the
    pretrained weights on part of the training data and is scored on another part (never on
    the held-out split of the job). Cached per job and settings."""

    batch: int = 32
    lr: float = 0.003
    optimizer: str = "sgd"
    steps: int = 50
    score_items: int = 1000
    ratios: tuple = (0.0, 0.125, 0.25, 0.5, 1.0)
    cache: str = os.path.join("runs", "search-cache.json")
    seed: int = 0
    weights: str | None = None  # fnmatch over module names of weight candidates (default: see search_space)
    # "layers": the Tiny Training Engine's space (biases of the last k layers, the later half's
    # weights at channel ratios); "blocks": edgetune.apps.lm_search's, over every transformer
    # block in `bands` bands, with LoRA ranks as options too; "auto": blocks where the model has them.
    space: str = "auto"
    bands: int = 3
    lora_ranks: tuple = ()
    # Contribution runs per candidate, each with another draw and order of the training items
    # (seeds seed, seed+1, ...): the search uses their mean gain and logs their spread.
    seeds: int = 1
    # Schemes may fit the budget by recomputing transformer blocks in the backward (compiled
    # under SearchResult.memory_budget): deeper schemes fit, each recomputed block costing a forward.
    recompute_blocks: bool = False
    # What a contribution run is scored by on its scoring items: "accuracy", or "loss" (minus the
    # mean cross-entropy; finer-grained where short runs barely move the accuracy).
    score: str = "accuracy"


SCORES = ("accuracy", "loss")


def search_job(job: Job, budget_bytes: int, settings: SearchSettings | None = None, log=print):
    """The best scheme for `job` whose measured peak (edgetune.apps.measure) fits `budget_bytes`
    above the weights; contributions come from short runs, or from the cache."""
    from edgetune.compiler.isolate import run_isolated
    from edgetune.apps.search import PeakPredictor, search_verified

    s = settings or SearchSettings()
    space, gains = measure_contributions(job, s, log)
    optimizer = by_name(s.optimizer, s.lr)
    # The peak is predicted for the batch fine-tuning will use: the whole training split at most.
    inputs, targets = job.example(fit_batch(s.batch, len(job.train), log=log))
    # The predictor loads torch.export; a forked child keeps it out of the training process.
    fit_to = budget_bytes if s.recompute_blocks else None
    return run_isolated(lambda: search_verified(space, gains, PeakPredictor(job.model, job.loss_fn, inputs, targets,
                                                                            optimizer, memory_budget=fit_to),
                                                budget_bytes),
                        torch.device("cpu"))


def measure_contributions(job: Job, settings: SearchSettings, log=print):
    """(search space, contributions) of `job`: one short run per candidate, or the cache's."""
    from edgetune.apps.lm_search import seeded_contributions
    from edgetune.apps.search import contributions

    s = settings
    if s.seeds < 1:
        raise ValueError(f"the search needs at least one seed of contribution runs, got {s.seeds}")
    if s.score not in SCORES:
        raise ValueError(f"unknown contribution score {s.score!r}: use one of {', '.join(SCORES)}")
    space = search_space(job, s)
    log(f"search space: {space.describe()}")
    rest, score = _scoring_split(job, s)  # the same scoring items for every seed
    batch = fit_batch(s.batch, len(rest), "training items left for the search's short runs", log)

    def run_with_seed(seed: int):
        train = rest.take(min(len(rest), s.steps * batch), seed=seed)
        return _short_run(job, replace(s, seed=seed), train, score, batch)

    seeds = range(s.seed, s.seed + s.seeds)
    progress = lambda line: log(f"  {line}")  # noqa: E731
    if len(seeds) == 1:
        return space, contributions(space, run_with_seed(s.seed), cache=s.cache,
                                    context=f"{_context(job, s, batch)} | seed {s.seed}", progress=progress)
    # Each seed is cached under the same key as a one-seed search with that seed.
    gains = seeded_contributions(space, run_with_seed, seeds, cache=s.cache, context=_context(job, s, batch),
                                 progress=progress)
    log(f"contributions over seeds {list(seeds)}: {gains.noise_summary()}")
    return space, gains.mean


def search_space(job: Job, settings: SearchSettings):
    """The candidates of `job`'s search (settings.space): the head always trains."""
    from edgetune.apps.search import SearchSpace

    if settings.space not in ("auto", "layers", "blocks"):
        raise ValueError(f"unknown search space {settings.space!r}: use auto, layers or blocks")
    metric = "accuracy" if settings.score == "accuracy" else "score (minus the loss)"
    if settings.space == "layers" or (settings.space == "auto" and not _has_blocks(job.model)):
        space = SearchSpace.from_model(job.model, head=job.head, ratios=settings.ratios,
                                       weight_filter=_weight_filter(job.model, settings.weights))
        return replace(space, metric=metric)
    from edgetune.apps.lm_search import LMSearchSpace

    head = [n for n, _ in job.model.named_parameters() if n.startswith(job.head + ".")]
    return LMSearchSpace.from_model(job.model, bands=settings.bands, ratios=settings.ratios,
                                    lora_ranks=settings.lora_ranks, floor=head, metric=metric)


def _has_blocks(model: torch.nn.Module) -> bool:
    from edgetune.compiler.scheme import SchemeError, transformer_blocks

    try:
        return bool(transformer_blocks(model, "the search"))
    except SchemeError:
        return False


def _scoring_split(job: Job, s: SearchSettings):
    """(items to train the short runs on, items to score them on): both from the training
    split, so that the job's held-out split stays unseen by the search."""
    if len(job.train) < 2:
        raise ValueError(f"the search trains on part of the training split and scores on the rest, so it needs at "
                         f"least 2 training items, and there are {len(job.train)}: add data")
    return job.train.split(min(0.5, s.score_items / len(job.train)), seed=s.seed + 1)


def _short_run(job: Job, s: SearchSettings, train, score, batch: int) -> Callable[[dict], float]:
    """evaluate(scheme) -> its score after a short run (s.score: accuracy, or minus the loss),
    the weights and random state restored afterwards."""
    from edgetune.apps.finetune import finetune
    from edgetune.apps.lm_search import WORST_LOSS
    from edgetune.apps.search import seeded_run
    from edgetune.compiler.isolate import warm_forked_compiles
    from edgetune.compiler.trainer import compile as compile_step

    initial = {k: v.clone() for k, v in job.model.state_dict().items()}
    generators = getattr(job.prepare, "generators", {}).values()

    def run(scheme: dict) -> float:
        with seeded_run(s.seed, generators):
            return _scored(scheme)

    def _scored(scheme: dict) -> float:
        try:
            inputs, targets = job.example(batch)
            warm_forked_compiles(job.model, job.loss_fn, inputs, targets)  # once: every candidate compiles
            trainer = compile_step(job.model, job.loss_fn, inputs, targets, scheme=scheme,
                                   optimizer=by_name(s.optimizer, s.lr))
            history = finetune(trainer, train, score, job.prepare, epochs=1, batch_size=batch, lr=s.lr,
                               schedule="constant", seed=s.seed, progress=False, evaluate_before=False,
                               log=lambda line: None)
            scored = history.evals[-1]  # the epoch's end, on the scoring items, adapters merged
            if s.score == "accuracy":
                return scored["accuracy"]
            return -(scored["loss"] if scored["loss"] < WORST_LOSS else WORST_LOSS)  # nan too
        except FloatingPointError:
            # diverged: this candidate gains nothing at this learning rate
            return 0.0 if s.score == "accuracy" else -WORST_LOSS
        finally:
            job.model.load_state_dict(initial)

    return run


def _context(job: Job, s: SearchSettings, batch: int) -> str:
    scored = f"{s.score_items} scored" + ("" if s.score == "accuracy" else " by minus the loss")
    return (f"{job.model_name} | {job.data_name} ({len(job.train)} train) | {job.describe_input} | batch {batch} | "
            f"{s.optimizer} lr {s.lr:g} | {s.steps} steps | {scored}")


def _weight_filter(model: torch.nn.Module, pattern: str | None):
    """Weight candidates: those matching `pattern`; by default, in a net with depthwise convs,
    the first pointwise conv of each block (the paper's finding); else every conv/linear."""
    if pattern:
        return lambda name, module: fnmatch.fnmatchcase(name, pattern)
    return "pw1" if _has_depthwise(model) else None


def _has_depthwise(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 for m in model.modules())
