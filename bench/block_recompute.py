"""What recomputing transformer blocks under a memory budget buys and costs
(edgetune.compiler.passes.blocks): MiniLM-L6 at batch 32 x 32 tokens, every block's six
linears trained on 1/8 of their input channels plus all biases and LayerNorm weights (a scheme
whose backward crosses every block), AdamW. Per budget: the blocks recomputed, the predicted
peak, the peak measured in a fresh process, and the step's time against the plain step's.

    python -m bench.block_recompute [--threads 1] [--steps 25] [--out bench/results-block-recompute.json]

The steps of every variant alternate in one process (one step each, round after round), so a
busy spell on the machine lands on all of them alike; the ratio is taken step by step against
the plain step of the same round.
"""
from __future__ import annotations

import copy
import datetime
import statistics
import time

import torch

LINEARS = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "intermediate.dense", "output.dense"]
BUDGETS = [None, "100MB", "60MB"]


def scheme() -> dict:
    rules = {f"encoder.layer.*.{name}.weight": 0.125 for name in LINEARS}
    return {**rules, "encoder.layer.*.bias": "full", "encoder.layer.*.LayerNorm.weight": "full"}


def run(threads: int, steps: int) -> dict:
    import edgetune as et
    from edgetune.apps.jobs import build_job
    from edgetune.apps.measure import measure_peak
    from edgetune.compiler.optim import by_name

    from bench.sections import cpu_model, edgetune_revision

    torch.set_num_threads(threads)
    job = build_job("minilm-l6", "rotten-tomatoes", max_len=32)
    inputs, targets = job.example(32)
    plan = et.schemes.with_head(scheme(), job.head)
    trainers, rows = {}, {}
    for budget in BUDGETS:
        trainer = et.compile(copy.deepcopy(job.model), job.loss_fn, inputs, targets, scheme=plan,
                             optimizer=by_name("adamw", 1e-4), memory_budget=budget)
        blocks = sorted({n.meta["recomputed_block"] for n in trainer.graph.nodes if "recomputed_block" in n.meta})
        measured = measure_peak(job.model, job.loss_fn, inputs, targets, plan, by_name("adamw", 1e-4),
                                memory_budget=budget)
        trainers[str(budget)] = trainer
        rows[str(budget)] = {"budget": budget, "blocks_recomputed": blocks,
                             "predicted_peak_bytes": trainer.report().predicted_peak_bytes,
                             "measured_peak_bytes": measured, "step_s": []}
    for _ in range(steps):
        for key, trainer in trainers.items():
            started = time.perf_counter()
            trainer.step(inputs, targets)
            rows[key]["step_s"].append(time.perf_counter() - started)
    plain = rows["None"]["step_s"][2:]  # the first two steps warm up
    for row in rows.values():
        ratios = [t / p for t, p in zip(row["step_s"][2:], plain)]
        row["median_step_s"] = statistics.median(row["step_s"][2:])
        row["ratio_median"] = statistics.median(ratios)
        row["ratio_quartiles"] = statistics.quantiles(ratios, n=4)[::2]
    return {"date": datetime.date.today().isoformat(), "cpu": cpu_model(), "commit": edgetune_revision(),
            "threads": threads, "steps": steps, "rows": rows}


def report(result: dict) -> str:
    mb = lambda n: f"{n / 2**20:.1f} MB"  # noqa: E731
    lines = ["| budget | blocks recomputed | predicted peak | measured peak | median step | vs plain (median, quartiles) |",
             "|---|---|---:|---:|---:|---:|"]
    for row in result["rows"].values():
        q1, q3 = row["ratio_quartiles"]
        lines.append(f"| {row['budget'] or 'none'} | {len(row['blocks_recomputed'])} | "
                     f"{mb(row['predicted_peak_bytes'])} | {mb(row['measured_peak_bytes'])} | "
                     f"{1000 * row['median_step_s']:.0f} ms | {row['ratio_median']:.2f}x ({q1:.2f}-{q3:.2f}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from bench.sections import one_process_main

    return one_process_main(__doc__, run, report, steps=25, out="bench/results-block-recompute.json", argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
