"""How far the memory plan's prediction is from the measured peak, on small and large networks
at batch 1 and 8: `python -m bench.prediction` writes the section of BENCHMARKS.md between its
markers (and bench/results-prediction.json).

Each configuration runs edgetune's step in a fresh process (bench.run_one --mode memory), twice:
with the kernel scratch measured on this machine (edgetune.compiler.backends.scratch, the default) and
with the ops' estimates only (EDGETUNE_MEASURE_SCRATCH=0, what the plan did before), side by
side in one run. Two measured figures per run:
- the step: how far 5 steps rose above the memory setup and the warm-up left, compared with the
  prediction less the optimizer state (allocated by compile, before the steps);
- the whole job: setup + steps above the loaded model, what a memory budget means
  (edgetune.apps.measure), compared with the whole prediction.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

from bench import configs, sections
from bench.child import ROOT, run_child

BEGIN, END = sections.PREDICTION_BEGIN, sections.PREDICTION_END
MODELS = ["mobilenetv2-0.35", "mobilenetv2", "resnet", "vit"]
SCHEMES = ["full", "bias-only", "tte"]
BATCHES = [1, 8]
VARIANTS = {"measured": "1", "estimated": "0"}  # EDGETUNE_MEASURE_SCRATCH
MB = 2 ** 20
GOAL = 0.20  # within +-20% where the step's own memory is above 10 MB
GOAL_FLOOR = 10 * MB


def measure(model: str, scheme: str, batch: int, variant: str, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "bench.run_one", "--model", model, "--scheme", scheme, "--batch", str(batch),
           "--engine", "edgetune", "--mode", "memory"]
    env = {**os.environ, "EDGETUNE_MEASURE_SCRATCH": VARIANTS[variant]}
    return run_child(cmd, "memory", env, timeout)


def run(models, schemes, batches, timeout: float) -> list[dict]:
    rows = []
    for model in models:
        for batch in batches:
            for scheme in schemes:
                row = {"model": model, "scheme": scheme, "batch": batch}
                for variant in VARIANTS:
                    row[variant] = measure(model, scheme, batch, variant, timeout)
                rows.append(row)
                print(" | ".join(table_row(row)), flush=True)
    return rows


def ratios(r: dict) -> tuple[float, float] | None:
    """(measured step / predicted step, measured job / predicted job), or None if it failed."""
    if not r.get("ok"):
        return None
    return step_bytes(r) / (r["predicted_peak_bytes"] - r["state_bytes"]), r["peak_bytes"] / r["predicted_peak_bytes"]


def step_bytes(r: dict) -> int:
    """How far the steps rose above what setup and the warm-up left resident."""
    return r["steps_peak_bytes"] - r["warm_rss_bytes"]


def table_row(row: dict) -> list[str]:
    cells = [row["model"], row["scheme"], str(row["batch"])]
    for variant in VARIANTS:
        r = row[variant]
        got = ratios(r)
        if got is None:
            cells += ["n/a", "n/a", "n/a"]
            continue
        step, job = got
        cells += [f"{step_bytes(r) / MB:.1f} / {(r['predicted_peak_bytes'] - r['state_bytes']) / MB:.1f}",
                  f"**{step:.2f}**" if variant == "measured" else f"{step:.2f}", f"{job:.2f}"]
    return cells


def verdict(rows: list[dict]) -> str:
    """How many configurations whose step holds more than 10 MB are predicted within 20%."""
    counted = [(row, ratios(row["measured"])) for row in rows if row["measured"].get("ok")
               and step_bytes(row["measured"]) > GOAL_FLOOR]
    within = [row for row, (step, _) in counted if abs(step - 1) <= GOAL]
    worst = max(counted, key=lambda c: abs(c[1][0] - 1), default=None)
    text = (f"Goal (prediction within ±20% of the step wherever the step holds more than 10 MB): "
            f"{len(within)} of {len(counted)} configurations")
    if worst:
        (row, (step, _)) = worst
        text += f"; the farthest is {row['model']} {row['scheme']} batch {row['batch']} at {step:.2f}"
    return text + "."


def render(rows: list[dict], env: dict) -> str:
    head = ["model", "scheme", "batch", "step MB: measured / predicted", "step ratio", "job ratio",
            "before: step MB", "before: step ratio", "before: job ratio"]
    lines = [BEGIN, "## Memory plan against the measured peak (`python -m bench.prediction`)", "",
             f"Generated on {env['date']}; {env['cpu']}, {env['cores']} cores; torch {env['torch']}; "
             f"edgetune/ as of commit {env.get('revision', '?')}; "
             f"the run took {env['runtime_s'] / 60:.1f} min. Each row: edgetune's step in a fresh process "
             "(`bench.run_one --mode memory`: 128x128 images, SGD momentum, eval-mode BN), once with kernel "
             "scratch measured on this machine (the default) and once with the ops' estimates only "
             "(`EDGETUNE_MEASURE_SCRATCH=0`, the plan before; \"before\" columns).", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(table_row(row)) + " |" for row in rows]
    lines += ["", "**step MB**: how far 5 steps rose above what setup and a warm-up left (VmHWM, "
              "`MALLOC_MMAP_THRESHOLD_=65536`) / the prediction less the optimizer state (allocated at compile). "
              "**step ratio** = measured / predicted. **job ratio**: setup + steps above the loaded model (what a "
              "budget means, `edgetune.apps.measure`) / the whole prediction; below 10 MB it is dominated by what the "
              "plan does not model (generated code, library caches, imported modules).", "", verdict(rows), "", END]
    return "\n".join(lines) + "\n"


def environment(started: float) -> dict:
    import torch

    return {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "cpu": sections.cpu_model(), "cores": os.cpu_count(),
            "torch": torch.__version__, "revision": sections.edgetune_revision(), "runtime_s": time.perf_counter() - started}


def main(argv=None) -> None:
    csv = lambda kind=str: (lambda text: [kind(v) for v in text.split(",")])  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=csv(), default=MODELS, help=f"subset of {list(configs.MODELS)}")
    p.add_argument("--schemes", type=csv(), default=SCHEMES)
    p.add_argument("--batches", type=csv(int), default=BATCHES)
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--json", default=str(ROOT / "bench" / "results-prediction.json"))
    p.add_argument("--render", action="store_true", help="measure nothing: rewrite --out from --json")
    args = p.parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.json).read_text())
        rows, env = saved["rows"], saved["environment"]
    else:
        started = time.perf_counter()
        rows = run(args.models, args.schemes, args.batches, args.timeout)
        env = environment(started)
        Path(args.json).write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    sections.replace_section(Path(args.out), render(rows, env), BEGIN, END)
    print(verdict(rows))


if __name__ == "__main__":
    main()
