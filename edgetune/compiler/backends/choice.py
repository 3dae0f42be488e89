"""Which backend runs a Trainer's step: the one asked for, or ("auto") the fastest here,
timed on the example batch at compile time."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from edgetune.compiler.backends.torch import CompiledStep, NonFiniteError
from edgetune.compiler.ir.ops import is_effect, mutated_inputs, storage_of

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
        notes = []
        if self.seconds:
            notes.append("per step: " + ", ".join(f"{name} {s * 1e3:.2f} ms" for name, s in self.seconds.items()))
        notes += [f"{name} not tried: {why}" for name, why in self.unavailable.items()]
        return f"{self.name} (auto, {'; '.join(notes)})" if notes else self.name


def choose_backend(trainer: Any, name: str) -> BackendChoice:
    if name == "torch":
        return BackendChoice("torch", CompiledStep(trainer.graph, trainer.device))
    if name == "onnxruntime":
        return BackendChoice("onnxruntime", _ort_step(trainer))  # errors say what is missing
    steps: dict[str, Callable] = {"torch": CompiledStep(trainer.graph, trainer.device)}
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


def _ort_step(trainer: Any) -> Callable:
    from edgetune.compiler.backends.ort import OrtStep, available

    why = available()
    if why:
        raise ImportError(f"backend='onnxruntime' needs onnx and onnxruntime: {why}")
    from edgetune.compiler.backends.onnx import held_values

    return OrtStep(trainer.graph, trainer.device, frozen=held_values(trainer))


def _onnxruntime_missing(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"it runs steps on CPU tensors and the model is on {device}"
    from edgetune.compiler.backends.ort import available

    return available()


def time_each(trainer: Any, steps: dict[str, Callable]) -> dict[str, float]:
    """Each step's median time on the example batch. Every tensor a step writes (parameters,
    optimizer state, buffers) and torch's random state are restored after each backend, so
    the trainer starts from where it was compiled."""
    batch = list(trainer.examples[0]) + list(trainer.examples[1])
    args = trainer._arguments(batch, step=1)
    targets = _written_inputs(trainer.graph)
    written = [a for n, a in zip(trainer.graph.inputs, args) if n in targets]
    saved, rng = [t.clone() for t in written], torch.get_rng_state()
    seconds = {}
    try:
        for name, step in steps.items():
            times = []
            for _ in range(WARM_STEPS + TIMED_STEPS):
                start = time.perf_counter()
                try:
                    step(*trainer._arguments(batch, step=1))
                except NonFiniteError:  # the example batch overflowed: the time spent is still the step's
                    pass
                times.append(time.perf_counter() - start)
            seconds[name] = statistics.median(times[WARM_STEPS:])
            _restore(written, saved, rng)
    finally:
        _restore(written, saved, rng)
    return seconds


def _written_inputs(graph: Any) -> set:
    return {storage_of(n.inputs[k]) for n in graph.nodes if is_effect(n) for k in mutated_inputs(n)}


def _restore(written: list[torch.Tensor], saved: list[torch.Tensor], rng: torch.Tensor) -> None:
    with torch.no_grad():
        for t, s in zip(written, saved):
            t.copy_(s)
    torch.set_rng_state(rng)
