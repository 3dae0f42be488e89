"""Compile time of a language model's training step: edgetune's first compile (by phase) and
a new length bucket's compile after it, next to torch.compile's (Inductor) first compiled
step and its recompile for the new length. Each engine runs in a fresh process.

    python -m bench.compile_time                      # SmolLM2-135M, lm-sparse:6, batch 4, 128 then 64 tokens
    python -m bench.compile_time --tiny               # a tiny random Llama (seconds)

A compile's time is that of its first step (or compile() call and first step) less a steady
step's, the median of the steps after it; for edgetune also the compile's own clock (the sum
of its phases), and its runs are repeated (--repeat, 3) with medians reported. torch.compile compiles the model's forward and
backward (AOTAutograd); its optimizer step stays eager, and partial rules train their whole
weights there (its cost is the compile, not the scheme); its on-disk caches start empty in
each run (a fresh TORCHINDUCTOR_CACHE_DIR), as on a user's first run. Results:
bench/results/compile.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("edgetune", "torch-compile")
STEADY = 3  # steps after each first one, whose median is a steady step


def _model(tiny: bool):
    from edgetune.models.hf import load_causal_lm, tiny_causal_lm

    return tiny_causal_lm("llama", max_position_embeddings=256) if tiny else load_causal_lm("smollm2-135m").model


def _batch(rows: int, length: int):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (rows, length), generator=g)
    return (ids, torch.ones_like(ids)), (ids,)


def _first_and_steady(step, batch) -> tuple[float, float]:
    """Seconds of the first call of step(batch), and the median of the next STEADY."""
    times = []
    for _ in range(1 + STEADY):
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:])


def run_edgetune(args) -> dict:
    import edgetune as et
    from edgetune.apps.lm import compile_lm

    model = _model(args.tiny)
    start = time.perf_counter()
    trainer = compile_lm(model, et.schemes.parse(args.scheme), args.batch, args.seq_len, et.AdamW(lr=1e-5),
                         buckets=[args.bucket])
    first_compile = time.perf_counter() - start
    first_step, steady = _first_and_steady(lambda b: trainer.step(*b), _batch(args.batch, args.seq_len))
    new_first, new_steady = _first_and_steady(lambda b: trainer.step(*b), _batch(args.batch, args.bucket))
    phases = {f"{len(v.examples[0][0][0])}": v.seconds for v in trainer.variants.values()}
    # The compiles' own clocks (the sum of their phases), free of the steady step subtracted
    # above, whose noise on a busy machine is as large as a compile.
    compiles = [sum(v.seconds.values()) for v in trainer.variants.values()]
    return {"first": first_compile + first_step - steady, "new_bucket": new_first - new_steady,
            "compile_first": compiles[0], "compile_new_bucket": compiles[1],
            "phases": phases, "steady_step": steady, "steady_step_bucket": new_steady}


def run_torch_compile(args) -> dict:
    import torch

    from edgetune.apps.baseline import freeze_to
    from edgetune.compiler import scheme as schemes
    from edgetune.models.hf import causal_lm_loss

    model = _model(args.tiny)
    freeze_to(model, schemes.parse(args.scheme))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    compiled = torch.compile(model)

    def step(batch) -> float:
        (ids, mask), (labels,) = batch
        loss = causal_lm_loss(compiled(input_ids=ids, attention_mask=mask), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    first, steady = _first_and_steady(step, _batch(args.batch, args.seq_len))
    new_first, new_steady = _first_and_steady(step, _batch(args.batch, args.bucket))
    return {"first": first - steady, "new_bucket": new_first - new_steady, "steady_step": steady,
            "steady_step_bucket": new_steady}


def run_all(args) -> dict:
    """Each engine in fresh processes: edgetune `args.repeat` times (the medians are reported,
    each run under "runs"), torch.compile once (minutes a run)."""
    results = {}
    for engine in ENGINES:
        runs = [_run_engine(engine, args) for _ in range(args.repeat if engine == "edgetune" else 1)]
        results[engine] = runs[0] if len(runs) == 1 or any("error" in r for r in runs) else _medians(runs)
        print(f"{engine}: {results[engine]}", file=sys.stderr)
    return results


def _run_engine(engine: str, args) -> dict:
    cmd = [sys.executable, "-m", "bench.compile_time", "--engine", engine, "--scheme", args.scheme,
           "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--bucket", str(args.bucket)]
    cmd += ["--tiny"] if args.tiny else []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCHINDUCTOR_CACHE_DIR": cache}
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _medians(runs: list[dict]) -> dict:
    numbers = [k for k, v in runs[0].items() if isinstance(v, float)]
    return {**{k: statistics.median(r[k] for r in runs) for k in numbers}, "runs": runs}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=ENGINES, help="run one engine here and print its JSON (internal)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2-135M")
    p.add_argument("--scheme", default="lm-sparse:6")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--bucket", type=int, default=64, help="the shorter length compiled second")
    p.add_argument("--repeat", type=int, default=3, help="fresh edgetune processes (medians reported)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "compile.json"))
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.engine:
        print(json.dumps((run_edgetune if args.engine == "edgetune" else run_torch_compile)(args)))
        return
    results = {"settings": {k: v for k, v in vars(args).items() if k not in ("engine", "out", "repeat")},
               "engines": run_all(args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results["engines"], indent=1))


if __name__ == "__main__":
    main()
