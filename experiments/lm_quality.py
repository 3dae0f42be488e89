"""LoRA against sparse backprop on a real chat fine-tune: held-out loss after the same steps.

    python -m experiments.lm_quality              # every scheme x learning rate, then the table
    python -m experiments.lm_quality --report     # only rewrite the RESULTS.md section

SmolLM2-135M-Instruct on English two-turn ShareGPT conversations (the built-in subset up to
1,024 characters), 128 tokens, batch 4, AdamW, cosine schedule, the same number of steps for
every run. The data are split once into train / validation / test: the learning rate of each
scheme is the one with the lowest validation loss, and its test loss is the reported one.
Each run is a fresh process; results go to experiments/results/lm.json (finished runs are
kept, so an interrupted sweep resumes), and RESULTS.md is rewritten (experiments.report).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

from edgetune.files import write_json
from experiments.children import load_json, run_child

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_JSON = os.path.join(ROOT, "experiments", "results", "lm.json")

# scheme spelling (edgetune.compiler.scheme.from_string) -> learning rates tried. LoRA as PEFT's usual
# setting (r=8 on q and v in every block, alpha 16); lm-sparse:6 is the benchmark's scheme,
# :12 and :30 the same rule on more blocks. Grids were widened where the best rate was an edge.
SCHEMES = {
    "lora:8:q_proj,v_proj,alpha=16": [3e-4, 1e-3, 3e-3, 1e-2],
    "lm-sparse:6": [3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
    "lm-sparse:12": [3e-3, 1e-2],
    "lm-sparse:30": [3e-3],
}
SETTINGS = dict(model="smollm2-135m", data="sharegpt", max_chars=1024, seq_len=128, batch=4, steps=150,
                test=100, val=50, warmup=10, seed=0)


def split(settings: dict):
    """(model, train, val, test), the same split in every run."""
    from edgetune.data.chat import load_lm_data
    from edgetune.apps.lm import load_lm

    lm = load_lm(settings["model"], seq_len=settings["seq_len"])  # a tiny model's positions fit seq_len
    data = load_lm_data(settings["data"], lm.tokenizer, settings["seq_len"], max_chars=settings["max_chars"])
    rest, test = data.split(val_count=settings["test"], seed=settings["seed"])
    train, val = rest.split(val_count=settings["val"], seed=settings["seed"])
    return lm, train, val, test


def run_one(scheme: str, lr: float, settings: dict) -> dict:
    import edgetune as et
    from edgetune.apps.lm import adapters_merged, compile_lm, evaluate_lm, finetune_lm

    lm, train, val, test = split(settings)
    trainer = compile_lm(lm.model, et.schemes.from_string(scheme), settings["batch"], settings["seq_len"],
                         et.AdamW(lr=lr, weight_decay=0.0))
    start = time.perf_counter()
    history = finetune_lm(trainer, train, val, steps=settings["steps"], batch_size=settings["batch"], lr=lr,
                          warmup=settings["warmup"], seed=settings["seed"], progress=False, log=lambda _: None)
    seconds = time.perf_counter() - start
    with adapters_merged(trainer) as model:
        test_loss = evaluate_lm(model, test)
    return {"scheme": scheme, "lr": lr, "val_before": history.evals[0]["loss"], "val": history.evals[-1]["loss"],
            "test": test_loss, "train_loss_last10": _mean(history.losses[-10:]), "seconds": seconds,
            "trainable": trainer.report().trainable_params, "predicted_peak": trainer.report().predicted_peak_bytes,
            "examples": {"train": len(train), "val": len(val), "test": len(test)}}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_loss_before(settings: dict) -> float:
    from edgetune.apps.lm import evaluate_lm

    lm, _, _, test = split(settings)
    return evaluate_lm(lm.model, test)


def sweep(settings: dict) -> dict:
    results = load()
    results.setdefault("meta", {}).update(settings=settings, cpu=platform.processor() or platform.machine())
    runs = results.setdefault("runs", {})
    if "test_before" not in results:
        results["test_before"] = _child(["--before"])
        _save(results)
    for scheme, lrs in SCHEMES.items():
        for lr in lrs:
            key = f"{scheme}@{lr:g}"
            if key in runs:
                continue
            print(f"[lm_quality] {key} ...", flush=True)
            runs[key] = _child(["--one", scheme, "--lr", str(lr)])
            results["meta"]["date"] = datetime.date.today().isoformat()
            _save(results)
    return results


def _child(args: list[str]):
    return run_child("experiments.lm_quality", args)


def load() -> dict:
    return load_json(RESULTS_JSON)


def _save(results: dict) -> None:
    write_json(RESULTS_JSON, results)


# -- the report ------------------------------------------------------------------------------

def best_runs(results: dict) -> dict[str, dict]:
    """Per scheme, the run with the lowest validation loss."""
    best: dict[str, dict] = {}
    for run in results["runs"].values():
        if run["scheme"] not in best or run["val"] < best[run["scheme"]]["val"]:
            best[run["scheme"]] = run
    return best


def section(results: dict) -> str:
    s, best = results["meta"]["settings"], best_runs(results)
    lora = next((r for name, r in best.items() if name.startswith("lora")), None)
    lines = ["## SmolLM2-135M-Instruct -> ShareGPT (English, two turns): LoRA vs sparse backprop", "",
             f"`python -m experiments.lm_quality` — {s['steps']} steps of batch {s['batch']} x {s['seq_len']} tokens, "
             f"AdamW, cosine schedule after {s['warmup']} warm-up steps; {_examples(best)}; learning rate per "
             f"scheme chosen on the validation split from the values listed; loss = mean cross-entropy over the "
             f"answer tokens; {results['meta'].get('date', '?')}, {results['meta']['cpu']}. "
             f"Test loss before fine-tuning: {results['test_before']:.4f}.", "",
             "| scheme | test loss | vs LoRA | validation loss | lr (tried) | trainable params | predicted peak | "
             "time (training + evaluations) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, run in best.items():
        tried = ", ".join(f"{r['lr']:g}" for r in results["runs"].values() if r["scheme"] == name)
        vs = f"{100 * (run['test'] / lora['test'] - 1):+.2f}%" if lora else "-"
        lines.append(f"| `{name}` | {run['test']:.4f} | {vs} | {run['val']:.4f} | {run['lr']:g} ({tried}) | "
                     f"{run['trainable']:,} | {run['predicted_peak'] / 2**20:.0f} MB | {run['seconds']:.0f} s |")
    lines += ["", _verdict(best, lora)]
    notes = os.path.join(ROOT, "experiments", "lm_notes.md")
    if os.path.exists(notes):
        lines += ["", open(notes).read().rstrip()]
    return "\n".join(lines)


def _examples(best: dict) -> str:
    e = next(iter(best.values()))["examples"]
    return f"{e['train']} training, {e['val']} validation and {e['test']} test conversations"


def _verdict(best: dict, lora: dict | None) -> str:
    sparse = {name: run for name, run in best.items() if name.startswith("lm-sparse")}
    if not (lora and sparse):
        return "Goal (sparse within 2% of LoRA's held-out loss): not measured."
    gaps = []
    for name, run in sparse.items():
        gap = 100 * (run["test"] / lora["test"] - 1)
        note = " (the benchmark's scheme)" if name == "lm-sparse:6" else ""
        gaps.append(f"`{name}`{note} {gap:+.2f}% — {'met' if gap <= 2 else 'missed'}")
    return "Goal (sparse backprop's test loss within 2% of LoRA's after the same steps): " + "; ".join(gaps) + "."


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    p.add_argument("--before", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--report", action="store_true", help="only rewrite RESULTS.md from lm.json")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.lr, SETTINGS)))
    elif args.before:
        print(json.dumps(test_loss_before(SETTINGS)))
    else:
        results = load() if args.report else sweep(SETTINGS)
        from experiments import report

        report.main()  # RESULTS.md, this section included
        print(section(results))


if __name__ == "__main__":
    main()
