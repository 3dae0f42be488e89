"""Which backend runs a Trainer's step: the one asked for, or ("auto") the fastest here,
timed on the example batch at compile time."""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from edgetune.compiler.backends.invariants import budget_for
from edgetune.compiler.backends.torch import CompiledStep, NonFiniteError
from edgetune.compiler.ir.ops import is_effect, mutated_inputs, storage_of
from edgetune import procmem

BACKENDS = ("torch", "onnxruntime", "auto")
# Steps per backend when choosing: the first ones warm caches and allocators, the median of
# the rest is the backend's time.
WARM_STEPS, TIMED_STEPS = 2, 5


@dataclass
class BackendChoice:
    name: str  # the backend that runs the step
    step: Callable[..., dict[str, Any]]
    seconds: dict[str, float] = field(default_factory=dict)  # "auto": each backend's median step time
    unavailable: dict[str, str] = field(default_factory=dict)  # "auto": backends not tried, and why

    def frozen_changed(self, trainer: Any) -> None:
        """The Trainer's frozen weights were written (a checkpoint with them was loaded): a
        backend that holds its own copy (onnxruntime's session) builds it again."""
        if self.name == "onnxruntime":
            self.step = _ort_step(trainer)

    def describe(self) -> str:
        notes = ["with its memory arena (its steps page-faulted without)"] if getattr(self.step, "arena", False) else []
        watch = getattr(self.step, "watch", None)
        if watch is not None and watch.kept_freed:
            notes.append(f"glibc keeps freed memory for reuse: the first steps page-faulted "
                         f"{watch.faults_per_step:.0f} times a step")
        if self.seconds:
            notes.append("per step: " + ", ".join(f"{name} {s * 1e3:.2f} ms" for name, s in self.seconds.items()))
        notes += [f"{name} not tried: {why}" for name, why in self.unavailable.items()]
        chosen = "auto, " if self.seconds or self.unavailable else ""
        return f"{self.name} ({chosen}{'; '.join(notes)})" if notes else self.name


def _torch_step(trainer: Any) -> CompiledStep:
    return CompiledStep(trainer.graph, trainer.device, keep_bytes=budget_for(trainer.plan.peak_bytes),
                        memory=trainer.plan)


def choose_backend(trainer: Any, name: str) -> BackendChoice:
    if name == "torch":
        return BackendChoice("torch", _torch_step(trainer))
    if name == "onnxruntime":
        return BackendChoice("onnxruntime", _ort_step(trainer))  # errors say what is missing
    steps: dict[str, Callable] = {"torch": _torch_step(trainer)}
    unavailable = {}
    why = _onnxruntime_missing(trainer.device)
    if why:
        unavailable["onnxruntime"] = why
    else:
        from edgetune.compiler.backends.onnx import ExportError
        from edgetune.compiler.backends.ort import BackendUnavailable

        try:
            steps["onnxruntime"] = _ort_step(trainer)
        except (ExportError, BackendUnavailable) as err:
            unavailable["onnxruntime"] = str(err)
    seconds = time_each(trainer, steps) if len(steps) > 1 else {}
    best = min(seconds, key=seconds.get) if seconds else "torch"
    return BackendChoice(best, steps[best], seconds, unavailable)


# Without its arena, onnxruntime mallocs and frees each intermediate at every step; where the
# large ones come back from the OS as fresh pages, each step pays page faults (MobileNetV2
# bias-only b4-b8: 12-28 thousand a step, the step 1.4-1.9x slower than with the arena, in a
# fresh process on this 2-core VM). Where there are few, the arena's bookkeeping costs more
# than it saves (b1-b2: 10-30% slower with it) and it keeps memory. So a step that faults
# more than this many times a step in its first runs gets a session with the arena.
FAULTS_FOR_ARENA = 8000


def _ort_step(trainer: Any) -> Callable:
    from edgetune.compiler.backends.ort import OrtStep, available

    why = available()
    if why:
        raise ImportError(f"backend='onnxruntime' needs onnx and onnxruntime: {why}")
    from edgetune.compiler.backends.onnx import held_values

    step = OrtStep(trainer.graph, trainer.device, frozen=held_values(trainer))
    if _faults_per_step(trainer, step) > FAULTS_FOR_ARENA:
        del step  # its session's memory goes before the next one's comes
        step = OrtStep(trainer.graph, trainer.device, frozen=held_values(trainer), arena=True)
    return step


def _faults_per_step(trainer: Any, step: Callable) -> float:
    """Minor page faults of one `step` on the example batch (after one to warm up), with
    the trainer restored after."""
    with _restored(trainer) as arguments:
        _run(step, arguments())
        before = procmem.minor_faults()
        for _ in range(WARM_STEPS):
            _run(step, arguments())
        return (procmem.minor_faults() - before) / WARM_STEPS if before is not None else 0.0


def _onnxruntime_missing(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"it runs steps on CPU tensors and the model is on {device}"
    from edgetune.compiler.backends.ort import available

    return available()


def time_each(trainer: Any, steps: dict[str, Callable]) -> dict[str, float]:
    """Each step's median time on the example batch, the trainer restored after each."""
    seconds = {}
    for name, step in steps.items():
        with _restored(trainer) as arguments:
            times = []
            for _ in range(WARM_STEPS + TIMED_STEPS):
                start = time.perf_counter()
                _run(step, arguments())
                times.append(time.perf_counter() - start)
            seconds[name] = statistics.median(times[WARM_STEPS:])
    return seconds


def _run(step: Callable, arguments: list) -> None:
    try:
        step(*arguments)
    except NonFiniteError:  # the example batch overflowed: the time spent is still the step's
        pass


@contextmanager
def _restored(trainer: Any):
    """Yields a maker of the step's arguments on the example batch; every tensor a step writes
    (parameters, optimizer state, buffers) and torch's random state are put back after, so
    the trainer stays as it was compiled."""
    batch = list(trainer.examples[0]) + list(trainer.examples[1])
    args = trainer._arguments(batch, step=1)
    targets = _written_inputs(trainer.graph)
    written = [a for n, a in zip(trainer.graph.inputs, args) if n in targets]
    saved, rng = [t.clone() for t in written], torch.get_rng_state()
    try:
        yield lambda: trainer._arguments(batch, step=1)
    finally:
        _restore(written, saved, rng)


def _written_inputs(graph: Any) -> set:
    return {storage_of(n.inputs[k]) for n in graph.nodes if is_effect(n) for k in mutated_inputs(n)}


def _restore(written: list[torch.Tensor], saved: list[torch.Tensor], rng: torch.Tensor) -> None:
    with torch.no_grad():
        for t, s in zip(written, saved):
            t.copy_(s)
    torch.set_rng_state(rng)
