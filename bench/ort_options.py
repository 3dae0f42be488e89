"""onnxruntime session options against edgetune's onnxruntime backend (issue 11): step time
and peak memory of the same step under each variant of `session_options`.

    python -m bench.ort_options --scheme bias-only --batch 1            # time, interleaved
    python -m bench.ort_options --scheme bias-only --batch 1 --memory   # peak, a process each
    python -m bench.ort_options --scheme bias-only --batch 1 --profile  # onnxruntime's per-op time

Time: one process builds the step once (edgetune.compile, torch backend) and then, for each
variant, an onnxruntime session over the same graph (OrtStep); eager and the torch backend run
beside them. Steps go round-robin (eager, torch, each variant, ...) so that load from other jobs
falls on all of them alike; the median CPU time of each is printed with its ratio to eager.
Memory: one fresh process per variant (`bench.run_one`'s memory measurement, edgetune-ort
engine, with `MALLOC_MMAP_THRESHOLD_=65536`), the variant patched into
edgetune.compiler.backends.ort.session_options.
MobileNetV2 width 1.0, 128x128, eval-mode BN, SGD momentum, one intra-op thread.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter

import torch
import torch.nn.functional as F

import edgetune
from edgetune.apps.baseline import eager_step
from edgetune.compiler.backends import ort as ort_backend
from edgetune.compiler.backends import onnx as onnx_backend
from edgetune.compiler.backends.onnx import held_values

from bench import configs
from bench.child import run_child

MODEL = "mobilenetv2"
# name -> the changes to edgetune's default session options
VARIANTS = {
    "default": {},
    "no-arena": {"enable_cpu_mem_arena": False},
    "no-pattern": {"enable_mem_pattern": False},
    "no-arena-no-pattern": {"enable_cpu_mem_arena": False, "enable_mem_pattern": False},
    "opt-extended": {"graph_optimization_level": "ORT_ENABLE_EXTENDED"},
    "opt-basic": {"graph_optimization_level": "ORT_ENABLE_BASIC"},
    "no-prepack": {"config:session.disable_prepacking": "1"},
    "lean": {"enable_cpu_mem_arena": False, "enable_mem_pattern": False, "config:session.disable_prepacking": "1"},
    # edgetune's options, every frozen tensor a model input bound by pointer (as before the
    # session held them as initializers): nothing folded or prepacked, no copy
    "frozen-inputs": {},
}


EDGETUNE_OPTIONS = ort_backend.session_options


def patch_options(variant: str, profile: str | None = None) -> None:
    """Make OrtStep build its sessions with `variant`'s options (edgetune's, changed)."""
    default = EDGETUNE_OPTIONS

    def options(ort, threads=None):
        o = default(ort, threads)
        for key, value in VARIANTS[variant].items():
            if key.startswith("config:"):
                o.add_session_config_entry(key.removeprefix("config:"), value)
            else:
                setattr(o, key, getattr(ort.GraphOptimizationLevel, value) if key == "graph_optimization_level" else value)
        if profile:
            o.enable_profiling, o.profile_file_prefix = True, profile
        return o

    ort_backend.session_options = options


def steps(scheme_name: str, batch: int, variants: list[str]) -> dict:
    model, (x, y) = configs.build_model(MODEL), configs.build_batch(batch)
    scheme = configs.scheme(MODEL, scheme_name)
    trainer = edgetune.compile(model, F.cross_entropy, (x,), (y,), scheme=scheme,
                               optimizer=edgetune.SGD(configs.LR, momentum=configs.MOMENTUM), backend="torch")
    args = lambda: trainer._arguments([x, y], step=trainer.steps + 1)  # noqa: E731
    out = {"torch": lambda: trainer.compiled(*args())}
    for v in variants:
        patch_options(v)
        frozen = {} if v == "frozen-inputs" else held_values(trainer)
        out[f"ort:{v}"] = (lambda s: lambda: s(*args()))(ort_backend.OrtStep(trainer.graph, trainer.device, 1, frozen))
    # eager on the same scheme, last: eager_step sets requires_grad, which the compile has read
    eager = eager_step(model, F.cross_entropy, (x,), (y,), scheme, edgetune.SGD(configs.LR, momentum=configs.MOMENTUM))
    return {"eager": eager, **out}


def time_round_robin(fns: dict, rounds: int) -> dict:
    cpu = {k: [] for k in fns}
    for _ in range(2):  # warm-up
        for f in fns.values():
            f()
    for _ in range(rounds):
        for k, f in fns.items():
            c = time.process_time()
            f()
            cpu[k].append(time.process_time() - c)
    return {k: statistics.median(v) for k, v in cpu.items()}


def memory(scheme: str, batch: int, variant: str) -> dict:
    cmd = [sys.executable, "-m", "bench.ort_options", "--scheme", scheme, "--batch", str(batch),
           "--memory-child", variant]
    return run_child(cmd, "memory", {**os.environ, "OMP_NUM_THREADS": "1"}, 600)


def memory_child(scheme: str, batch: int, variant: str) -> None:
    from bench.run_one import measure_memory, setup_edgetune

    patch_options(variant)
    if variant == "frozen-inputs":
        onnx_backend.held_values = lambda trainer: {}  # read by choice._ort_step when it builds the step
    model, (x, y) = configs.build_model(MODEL), configs.build_batch(batch)
    r = measure_memory(lambda m, x, y, s: setup_edgetune(m, x, y, s, backend="onnxruntime"),
                       model, x, y, configs.scheme(MODEL, scheme))
    print(json.dumps({"ok": True, **r}))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scheme", choices=["bias-only", "tte", "full", "last-3"], required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--memory", action="store_true", help="peak of each variant, a fresh process each")
    p.add_argument("--repeat", type=int, default=1, help="memory processes per variant")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    variants = [v for v in args.variants.split(",") if v]
    if args.memory_child:
        return memory_child(args.scheme, args.batch, args.memory_child)
    if args.memory:
        for _ in range(args.repeat):
            for v in variants:
                r = memory(args.scheme, args.batch, v)
                mb = lambda k: r[k] / 2**20 if r.get("ok") else float("nan")  # noqa: E731
                print(f"{args.scheme} b{args.batch} {v}: peak {mb('peak_bytes'):.1f} MB, steps above warm "
                      f"{mb('steps_peak_bytes') - mb('warm_rss_bytes'):.1f} MB, warm RSS {mb('warm_rss_bytes'):.1f} MB"
                      + ("" if r.get("ok") else f" ({r.get('error')})"), flush=True)
        return
    if args.profile:
        return profile_ops(args.scheme, args.batch, args.rounds)
    med = time_round_robin(steps(args.scheme, args.batch, variants), args.rounds)
    for k, s in med.items():
        print(f"{args.scheme} b{args.batch} {k}: {s * 1e3:.1f} ms CPU (x{med['eager'] / s:.2f} vs eager, "
              f"x{med['torch'] / s:.2f} vs torch backend)", flush=True)


def profile_ops(scheme: str, batch: int, rounds: int) -> None:
    patch_options("default", profile="/tmp/edgetune-ort-profile")
    model, (x, y) = configs.build_model(MODEL), configs.build_batch(batch)
    trainer = edgetune.compile(model, F.cross_entropy, (x,), (y,), scheme=configs.scheme(MODEL, scheme),
                               optimizer=edgetune.SGD(configs.LR, momentum=configs.MOMENTUM), backend="onnxruntime")
    for _ in range(rounds):
        trainer.step((x,), (y,))
    path = trainer.compiled.session.end_profiling()
    events = [e for e in json.load(open(path)) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    by_op, count = Counter(), Counter()
    for e in events:
        by_op[e["args"]["op_name"]] += e["dur"]
        count[e["args"]["op_name"]] += 1
    total = sum(by_op.values())
    print(f"{scheme} b{batch}: {total / rounds / 1e3:.1f} ms of kernels per step, {len(events) // rounds} nodes")
    for op, us in by_op.most_common(15):
        print(f"  {op:24s} {us / rounds / 1e3:7.2f} ms  {count[op] // rounds:4d} nodes")
    os.remove(path)


if __name__ == "__main__":
    main()
