"""The measured peak memory of a training step: proof that a scheme fits a budget.

Budget semantics (the same everywhere in edgetune): a memory budget is what the training step
needs ON TOP of the loaded model weights and the batch -- activations kept for backward,
gradients, optimizer state, kernel scratch, and what compiling the step leaves allocated
(generated code, library caches). `Trainer.report().predicted_peak_bytes` predicts it for
tensors; bench/ and BENCHMARKS.md measure it as "peak above the model".

How: the job (model, loss, batch, scheme, optimizer) is pickled to a fresh Python process --
the caller's weights never change -- started with glibc told to serve every allocation of
64 KiB or more with its own mmap, so a freed tensor leaves the resident set at once instead of
staying in the heap. It resets the kernel's high-water mark, reads its resident set as the
baseline, compiles the step and runs a few steps, and prints the high-water mark minus the
baseline. edgetune compiles in a forked grandchild (edgetune.compiler.isolate), so torch.export's
memory is not counted, as in the benchmarks. A job that does not pickle is measured in a fork
of the calling process instead: there, the free heap chunks the process kept are taken out of
play first (procmem.occupy_free_heap), so the step's large tensors are fresh mappings as in a
fresh process; small allocations still land in whatever the process left free.

One difference from BENCHMARKS.md: shared library code that the step runs for the first time
(file-backed, clean, shared with every process using torch; about 20 MB for MobileNetV2 on
CPU) is left out, since any other torch process on the machine has it resident already.

Linux only (/proc/self/status, clear_refs); elsewhere, and for a model not on the CPU,
measure_peak raises NotImplementedError. Without glibc's mallopt the number is an upper bound
(freed memory may stay resident).
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from typing import Any, Callable

import torch

from edgetune.apps.baseline import eager_step
from edgetune.compiler import scheme as schemes
from edgetune.compiler.isolate import in_child
from edgetune.compiler.trainer import compile as compile_step
from edgetune.procmem import (MMAP_THRESHOLD, occupy_free_heap, release_free_heap, reset_hwm, rss_file_bytes,
                              set_mmap_threshold, vm_hwm_bytes, vm_rss_bytes)



def measure_peak(model: torch.nn.Module, loss_fn: Callable, inputs: tuple, targets: tuple, scheme,
                 optimizer, steps: int = 3, engine: str = "edgetune", memory_budget: int | None = None) -> int:
    """Bytes above the loaded model that compiling `scheme` and running `steps` steps peaked at.

    `inputs`/`targets` are one batch (tuples of tensors, as for edgetune.compile); the model and
    the optimizer object of the caller are left untouched. `engine="eager"` measures the same
    job in plain PyTorch (edgetune.apps.baseline) instead. `memory_budget`: compile under it, as
    edgetune.compile does (transformer blocks recomputed in the backward as it needs).

    Measured in a fresh Python process (the job is pickled over): a fork of a process that has
    trained already inherits its fragmented heap, and what the step allocates then lands
    scattered over freed pages, which in tests inflated a peak up to 3x. Where the job does not
    pickle (a model class defined in an interactive session, a lambda loss), a fork of this
    process measures instead."""
    _check_supported(model)
    plain = schemes.as_mapping(schemes.resolve(scheme, model))  # a Scheme object holds a closure
    job = (engine, model, loss_fn, tuple(inputs), tuple(targets), plain, optimizer, memory_budget, steps)
    try:
        payload = pickle.dumps(job)
    except (pickle.PicklingError, AttributeError, TypeError):
        return peak_of(model, lambda: _setup(*job[:-1]), steps)
    return _in_fresh_process(payload)


def measure_eager_peak(model: torch.nn.Module, loss_fn: Callable, inputs: tuple, targets: tuple, scheme,
                       optimizer, steps: int = 3) -> int:
    """measure_peak of the same job in plain PyTorch (edgetune.apps.baseline): bytes above the model."""
    return measure_peak(model, loss_fn, inputs, targets, scheme, optimizer, steps, engine="eager")


def _setup(engine: str, model, loss_fn, inputs, targets, scheme, optimizer, memory_budget=None) -> Callable[[], Any]:
    if engine == "eager":
        return eager_step(model, loss_fn, inputs, targets, scheme, optimizer)
    trainer = compile_step(model, loss_fn, inputs, targets, scheme=scheme, optimizer=optimizer,
                           memory_budget=memory_budget)
    return lambda: trainer.step(inputs, targets)


def _in_fresh_process(payload: bytes) -> int:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # whatever imports here imports there
    with tempfile.TemporaryDirectory(prefix="edgetune-measure-") as folder:
        job_file = os.path.join(folder, "job.pkl")
        with open(job_file, "wb") as f:
            f.write(payload)
        done = subprocess.run([sys.executable, "-m", "edgetune.apps.measure", job_file], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise RuntimeError(f"measuring the peak failed:\n{done.stderr.strip()[-2000:]}")
    return int(done.stdout.strip().splitlines()[-1])


def _main(job_file: str) -> None:
    """The fresh process: load the job, then measure it as the fork would."""
    with open(job_file, "rb") as f:
        engine, model, loss_fn, inputs, targets, scheme, optimizer, memory_budget, steps = pickle.load(f)
    print(_peak_in_this_process(lambda: _setup(engine, model, loss_fn, inputs, targets, scheme, optimizer,
                                               memory_budget), steps))


def peak_of(model: torch.nn.Module, setup: Callable[[], Callable[[], Any]], steps: int = 3) -> int:
    """Bytes above the current process that `step = setup()` and `steps` calls of `step()` peaked
    at, measured in a forked child (any training step: edgetune's, or PyTorch's for comparison).
    `model` is only checked to be on the CPU."""
    _check_supported(model)
    return in_child(lambda: _peak_in_this_process(setup, steps))


def _check_supported(model: torch.nn.Module) -> None:
    if not sys.platform.startswith("linux") or not hasattr(os, "fork"):
        raise NotImplementedError(f"measuring a peak reads Linux's /proc/self/status in a forked process; "
                                  f"not available on {sys.platform}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type != "cpu":
        raise NotImplementedError(f"peaks are measured as CPU memory in a forked process; the model is on {device} "
                                  "(CUDA does not survive a fork)")


def _peak_in_this_process(setup: Callable[[], Callable[[], Any]], steps: int) -> int:
    set_mmap_threshold(MMAP_THRESHOLD)
    # Free heap memory the parent left resident (its earlier steps) would be reused here without
    # raising the resident set, hiding what this step needs: hand it back to the OS first.
    release_free_heap()
    occupy_free_heap()  # and make what it left free serve no large allocation: each is a fresh mmap
    reset_hwm()
    baseline, library_pages = vm_rss_bytes(), rss_file_bytes()
    step = setup()
    for _ in range(steps):
        step()
    # A fork does not copy the page tables of file mappings, so every page of library code the
    # step runs faults into this child's RSS again, though the parent has it resident (about
    # 16 MB more than a fresh process for MobileNetV2). Such pages are shared and clean, not
    # memory the step needs: leave them out. File RSS only grows, and the first step faults
    # them in, so subtracting the final growth is exact for the peak of any later step.
    return vm_hwm_bytes() - baseline - (rss_file_bytes() - library_pages)


if __name__ == "__main__":
    _main(sys.argv[1])
