"""Write RESULTS.md and the accuracy-vs-memory plot from experiments/results/<task>.json.

    python -m experiments.report

The tables are generated; the prose around them (what the numbers say) is written by hand in
experiments/results_notes.md and copied in after the tables.
"""
from __future__ import annotations

import json
import os

from experiments import (federated_lm, federated_vision, lm_buckets, lm_methods, lm_quality, mezo_vs_backprop,
                         web_accuracy)
from experiments.finetune_table import RESULTS, TASKS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 2**20
TITLES = {"vision": "ImageNet MobileNetV2 -> Fashion-MNIST", "text": "MiniLM-L6 -> Rotten Tomatoes (fresh/rotten)"}


def load(task: str) -> dict | None:
    path = os.path.join(RESULTS, f"{task}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def table(task: str, data: dict) -> list[str]:
    rows, meta = data["rows"], data["meta"]
    t = meta["task"]
    full = rows.get("full")
    lines = [f"## {TITLES[task]}", "",
             f"`python -m experiments.finetune_table {task}` — {t['model']} on {t['data']}: {t['train_limit']} "
             f"training items, {t['test_limit']} test items, {t['epochs']} epochs, batch {t['batch']}"
             + (f", {t['size']}x{t['size']} px" if t.get("size") else f", {t['max_len']} tokens")
             + f", {t['optimizer']} with its rate tuned per row over {t['lrs']}"
             + (" (grown 3x past a best at its edge)" if t.get("max_extensions") else "")
             + "".join(f"; rows ending in @{name}: {name} over {grid}" for name, grid in t.get("optimizer_lrs", {}).items()
                       if any(spec.endswith("@" + name) for spec in t["rows"]))
             + (f"; test accuracy: mean ± standard deviation over seeds {t['seeds']}" if len(t.get("seeds", ())) > 1
                else "") + f"; {meta['date']}, {meta['cpu']}.", "",
             "| scheme | test accuracy | vs full | peak above weights (measured) | vs full | predicted peak "
             "| trainable params | lr |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for spec in t["rows"]:
        r = rows.get(spec)
        if r is None or "error" in r:
            lines.append(f"| {spec} | {'not run' if r is None else 'failed: ' + r['error']} | | | | | | |")
            continue
        d_acc = f"{100 * (r['accuracy'] - full['accuracy']):+.2f}" if full else ""
        d_mem = f"{r['measured_peak_bytes'] / full['measured_peak_bytes']:.2f}x" if full else ""
        lines.append(f"| {_row_name(spec, r)} | {_accuracy(r)} | {d_acc} | {r['measured_peak_bytes'] / MB:.1f} MB "
                     f"| {d_mem} | {r['predicted_peak_bytes'] / MB:.1f} MB | {r['trainable_params']:,} "
                     f"| {_rate(r, t.get('optimizer_lrs', {}).get(r.get('optimizer'), t['lrs']))} |")
    return lines + [""]


def _row_name(spec: str, r: dict) -> str:
    scheme, _, optimizer = spec.partition("@")
    trained_by = f", {optimizer}" if optimizer else ""
    if not scheme.startswith("auto:"):
        return scheme + trained_by
    space = f" ({r['search_space']} space)" if "search_space" in r else ""
    recompute = ", blocks recomputed to fit" if r.get("memory_budget") else ""
    return f"searched{space}, budget {r['budget_bytes'] / MB:.1f} MB{recompute}{trained_by}"


def _accuracy(r: dict) -> str:
    """The mean test accuracy, ± the seeds' standard deviation where several seeds ran."""
    if len(r.get("accuracies", ())) > 1:
        return f"{100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f}%"
    return f"{100 * r['accuracy']:.2f}%"


def _rate(r: dict, grid: list[float]) -> str:
    """The chosen rate, and the rates tried beyond the task's grid (its edge extensions)."""
    extra = sorted(float(lr) for lr in r.get("tuning", {}) if float(lr) not in grid)
    return f"{r['lr']:g}" + (f" (grid grown by {', '.join(f'{lr:g}' for lr in extra)})" if extra else "")


def plot(tasks: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, (task, data) in zip(axes[0], tasks.items()):
        for spec, r in data["rows"].items():
            if "error" in r:
                continue
            searched = spec.startswith("auto:")
            ax.scatter(r["measured_peak_bytes"] / MB, 100 * r["accuracy"], marker="*" if searched else "o",
                       s=90 if searched else 40, color="tab:red" if searched else "tab:blue")
            ax.annotate("searched" if searched else spec, (r["measured_peak_bytes"] / MB, 100 * r["accuracy"]),
                        fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set(xscale="log", xlabel="measured peak above the weights (MB, log)", ylabel="test accuracy (%)",
               title=TITLES[task])
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    tasks = {task: data for task in TASKS if (data := load(task))}
    lines = ["# Results: fine-tuning real pretrained models on real data", "",
             "Generated by `python -m experiments.report` from `experiments/results/*.json`; every number was "
             "measured by the command above its table. Peak = memory of one training step on top of the loaded "
             "weights (activations kept for backward, gradients, optimizer state, scratch), measured by "
             "`edgetune.apps.measure` (the job pickled to a fresh process); MB = 2^20 bytes.", "",
             "![accuracy vs measured peak memory](experiments/results/pareto.png)", ""]
    for task, data in tasks.items():
        lines += table(task, data)
    notes = os.path.join(os.path.dirname(__file__), "results_notes.md")
    if os.path.exists(notes):
        with open(notes) as f:
            lines += [f.read().rstrip(), ""]
    lm = lm_quality.load()
    if lm.get("runs"):
        lines += [lm_quality.section(lm), ""]
    buckets = lm_buckets.load()
    if buckets.get("runs"):
        lines += [lm_buckets.MARKERS[0], lm_buckets.section(buckets), lm_buckets.MARKERS[1], ""]
    methods = lm_methods.load()  # issue 16's comparison, kept between its markers as lm_methods writes it
    if methods.get("rows"):
        lines += [lm_methods.MARKERS[0], lm_methods.section(methods), lm_methods.MARKERS[1], ""]
    for experiment, measured in ((federated_vision, "runs"), (federated_lm, "federated"), (mezo_vs_backprop, "runs")):
        results = experiment.load()  # issue 14's experiments, each once it has measured something
        if results.get(measured):
            lines += [experiment.section(results), ""]
    federated_notes = os.path.join(os.path.dirname(__file__), "federated_notes.md")
    if os.path.exists(federated_notes):
        with open(federated_notes) as f:
            lines += [f.read().rstrip(), ""]
    web = web_accuracy.load()  # issue 15: fine-tuning in the browser
    if web.get("runs"):
        lines += [web_accuracy.section(web), ""]
        web_notes = os.path.join(os.path.dirname(__file__), "web_notes.md")
        if os.path.exists(web_notes):
            with open(web_notes) as f:
                lines += [f.read().rstrip(), ""]
    if tasks:
        plot(tasks, os.path.join(RESULTS, "pareto.png"))
    with open(os.path.join(ROOT, "RESULTS.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"wrote RESULTS.md ({', '.join(tasks) or 'no results yet'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
