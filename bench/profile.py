"""Where a compiled step's time goes (issue 18): every kernel call of the torch backend timed
and summed by op, the Python between kernels, at each thread count.

    python -m bench.profile --scheme bias-only --batch 8 --threads 1,2
    python -m bench.profile --model resnet --scheme tte --batch 1
    python -m bench.profile --model smollm2-135m --scheme lm-sparse:6 --batch 4 --threads 2

One process per thread count (torch's thread pool is sized once per process). In each, the
step is compiled (torch backend), then run --steps times as compiled and --steps times with
each kernel call wrapped in a timer, alternating, after warm-ups. "kernels" is the sum of the
wrapped calls' wall times, less the wrapper's own cost (calibrated on a call that does
nothing); "between kernels" is the rest of the step's wall time as compiled: the generated
Python's lines, `del`s, guards and calls, and the views, which the step writes as tensor
methods rather than kernel calls (OpDef.inline). A reference runs beside it for scale: PyTorch eager
on the same scheme for the vision models; for the language models (SmolLM2-135M, or the tiny
random Llama) the forward-only floor of issue 18's goal, HF's forward and loss without
gradients, on bench.lm's batch (random ids, --seq tokens, every row learned). Ops are the
IR's (conv, conv_grad_input, pack_mask, ...): the passes' own ops
(pack_mask / masked_grad from the bit-mask pass, copy / index_select from the slices pass)
show up under their names.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
import types
from collections import Counter

import torch
import torch.nn.functional as F

import edgetune
from edgetune.apps.baseline import eager_step

from bench import configs


def timed_step(compiled) -> tuple[types.FunctionType, Counter, Counter]:
    """The compiled step's function again, its kernels wrapped: (fn, seconds by op, calls by op)."""
    seconds, calls = Counter(), Counter()
    namespace = dict(compiled.fn.__globals__)
    for name, op in compiled.kernel_ops.items():  # the generic kernels and those bound to one node
        namespace[name] = _timed(op, namespace[name], seconds, calls)
    return types.FunctionType(compiled.fn.__code__, namespace), seconds, calls


def _timed(op: str, kernel, seconds: Counter, calls: Counter):
    def call(*args, **kwargs):
        start = time.perf_counter()
        out = kernel(*args, **kwargs)
        seconds[op] += time.perf_counter() - start
        calls[op] += 1
        return out
    return call


def wrapper_cost() -> float:
    """Seconds a timed call adds around a kernel (median of many calls of a no-op)."""
    seconds, calls = Counter(), Counter()
    f = _timed("nothing", lambda: None, seconds, calls)
    runs = []
    for _ in range(20):
        start = time.perf_counter()
        for _ in range(1000):
            f()
        runs.append((time.perf_counter() - start) / 1000)
    return statistics.median(runs)


# Language models: bench.lm's model, batch and schemes (lm_one), profiled against the forward floor.
LM_MODELS = {"smollm2-135m": False, "tiny-llama": True}  # name -> tiny
LM_SCHEMES = ["lm-sparse:6", "lora"]


def profile(model_name: str, scheme_name: str, batch: int, threads: int, steps: int, seq: int = 128) -> dict:
    torch.set_num_threads(threads)
    case = _lm_case if model_name in LM_MODELS else _vision_case
    trainer, args, reference = case(model_name, scheme_name, batch, seq)
    fn, seconds, calls = timed_step(trainer.compiled)

    def as_compiled():
        with torch.no_grad():
            trainer.compiled.fn(*args())

    def wrapped():
        with torch.no_grad():
            fn(*args())

    runs = {"eager": [], "step": [], "wrapped": []}
    for _ in range(3):  # warm-up
        reference(), as_compiled(), wrapped()
    seconds.clear(), calls.clear()
    for _ in range(steps):
        for name, f in (("eager", reference), ("step", as_compiled), ("wrapped", wrapped)):
            start = time.perf_counter()
            f()
            runs[name].append(time.perf_counter() - start)
    cost = wrapper_cost()
    per_step = {op: (s - cost * calls[op]) / steps for op, s in seconds.items()}
    step = statistics.median(runs["step"])
    kernels = sum(per_step.values())
    return {"model": model_name, "scheme": scheme_name, "batch": batch, "threads": threads,
            "eager_s": statistics.median(runs["eager"]), "step_s": step, "kernels_s": kernels,
            "between_s": step - kernels, "calls": sum(calls.values()) // steps,
            "ops": {op: {"s": s, "calls": calls[op] // steps} for op, s in per_step.items()}}


def _vision_case(model_name: str, scheme_name: str, batch: int, _seq: int):
    """(trainer, its step's arguments, PyTorch eager's step on the same scheme)."""
    model, (x, y) = configs.build_model(model_name), configs.build_batch(batch)
    scheme = configs.scheme(model_name, scheme_name)
    trainer = edgetune.compile(model, F.cross_entropy, (x,), (y,), scheme=scheme,
                               optimizer=edgetune.SGD(configs.LR, momentum=configs.MOMENTUM))
    args = _steps_counted(trainer, [x, y])
    # after the compile: eager_step sets requires_grad, which the compile has read
    eager = eager_step(model, F.cross_entropy, (x,), (y,), scheme, edgetune.SGD(configs.LR, momentum=configs.MOMENTUM))
    return trainer, args, eager


def _lm_case(model_name: str, scheme_name: str, batch: int, seq: int):
    """(trainer, its step's arguments, the forward floor): bench.lm's engines edgetune-sparse
    (lm-sparse:6) or edgetune-lora, and forward."""
    from bench import lm_one
    from edgetune.models.hf import causal_lm_loss

    model = lm_one.load_model(LM_MODELS[model_name])
    ids, mask = lm_one.make_batch(model, batch, seq)
    scheme = (lm_one.sparse_scheme(model.config.num_hidden_layers) if scheme_name == "lm-sparse:6"
              else dict(lm_one.EDGETUNE_LORA))
    trainer = edgetune.compile(model, causal_lm_loss, (ids, mask), (ids,), scheme=scheme, optimizer=lm_one.adamw())
    args = _steps_counted(trainer, [ids, mask, ids])
    forward, _ = lm_one.setup_forward(model, (ids, mask), None)
    return trainer, args, forward


def _steps_counted(trainer, batch: list):
    """The step function's arguments for each call, its step count rising as a trainer's does
    (the first step of SGD with momentum copies its gradient where later ones multiply-add)."""
    steps = itertools.count(trainer.steps + 1)
    return lambda: trainer._arguments(batch, step=next(steps))


def report(results: list[dict], top: int) -> str:
    lines = ["| model | scheme | batch | threads | reference ms | step ms | kernels ms | between kernels ms (share) "
             "| kernel calls |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        ms = lambda k: f"{r[k] * 1e3:.1f}"  # noqa: E731
        lines.append(f"| {r['model']} | {r['scheme']} | {r['batch']} | {r['threads']} | {ms('eager_s')} | {ms('step_s')} "
                     f"| {ms('kernels_s')} | {ms('between_s')} ({r['between_s'] / r['step_s']:.0%}) | {r['calls']} |")
    by_config: dict[tuple, dict[int, dict]] = {}
    for r in results:
        by_config.setdefault((r["model"], r["scheme"], r["batch"]), {})[r["threads"]] = r
    for (model, scheme, batch), runs in by_config.items():
        counts = sorted(runs)
        first = runs[counts[0]]
        ops = sorted(first["ops"], key=lambda op: -first["ops"][op]["s"])[:top]
        head = " | ".join(f"{t} thread(s) ms" for t in counts)
        ratio = f" | {counts[0]} / {counts[-1]} threads" if len(counts) > 1 else ""
        lines += ["", f"{model} {scheme} batch {batch}, the {top} costliest ops:", "",
                  f"| op | calls | {head}{ratio} |", "| --- | --- | " + "--- | " * len(counts) + ("--- |" if ratio else "")]
        for op in ops:
            cells = " | ".join(f"{runs[t]['ops'].get(op, {'s': 0})['s'] * 1e3:.2f}" for t in counts)
            scale = ""
            if ratio:
                last = runs[counts[-1]]["ops"].get(op, {"s": 0})["s"]
                scale = f" | {first['ops'][op]['s'] / last:.2f}x" if last > 0 else " | -"
            lines.append(f"| {op} | {first['ops'][op]['calls']} | {cells}{scale} |")
    lines += ["", "reference: PyTorch eager on the same scheme (vision models); the forward and loss without "
              "gradients (language models)."]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenetv2", choices=[*configs.MODELS, *LM_MODELS])
    p.add_argument("--scheme", default="bias-only", choices=[*configs.SCHEMES, *LM_SCHEMES],
                   help="a vision scheme, or for the language models lm-sparse:6 or lora (q, v; r8)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (language models)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts, a process each")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--top", type=int, default=12, help="ops listed per configuration")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one thread count, JSON to stdout
    args = p.parse_args(argv)
    if (args.model in LM_MODELS) != (args.scheme in LM_SCHEMES):
        p.error(f"--scheme {args.scheme} does not go with --model {args.model}: the vision models take "
                f"{', '.join(configs.SCHEMES)}; the language models {', '.join(LM_SCHEMES)}")
    if args.child:
        print(json.dumps(profile(args.model, args.scheme, args.batch, args.child, args.steps, args.seq)))
        return
    results = []
    for threads in (int(t) for t in args.threads.split(",")):
        cmd = [sys.executable, "-m", "bench.profile", "--model", args.model, "--scheme", args.scheme,
               "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--child", str(threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(report(results, args.top))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
