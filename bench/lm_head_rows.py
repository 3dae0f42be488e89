"""What leaving a chat's ignored tokens out of the fused LM head buys (passes/vocab_loss.py,
`ignore`): SmolLM2-135M on ShareGPT batches (4 x 128 tokens, conversations up to 1,024
characters, the lm_methods split's data), each scheme compiled twice, once as it is and once
with the head computing every row, as before.

    python -m bench.lm_head_rows [--threads 1] [--steps 12] [--out bench/results-lm-head-rows.json]

The two steps of a scheme alternate in one process, step for step on the same batches, so a
busy spell lands on both alike; the ratio is taken round by round. Both must give the same
losses (the rows left out count for nothing in the loss).
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import statistics
import time

import torch

SCHEMES = ["lora:8:q_proj,v_proj,alpha=16", "lm-sparse:6"]
BATCH, SEQ = 4, 128


@contextlib.contextmanager
def every_row_computed():
    """Compile as before the rule: the fused head does not learn which rows the loss ignores."""
    from edgetune.compiler.passes import vocab_loss

    rule = vocab_loss._ignored_label
    vocab_loss._ignored_label = lambda gather, users: None
    try:
        yield
    finally:
        vocab_loss._ignored_label = rule


def run(threads: int, steps: int) -> dict:
    import edgetune as et
    from edgetune.apps.lm import compile_lm, load_lm
    from edgetune.data.chat import load_lm_data

    from bench.sections import cpu_model, edgetune_revision

    torch.set_num_threads(threads)
    lm = load_lm("smollm2-135m", seq_len=SEQ)
    data = load_lm_data("sharegpt", lm.tokenizer, SEQ, max_chars=1024)
    batches = [b for b, _ in zip(data.batches(BATCH), range(steps))]
    learned = sum(int((labels[:, 1:] != -100).sum()) for _, _, labels in batches)
    rows = sum(labels[:, 1:].numel() for _, _, labels in batches)
    results = {}
    for scheme in SCHEMES:
        trainers = {}
        for variant in ("learned rows", "every row"):
            context = every_row_computed() if variant == "every row" else contextlib.nullcontext()
            with context:
                trainers[variant] = compile_lm(copy.deepcopy(lm.model), et.schemes.from_string(scheme), BATCH, SEQ,
                                               et.AdamW(lr=1e-4, weight_decay=0.0))
        times = {variant: [] for variant in trainers}
        losses = {variant: [] for variant in trainers}
        for ids, mask, labels in batches:
            for variant, trainer in trainers.items():
                started = time.perf_counter()
                losses[variant].append(trainer.step((ids, mask), (labels,)))
                times[variant].append(time.perf_counter() - started)
        ratios = [a / b for a, b in zip(times["every row"][2:], times["learned rows"][2:])]  # two warm-up steps
        results[scheme] = {
            "median_step_s": {v: statistics.median(t[2:]) for v, t in times.items()},
            "speedup_median": statistics.median(ratios),
            "speedup_quartiles": statistics.quantiles(ratios, n=4)[::2],
            "largest_loss_difference": max(abs(a - b) for a, b in zip(*losses.values())),
            "predicted_peak_bytes": {v: t.report().predicted_peak_bytes for v, t in trainers.items()},
        }
    return {"date": datetime.date.today().isoformat(), "cpu": cpu_model(), "commit": edgetune_revision(),
            "threads": threads, "steps": steps, "learned_share": learned / rows, "schemes": results}


def report(result: dict) -> str:
    lines = [f"learned tokens: {100 * result['learned_share']:.0f}% of the rows the head sees",
             "| scheme | step, every row | step, learned rows | speed-up (median, quartiles) | largest loss difference "
             "| predicted peak, every row / learned rows |",
             "|---|---:|---:|---:|---:|---:|"]
    for scheme, r in result["schemes"].items():
        every, learned = r["median_step_s"]["every row"], r["median_step_s"]["learned rows"]
        q1, q3 = r["speedup_quartiles"]
        peaks = " / ".join(f"{r['predicted_peak_bytes'][v] / 2**20:.0f}" for v in ("every row", "learned rows"))
        lines.append(f"| `{scheme}` | {1000 * every:.0f} ms | {1000 * learned:.0f} ms | {r['speedup_median']:.2f}x "
                     f"({q1:.2f}-{q3:.2f}) | {r['largest_loss_difference']:.1e} | {peaks} MB |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from bench.sections import one_process_main

    return one_process_main(__doc__, run, report, steps=12, out="bench/results-lm-head-rows.json", argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
