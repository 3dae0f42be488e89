"""The fine-tuning table of RESULTS.md: one pretrained model on one real dataset under several
schemes, each with its learning rate tuned the same way, its accuracy on the test split and
its measured peak memory.

    python -m experiments.finetune_table vision            # MobileNetV2-ImageNet -> Fashion-MNIST
    python -m experiments.finetune_table text              # MiniLM-L6 -> Rotten Tomatoes
    python -m experiments.finetune_table vision --rows full bias_only --quick
    python -m experiments.finetune_table text --rows full@adafactor   # a row with another optimizer

Protocol, the same for every row of a task: the learning rate is chosen from the task's grid
by a short run (1 epoch) on 80% of the training subset, scored on the other 20% (never on the
test split); where the best rate is the grid's lowest or highest, one 3x beyond that edge is
tried too, up to `max_extensions` times, so that a tuned rate is not an edge. Then the row
trains `epochs` epochs on the whole training subset with that rate, once per seed of the
task (the seed orders the batches and draws the new head), and is scored on the test split:
the mean over the seeds, with their standard deviation. Peak = memory of a training step above the weights, measured
in a forked process (edgetune.apps.measure). Results go to experiments/results/<task>.json, one
entry per row, re-run rows replace old ones; `python -m experiments.report` writes RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace

import torch

import edgetune as et
from edgetune.apps.finetune import finetune
from edgetune.apps.jobs import build_job
from edgetune.compiler.optim import by_name
from edgetune.files import write_json
from experiments.children import choose_lr

RESULTS = os.path.join(os.path.dirname(__file__), "results")


@dataclass
class Task:
    model: str
    data: str
    optimizer: str
    lrs: list[float]
    # scheme specs; "auto:<fraction of full's peak>[:<space>][:recompute]" is a searched scheme
    # (recompute: it may fit by recomputing transformer blocks in the backward). A spec may end
    # in "@<optimizer>": that row (its search's short runs too) trains with it, over its grid
    # in optimizer_lrs; a searched row's budget is still a fraction of the "full" row's peak.
    rows: list[str]
    epochs: int = 3
    batch: int = 32
    size: int | None = None
    max_len: int | None = None
    train_limit: int | None = None
    test_limit: int | None = None
    search_ratios: tuple = (0.0, 0.125, 0.25, 0.5, 1.0)
    search_weights: str | None = None  # module-name pattern of weight candidates (default: edgetune's)
    search_steps: int = 50  # training steps of each contribution run
    # edgetune.apps.jobs.SearchSettings.space: "layers" (the Tiny Training Engine's) or "blocks"
    # (every transformer block, in search_bands bands, LoRA ranks search_lora as options too).
    # A row "auto:<fraction>:<space>" overrides it.
    search_space: str = "layers"
    # Named spaces a row may pick instead ("auto:0.25:<name>"): SearchSettings fields that
    # differ from the task's (e.g. more kinds of weights or channel ratios).
    search_variants: dict = field(default_factory=dict)
    search_bands: int = 3
    search_lora: tuple = ()
    search_seeds: int = 1  # contribution runs per candidate (their mean gain is searched)
    seeds: tuple = (0,)  # the final training's seeds
    max_extensions: int = 4  # how often the rate grid may grow past an edge best
    optimizer_lrs: dict = field(default_factory=dict)  # the rate grid of a row's other optimizer


TASKS = {
    "vision": Task("mobilenetv2-imagenet", "fashion-mnist", "sgd", [0.001, 0.003, 0.01],
                   ["full", "last:6", "bias_only", "mbv2-99kb", "auto:0.205", "auto:0.215", "auto:0.25", "auto:0.3",
                    "auto:0.5"],
                   size=96, train_limit=6000, test_limit=3000),
    "text": Task("minilm-l6", "rotten-tomatoes", "adamw", [1e-4, 3e-4, 1e-3],
                 ["full", "experiments/schemes/minilm-frozen-word-embeddings.json", "lora:8:query,value,alpha=16",
                  "last:8", "bias_only", "experiments/schemes/bert-sparse.json", "auto:0.25:layers", "auto:0.25",
                  "auto:0.5", "auto:0.25:blocks:recompute", "auto:0.25:blocks-ratios:recompute",
                  "auto:0.25:blocks-loss:recompute", "full@adafactor", "auto:0.25:blocks:recompute@adafactor"],
                 epochs=2, max_len=32,
                 train_limit=2000, test_limit=2000, search_ratios=(0.0, 0.25, 1.0), search_weights="encoder.layer.*.[qvi]*",
                 search_steps=30, search_space="blocks", search_bands=6, search_lora=(8,), search_seeds=2,
                 seeds=(0, 1, 2),
                 # Adafactor's rate is relative to each tensor's RMS (about 0.04 for these weights)
                 optimizer_lrs={"adafactor": [1e-3, 3e-3, 1e-2]},
                 # the blocks space (every linear of every block) at the four channel ratios; the
                 # blocks space with contributions scored by held-back loss instead of accuracy
                 search_variants={"blocks-ratios": {"space": "blocks", "ratios": (0.0, 0.125, 0.25, 0.5, 1.0)},
                                  "blocks-loss": {"space": "blocks", "score": "loss"}}),
}


def row_task(task: Task, spec: str) -> tuple[Task, str]:
    """(the task as row `spec` runs it, the spec's scheme): "<scheme>@<optimizer>" trains with
    that optimizer over its own rate grid; a plain spec with the task's."""
    scheme, at, optimizer = spec.partition("@")
    if not at:
        return task, spec
    by_name(optimizer, 1e-3)  # an unknown name fails here, before any run
    if optimizer not in task.optimizer_lrs:
        raise ValueError(f"row {spec!r}: the task has no rate grid for {optimizer!r} (Task.optimizer_lrs)")
    return replace(task, optimizer=optimizer, lrs=list(task.optimizer_lrs[optimizer])), scheme


def job_for(task: Task, seed: int = 0):
    return build_job(task.model, task.data, size=task.size, max_len=task.max_len, train_limit=task.train_limit,
                     val_limit=task.test_limit, seed=seed)


def scheme_for(task: Task, spec: str, full_peak: int | None, args):
    """A scheme spec: a preset or file (see `edgetune finetune --scheme`), or
    auto:<fraction of full's peak>[:<search space>][:recompute]."""
    if not spec.startswith("auto:"):
        return et.schemes.parse(spec), {}
    if full_peak is None:
        raise ValueError("a searched row needs the full row's measured peak first: run the 'full' row")
    from edgetune.apps.jobs import search_job

    fraction, space, recompute = searched_row(task, spec)
    budget = int(fraction * full_peak)
    torch.manual_seed(0)  # the new head as a seed-0 row draws it, in whichever process searches
    found = search_job(job_for(task), budget, replace(search_settings(task, args, space), recompute_blocks=recompute))
    return found.scheme, {"budget_bytes": budget, "search_space": space, "memory_budget": found.memory_budget,
                          "search_predicted_peak_bytes": found.predicted_peak_bytes,
                          "search_measured_peak_bytes": found.measured_peak_bytes,
                          "search_predicted_gain": found.predicted_gain}


def searched_row(task: Task, spec: str) -> tuple[float, str, bool]:
    """"auto:0.25" -> (0.25, the task's search space, False); "auto:0.25:layers" -> (0.25,
    "layers", False); "auto:0.25:blocks:recompute" -> (0.25, "blocks", True)."""
    _, fraction, *rest = spec.split(":")
    recompute = rest[-1:] == ["recompute"]
    space = rest[:-1] if recompute else rest
    return float(fraction), space[0] if space else task.search_space, recompute


def search_settings(task: Task, args, space: str | None = None):
    """The task's search settings; `space`: a SearchSettings.space or one of task.search_variants."""
    from edgetune.apps.jobs import SearchSettings

    settings = SearchSettings(batch=task.batch, lr=task.lrs[len(task.lrs) // 2], optimizer=task.optimizer,
                              steps=20 if args.quick else task.search_steps, ratios=task.search_ratios,
                              weights=task.search_weights, space=space or task.search_space, bands=task.search_bands,
                              lora_ranks=task.search_lora, seeds=task.search_seeds,
                              cache=os.path.join(RESULTS, "search-cache.json"))
    return replace(settings, **task.search_variants.get(space, {}))


def train_once(task: Task, scheme, lr: float, epochs: int, tuning: bool, seed: int = 0, memory_budget=None):
    """Fresh pretrained weights, one run (seed: the head's draw and the batches' order);
    returns (job, trainer, history). `memory_budget`: a searched scheme's (its blocks recomputed)."""
    torch.manual_seed(seed)
    job = job_for(task)
    if tuning:  # choose the rate on part of the training data, never on the test split
        job.train, job.val = job.train.split(0.2, seed=1)
    inputs, targets = job.example(task.batch)
    trainer = et.compile(job.model, job.loss_fn, inputs, targets, scheme=et.schemes.with_head(scheme, job.head),
                         optimizer=by_name(task.optimizer, lr), memory_budget=memory_budget)
    history = finetune(trainer, job.train, job.val, job.prepare, epochs=epochs, batch_size=task.batch, lr=lr,
                       seed=seed, evaluate_before=False, log=lambda line: None, progress=False)
    return job, trainer, history


def run_row(task: Task, spec: str, full_peak: int | None, args) -> dict:
    """One row, in a process of its own (see main): the peak is measured first, by a fork of a
    process whose heap no training has fragmented yet."""
    from edgetune.apps.measure import measure_peak

    start = time.perf_counter()
    task, scheme_spec = row_task(task, spec)
    scheme, info = scheme_for(task, scheme_spec, full_peak, args)
    job = job_for(task)
    inputs, targets = job.example(task.batch)
    budget = info.get("memory_budget")
    peak = measure_peak(job.model, job.loss_fn, inputs, targets, et.schemes.with_head(scheme, job.head),
                        by_name(task.optimizer, task.lrs[0]), memory_budget=budget)
    lr, tuning = tune_lr(task, lambda rate: _tuning_accuracy(task, scheme, rate, spec, budget))
    accuracies, per_epoch, seconds = [], [], []
    for seed in task.seeds:
        job, trainer, history = train_once(task, scheme, lr, epochs=task.epochs, tuning=False, seed=seed,
                                           memory_budget=budget)
        # the run's last evaluation is on the test split, with LoRA adapters folded in
        # (evaluating job.model itself would score the bare weights)
        accuracies.append(history.final["accuracy"])
        per_epoch.append([e["accuracy"] for e in history.evals])
        seconds.append(history.seconds)
        print(f"  {spec}: seed {seed} -> {100 * accuracies[-1]:.2f}% (test split)", flush=True)
    report = trainer.report()
    return {"scheme": spec, "lr": lr, "tuning": {str(k): v for k, v in tuning.items()},
            "accuracy": statistics.fmean(accuracies), "accuracies": accuracies,
            "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "seeds": list(task.seeds), "per_epoch": per_epoch, "measured_peak_bytes": peak,
            "predicted_peak_bytes": report.predicted_peak_bytes, "trainable_params": trainer.trainable_params,
            "total_params": sum(p.numel() for p in job.model.parameters()), "train_seconds": statistics.fmean(seconds),
            "row_seconds": time.perf_counter() - start, "rules": _rules(trainer), "optimizer": task.optimizer,
            **info}


def tune_lr(task: Task, accuracy_at) -> tuple[float, dict[float, float]]:
    """(the rate with the best tuning accuracy, every rate tried -> its accuracy): the task's
    grid, grown 3x past an edge best up to task.max_extensions times (children.choose_lr)."""
    tuning = {lr: accuracy_at(lr) for lr in task.lrs}
    while True:
        # choose_lr minimises a loss: a diverged run (nan) counts as the worst
        best, extra = choose_lr(list(tuning), {lr: -a if a == a else math.inf for lr, a in tuning.items()})
        if extra is None or len(tuning) >= len(task.lrs) + task.max_extensions:
            return best, tuning
        tuning[extra] = accuracy_at(extra)


def _tuning_accuracy(task: Task, scheme, lr: float, spec: str, memory_budget=None) -> float:
    try:
        accuracy = train_once(task, scheme, lr, epochs=1, tuning=True, memory_budget=memory_budget)[2].final["accuracy"]
    except FloatingPointError:
        accuracy = float("nan")
    print(f"  {spec}: lr {lr:g} -> {100 * accuracy:.2f}% (tuning split)", flush=True)
    return accuracy


def _rules(trainer) -> dict:
    """The resolved scheme (exact names; LoRA and channel rules kept as such), as --remeasure reads it."""
    from edgetune.compiler.scheme import as_mapping

    return as_mapping(trainer.rules)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=sorted(TASKS))
    p.add_argument("--rows", nargs="+", help="scheme specs, one argument each (default: the task's rows)")
    p.add_argument("--quick", action="store_true", help="tiny data and one epoch: checks the pipeline, not a result")
    p.add_argument("--remeasure", action="store_true",
                   help="measure the peak of every stored row again (its resolved scheme), nothing else")
    p.add_argument("--row-process", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--contributions-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--search-space", help=argparse.SUPPRESS)  # the space --contributions-only measures
    args = p.parse_args(argv)
    task = TASKS[args.task]
    if args.quick:
        task.train_limit, task.test_limit, task.epochs, task.lrs = 320, 200, 1, task.lrs[1:2]
        task.seeds, task.max_extensions = task.seeds[:1], 0
        task.optimizer_lrs = {name: grid[1:2] for name, grid in task.optimizer_lrs.items()}
    if args.remeasure:
        return remeasure(args)
    if args.contributions_only:
        from edgetune.apps.jobs import measure_contributions

        row, _ = row_task(task, args.rows[0])
        measure_contributions(job_for(row), search_settings(row, args, args.search_space))
        return 0
    path = os.path.join(RESULTS, f"{args.task}{'-quick' if args.quick else ''}.json")
    results = _load(path)
    meta = {"task": vars(task), "date": time.strftime("%Y-%m-%d"), "cpu": _cpu(),
            "threads": torch.get_num_threads()}
    specs = args.rows or task.rows
    if args.row_process:  # the child of the loop below: one row, result as JSON on the last line
        (spec,) = specs
        full_peak = results.get("full", {}).get("measured_peak_bytes")
        row, scheme_spec = row_task(task, spec)
        if scheme_spec.startswith("auto:"):
            _fill_contribution_cache(args, spec, searched_row(row, scheme_spec)[1])
        print(json.dumps(run_row(task, spec, full_peak, args)))
        return 0
    for spec in specs:
        print(f"{args.task}: {spec}", flush=True)
        try:
            results[spec] = _in_fresh_process(args, spec)
        except RowFailed as err:  # recorded, and the other rows still run
            print(f"  {spec} failed: {err}", flush=True)
            results[spec] = {"scheme": spec, "error": str(err)}
            write_json(path, {"meta": meta, "rows": results})
            continue
        r = results[spec]
        print(f"  -> {100 * r['accuracy']:.2f}% at lr {r['lr']:g}, peak {r['measured_peak_bytes'] / 2**20:.1f} MB "
              f"(predicted {r['predicted_peak_bytes'] / 2**20:.1f}), {r['row_seconds']:.0f}s", flush=True)
        write_json(path, {"meta": meta, "rows": results})
    return 0


class RowFailed(RuntimeError):
    """A row's process exited with an error (its last line of stderr is the message)."""


def _in_fresh_process(args, spec: str) -> dict:
    """run_row in a new interpreter: nothing an earlier row allocated can hide in (or inflate)
    the next row's measured peak."""
    cmd = [sys.executable, "-m", "experiments.finetune_table", args.task, "--rows", spec, "--row-process"]
    out = subprocess.run(cmd + (["--quick"] if args.quick else []), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    if out.returncode:
        raise RowFailed((out.stderr.strip().splitlines() or ["no message"])[-1])
    lines = out.stdout.strip().splitlines()
    print("\n".join(lines[:-1]), flush=True)
    return json.loads(lines[-1])


def _fill_contribution_cache(args, spec: str, space: str) -> None:
    """Contribution runs train (and fragment the heap) for minutes; do them in another process
    so that this one, which measures, only reads their cached results (row `spec`'s optimizer's)."""
    cmd = [sys.executable, "-m", "experiments.finetune_table", args.task, "--rows", spec, "--contributions-only",
           "--search-space", space]
    subprocess.run(cmd + (["--quick"] if args.quick else []), check=True, stdout=sys.stderr)


def remeasure(args) -> int:
    """Measure each stored row's peak again with the current edgetune.apps.measure, so that every
    row of a table comes from the same method."""
    from edgetune.apps.measure import measure_peak

    task, path = TASKS[args.task], os.path.join(RESULTS, f"{args.task}.json")
    with open(path) as f:
        data = json.load(f)
    job = job_for(task)
    inputs, targets = job.example(task.batch)
    for spec, row in data["rows"].items():
        if "error" in row:
            continue
        scheme = {name: rule for name, rule in row["rules"].items()}  # resolved: names, "full" or a ratio
        row["measured_peak_bytes"] = measure_peak(job.model, job.loss_fn, inputs, targets, scheme,
                                                  by_name(row.get("optimizer", task.optimizer), row["lr"]),
                                                  memory_budget=row.get("memory_budget"))
        print(f"{spec}: {row['measured_peak_bytes'] / 2**20:.1f} MB", flush=True)
        write_json(path, data)
    return 0


def _load(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)["rows"]


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
