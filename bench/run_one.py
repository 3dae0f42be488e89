"""One engine x one configuration, in a process of its own; prints one JSON line on stdout.

    python -m bench.run_one --model mobilenetv2 --scheme bias-only --batch 8 \
        --engine eager --mode memory

--mode memory: VmHWM above the built model and batch over setup + 1 warm-up + 5 steps. Run it
with MALLOC_MMAP_THRESHOLD_=65536 (the parent does) so that freed activations go back to the
OS instead of staying in glibc's heap, and the high-water mark tracks live memory.
--mode serve: set up and warm up, then run steps when asked, so that the parent can time the
engines of a model and batch in turns (bench/interleave.py): the step times.
A process of its own per measurement, because VmHWM only ever grows and caches (allocator,
Dynamo, Inductor) outlive the configuration that filled them.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
import traceback
from typing import Callable

import torch
import torch.nn.functional as F

import edgetune
from edgetune.apps.baseline import freeze_to
from edgetune.compiler import scheme as schemes
from edgetune.procmem import reset_hwm, vm_hwm_bytes, vm_rss_bytes

from bench import configs
from bench.interleave import reply, serve_steps

MEMORY_STEPS = 5
Step = Callable[[], float]


# -- engines: each returns a step closure and facts about what it built -----------------------

def setup_edgetune(model, x, y, scheme, backend: str = "torch", optimizer=None) -> tuple[Step, dict]:
    optimizer = optimizer or edgetune.SGD(configs.LR, momentum=configs.MOMENTUM)
    trainer = edgetune.compile(model, F.cross_entropy, (x,), (y,), scheme=scheme, optimizer=optimizer, backend=backend)
    report = trainer.report()
    # The optimizer state is allocated by compile, before the timed steps: the steps' own rise
    # above the RSS setup left is comparable with the prediction minus it.
    info = {"predicted_peak_bytes": report.predicted_peak_bytes, "state_bytes": report.state_bytes,
            "trainable_params": trainer.trainable_params,
            # which backend runs the step; under "auto", each backend's time on the example batch
            "backend": trainer.backend.name, "backend_seconds": dict(trainer.backend.seconds)}
    return (lambda: trainer.step((x,), (y,))), info


def setup_eager(model, x, y, scheme, compiled: bool = False) -> tuple[Step, dict]:
    masks = freeze_to(model, scheme)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trained, lr=configs.LR, momentum=configs.MOMENTUM)
    # torch.compile covers forward + loss; AOTAutograd compiles the matching backward too.
    # The optimizer stays eager: its update is the same few foreach kernels either way.
    forward = lambda x, y: F.cross_entropy(model(x), y)  # noqa: E731
    if compiled:
        forward = torch.compile(forward)

    def step() -> float:
        loss = forward(x, y)
        loss.backward()
        for p, mask in masks:
            p.grad.mul_(mask)  # untrained channels get zero gradient, so SGD leaves them bitwise unchanged
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    count = sum(p.numel() if m is None else int(m.expand_as(p).sum()) for p, m in _with_masks(trained, masks))
    return step, {"trainable_params": count}


def setup_forward(model, x, y, scheme) -> tuple[Step, dict]:
    def step() -> float:
        with torch.no_grad():
            return F.cross_entropy(model(x), y).item()

    return step, {}


ENGINES = {
    "edgetune": setup_edgetune,
    "edgetune-ort": lambda m, x, y, s: setup_edgetune(m, x, y, s, backend="onnxruntime"),
    "edgetune-auto": lambda m, x, y, s: setup_edgetune(m, x, y, s, backend="auto"),
    "edgetune-mezo": lambda m, x, y, s: setup_edgetune(m, x, y, s, optimizer=edgetune.MeZO(lr=1e-6)),
    "eager": setup_eager,
    "eager-full": lambda m, x, y, s: setup_eager(m, x, y, schemes.full()),
    "compile": lambda m, x, y, s: setup_eager(m, x, y, s, compiled=True),
    "forward": setup_forward,
}


def _with_masks(params, masks):
    by_id = {id(p): m for p, m in masks}
    return [(p, by_id.get(id(p))) for p in params]


# -- measurements -------------------------------------------------------------------------------

def measure_memory(setup, model, x, y, scheme) -> dict:
    """Peak over setup + warm-up + steps (the design's definition), and over the steps alone.

    The steps-only peak starts from the RSS left after setup and the warm-up, so it still
    counts what setup keeps alive (compiled code, optimizer state); `warm_rss_bytes` is that."""
    reset_hwm()
    base, modules = vm_hwm_bytes(), len(sys.modules)
    t0 = time.perf_counter()
    step, info = setup(model, x, y, scheme)
    step()
    setup_s = time.perf_counter() - t0
    # Python modules that setup and the first step import count in the peak like any other
    # memory (torch.optim's first step loads torch._dynamo); the count says how much of it.
    info["modules_imported"] = len(sys.modules) - modules
    setup_peak, warm_rss = vm_hwm_bytes(), vm_rss_bytes()
    reset_hwm()
    for _ in range(MEMORY_STEPS):
        step()
    steps_peak = vm_hwm_bytes()
    return {**info, "base_bytes": base, "peak_bytes": max(setup_peak, steps_peak) - base,
            "child_peak_bytes": child_peak_above(base),
            "steps_peak_bytes": steps_peak - base, "warm_rss_bytes": warm_rss - base, "setup_s": setup_s}


def child_peak_above(base: int) -> int | None:
    """Peak RSS of the largest finished child process above our baseline, or None if none ran.

    edgetune compiles in a forked child, which VmHWM of this process never sees. A fork starts
    with the parent's resident pages counted in its RSS, so its peak minus our baseline is
    roughly what it added while the parent waited."""
    kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return kb * 1024 - base if kb else None


def serve(setup, model, x, y, scheme) -> None:
    """Set up and warm up (two steps), then serve steps (bench/interleave.py: serve_steps)."""
    t0 = time.perf_counter()
    step, info = setup(model, x, y, scheme)
    losses = [step()]
    setup_s = time.perf_counter() - t0
    losses.append(step())
    serve_steps(step, {"setup_s": setup_s, "losses": losses, **info})


def run(args) -> dict | None:
    model, (x, y) = configs.build_model(args.model), configs.build_batch(args.batch)
    scheme = configs.scheme(args.model, args.scheme) if args.scheme != "-" else schemes.full()
    setup = ENGINES[args.engine]
    if args.mode == "memory":
        return measure_memory(setup, model, x, y, scheme)
    return serve(setup, model, x, y, scheme)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=list(configs.MODELS), required=True)
    p.add_argument("--scheme", choices=configs.SCHEMES + ["-"], required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--engine", choices=list(ENGINES), required=True)
    p.add_argument("--mode", choices=["memory", "serve"], required=True)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        result = run(args)
    except Exception as e:  # reported as "n/a" with its reason, not as a crash of the whole bench
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
    if result is not None:  # serve has replied as it went
        reply({"ok": True, **result})


if __name__ == "__main__":
    main()
