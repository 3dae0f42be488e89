"""compile() and the Trainer: one compiled training step, run on the user's own tensors.

compile: export -> resolve the scheme -> autodiff (pruned) -> optimizer updates -> passes ->
memory plan -> torch code. The Trainer binds the model's parameters and buffers (updated in
place), owns the optimizer state and any LoRA adapters (edgetune.compiler.lora), and checks each batch
against the examples before it runs.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

from edgetune.compiler import lora, zo
from edgetune.compiler import scheme as schemes
from edgetune.compiler.autodiff import differentiate
from edgetune.compiler.backends.choice import BACKENDS, choose_backend
from edgetune.compiler.backends.scratch import measure_scratch
from edgetune.compiler.backends.torch import NonFiniteError
from edgetune.compiler.checkpoint import load_checkpoint, save_checkpoint
from edgetune.compiler.inputs import (BatchError, Bindings, IndexUse, index_uses, mask_inputs, refuse_nonfinite,
                                      refuse_out_of_range, step_inputs)
from edgetune.compiler.ir.builder import Builder
from edgetune.compiler.ir.graph import Graph, Node, leaves_first
from edgetune.compiler.ir.ops import ChannelSlice, is_effect
from edgetune.compiler.ir.ops.quant import dequantize, quantize_per_channel
from edgetune.compiler.ir.ops.recurrent import RNN_WEIGHTS
from edgetune.compiler.ir.verify import checks_enabled, verify
from edgetune.compiler.isolate import run_isolated
from edgetune.compiler.memory import BudgetError, MemoryPlan, parse_bytes, plan
from edgetune.compiler.optim import SGD, Adafactor, AdamW, GaLore, MeZO
from edgetune.compiler.passes import (PIPELINE, run_forward_pipeline, run_pipeline, split_passes,
                                      with_blocks_recomputed_to_fit)
from edgetune.compiler.passes.int8 import int8_frozen_linears
from edgetune.compiler.report import Report, build_report

if TYPE_CHECKING:
    from edgetune.compiler.frontend.torch import ForwardGraph


@dataclass(frozen=True)
class StepResult:
    """What the last step did: its loss, and how many of its writes (parameter updates and
    buffer writes, `writes` in all) were skipped because their gradient or the loss was not
    finite (`compile(..., on_nonfinite="skip")`)."""

    loss: float
    skipped: int
    writes: int
    # MeZO: (seed, projected gradient) of each direction; the update is a function of these
    # alone (Trainer.replay applies such pairs: FedKSeed sends nothing else)
    directions: tuple[tuple[int, float], ...] = ()


@dataclass
class Update:
    """One trained parameter (or LoRA adapter): its slice (None = whole), its input node and
    optimizer state, and the layer it belongs to (an adapter's is the layer it adapts)."""

    name: str
    node: Node
    part: ChannelSlice | None
    state: list[Node]
    module: str = ""

    @property
    def trained_entries(self) -> int:
        n = math.prod(self.node.shape)
        return n if self.part is None else n // self.node.shape[self.part.axis] * self.part.k


def compile(model: torch.nn.Module, loss_fn: Callable, example_inputs: tuple, example_targets: tuple,
            scheme: schemes.SchemeLike | None = None, optimizer: SGD | AdamW | Adafactor | GaLore | MeZO | None = None,
            *, passes: list | None = None, frozen_weights: str = "float",
            memory_budget: int | str | None = None, on_nonfinite: str = "skip",
            backend: str = "torch", max_shapes: int = 1) -> "Trainer":
    """Compile one training step of `model` under `scheme` (default: full) with `optimizer`.

    The step computes `loss_fn(model(*inputs), *targets)`; `example_inputs` may instead be a
    dict, passed by keyword (`model(**inputs)`: {"input_ids": ..., "attention_mask": ...} for a
    model whose forward takes other arguments between them), and `step()` then takes a dict
    with the same keys.

    `passes` replaces the optimization passes (default: edgetune.compiler.passes.FORWARD_PIPELINE, run
    before autodiff, then PIPELINE); a list may take entries of both.
    `frozen_weights="int8"` holds every frozen linear weight as int8 (per output channel) and
    releases its float storage; `with trainer.dequantized():` lends the model float weights
    back for plain PyTorch use (evaluation, generation).
    `memory_budget` (bytes, or text like "64MB"): a contract on the predicted peak of one step
    (`report().predicted_peak_bytes`). A step over it first has its first transformer blocks
    recomputed in the backward, as few as bring it within (edgetune.compiler.passes.blocks:
    the same numbers, a forward of each such block more); one still over it is refused with a
    BudgetError that names the layers making the peak, before the step's memory is allocated.
    `on_nonfinite`: what a step does when its loss or a gradient is NaN or infinite. "skip"
    (default): each update runs only where the loss and its own gradient are finite (so do
    buffer writes, where the loss is); a skipped one leaves its parameter and optimizer state
    bitwise unchanged, and `trainer.last_step.skipped` counts them. "raise": NonFiniteError
    before any parameter, state or buffer changes (updates then wait for every gradient
    instead of running as soon as theirs exists, which raises the peak). "apply": no checks.
    A NaN or inf in the batch itself is bad data, not an overflow: "skip" and "raise" refuse
    such a batch before the step runs (see Trainer._check_batch); "apply" lets it through.
    `backend`: what runs the step. "torch": torch kernels called from generated Python.
    "onnxruntime": the step lowered to ONNX and run by an onnxruntime session (CPU; needs the
    `onnx` extra), which holds its own copy of the frozen weights (change them through
    Trainer.load, or compile again). "auto": times each backend available here on the
    example batch (a few steps each, parameters and optimizer state restored after) and keeps the faster;
    `report()` says which ran and each one's time. The Trainer behaves the same on each.
    `max_shapes`: how many batch shapes the Trainer keeps a compiled step for. 1 (default):
    the examples' shape only; a batch of another shape is refused. N > 1: a batch of a new
    shape (the last partial batch, a longer sequence bucket) compiles a step for it on first
    use, sharing the parameters, optimizer state, LoRA adapters and int8 weights with the
    others, and the partial-channel choice of the first; beyond N, the step of the shape
    used least recently is dropped. Each new shape costs a compile (`report()` lists each
    shape's compile time and predicted peak) and is held to `memory_budget` too; under
    backend="onnxruntime" each shape's session holds its own copy of the frozen weights.
    """
    if frozen_weights not in ("float", "int8"):
        raise ValueError(f"frozen_weights must be 'float' or 'int8', got {frozen_weights!r}")
    if on_nonfinite not in ("skip", "raise", "apply"):
        raise ValueError(f"on_nonfinite must be 'skip', 'raise' or 'apply', got {on_nonfinite!r}")
    budget = None if memory_budget is None else parse_bytes(memory_budget)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if isinstance(max_shapes, bool) or not isinstance(max_shapes, int) or max_shapes < 1:
        raise ValueError(f"max_shapes must be a whole number >= 1, got {max_shapes!r}")
    return Trainer(model, loss_fn, example_inputs, example_targets,
                   schemes.full() if scheme is None else scheme, optimizer or SGD(lr=0.01), passes,
                   int8=frozen_weights == "int8", memory_budget=budget, on_nonfinite=on_nonfinite, backend=backend,
                   max_shapes=max_shapes)


@dataclass
class Variant:
    """The step compiled for one batch shape: its examples, graph, updates, memory plan and
    backend, and how long each phase of its compile took (seconds: export, graph = autodiff
    and passes, plan = memory plan and scratch, backend = code generation or session)."""

    examples: tuple[tuple, tuple]
    graph: Graph
    updates: list[Update]
    plan: MemoryPlan
    seconds: dict[str, float]
    backend: Any = None     # a BackendChoice, once the Trainer holds what the step binds
    bindings: Any = None
    index_uses: list[IndexUse] | None = None  # the batch tensors that index a table, read once
    masks: set[int] | None = None  # the batch tensors read only as attention masks (may hold -inf)
    writes: int = 0  # parameter updates and buffer writes of one step (StepResult.writes)

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return _shapes(self.examples[0] + self.examples[1])

    def finish(self, trainer: "Trainer", backend: str) -> None:
        started = time.perf_counter()
        self.bindings = Bindings(step_inputs(self.graph), trainer.held())
        self.writes = sum(1 for n in self.graph.nodes if is_effect(n))
        self.backend = choose_backend(trainer, backend)
        self.seconds["backend"] = time.perf_counter() - started


class Trainer:
    def __init__(self, model, loss_fn, example_inputs, example_targets, scheme, optimizer, passes=None,
                 int8: bool = False, memory_budget: int | None = None, on_nonfinite: str = "skip",
                 backend: str = "torch", max_shapes: int = 1) -> None:
        self.model, self.loss_fn, self.optimizer, self.lr = model, loss_fn, optimizer, optimizer.lr
        # Inputs given as a dict go to the model by keyword (model(**inputs)), in this order.
        self.input_names = tuple(example_inputs) if isinstance(example_inputs, Mapping) else None
        examples = (self._inputs(example_inputs, "example_inputs"), _as_tuple(example_targets, "example_targets"))
        self.rules = schemes.resolve(scheme, model)
        # LoRA adapters by name ("<layer>.lora_A.weight"); updated in place like parameters.
        self.adapters = lora.init_adapters(model, self.rules)
        self.device = _device_of(model, examples[0])
        self._compile_options = dict(passes=passes, int8=int8, on_nonfinite=on_nonfinite, memory_budget=memory_budget)
        self.memory_budget, self.max_shapes, self.on_nonfinite = memory_budget, max_shapes, on_nonfinite
        self._channels: dict[str, torch.Tensor] | None = None  # set by the first compile, kept by the rest
        # Compiled steps by batch shape, the one used last at the end (edgetune's shape buckets).
        self.variants: dict[tuple, Variant] = {}
        self.int8: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # none yet: the first trace has the floats
        self.active = self._compile_variant(examples)
        self.first_examples = examples  # compile()'s: export_onnx writes their step
        self._channels = {u.name: u.part.index.attrs["value"] for u in self.updates if u.part is not None}
        # Optimizer state by "<parameter>:<name>", e.g. "fc.weight:momentum_buffer".
        self.state = {n.attrs["target"]: torch.zeros(n.shape, dtype=n.dtype, device=self.device)
                      for u in self.updates for n in u.state}
        # Frozen linear weights held as int8: {parameter name: (int8 values, per-row scales)}.
        self.int8 = self._quantize_and_release()
        self.steps = 0
        self.last_step: StepResult | None = None
        # What runs the step (edgetune.compiler.backends.choice): set last, as "auto" steps the
        # trainer to time each backend. Later shapes take the backend chosen here.
        self.active.finish(self, backend)
        self.variants[self.active.shapes] = self.active

    # -- the active step (the one for the shape of the last batch) ---------------------------

    @property
    def examples(self) -> tuple[tuple, tuple]:
        return self.active.examples

    @property
    def graph(self) -> Graph:
        return self.active.graph

    @property
    def updates(self) -> list[Update]:
        return self.active.updates

    @property
    def plan(self) -> MemoryPlan:
        return self.active.plan

    @property
    def backend(self):
        return self.active.backend

    @property
    def compiled(self) -> Callable:
        return self.active.backend.step

    @compiled.setter
    def compiled(self, step: Callable) -> None:
        self.active.backend.step = step

    @property
    def _bindings(self) -> Bindings:
        return self.active.bindings

    @property
    def _writes(self) -> int:
        return self.active.writes

    # -- compiling ----------------------------------------------------------------------------

    def _compile_variant(self, examples: tuple[tuple, tuple]) -> Variant:
        """The step for `examples`' shapes, not yet bound (Variant.finish binds it): traced and
        optimized in a forked child (edgetune.compiler.isolate), then planned here."""
        model, rules, options, channels = self.model, self.rules, self._compile_options, self._channels

        def build():
            with self.dequantized():  # int8 weights lend their floats to the trace; in the child only, if forked
                return _training_graph(model, self.loss_fn, examples, rules, self.optimizer, channels=channels,
                                       input_names=self.input_names, **options)

        graph, updates, seconds = run_isolated(build, self.device)
        started = time.perf_counter()
        memory = plan(graph, measure_scratch(graph, self.device))
        seconds["plan"] = time.perf_counter() - started
        if self.memory_budget is not None:
            _check_budget(memory, self.memory_budget, rules, _shapes(examples[0] + examples[1]))
        if os.environ.get("EDGETUNE_DEBUG"):
            phases = ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items())
            print(f"[edgetune] compiled the step for batch shapes {_shapes(examples[0] + examples[1])}: {phases}")
        return Variant(examples, graph, updates, memory, seconds)

    def _use_step_for(self, inputs: tuple, targets: tuple) -> None:
        """Make the step for this batch's shapes the active one, compiling it if it is new and
        max_shapes allows; BatchError (nothing changed) where the batch cannot be taken."""
        self._check_kind(inputs, targets)
        shapes = _shapes(inputs + targets)
        if shapes == self.active.shapes:
            return
        variant = self.variants.pop(shapes, None)
        if variant is None:
            variant = self._new_variant(inputs, targets)
        self.variants[shapes] = variant  # now the most recently used
        while len(self.variants) > self.max_shapes:
            del self.variants[next(iter(self.variants))]
        self.active = variant

    def _new_variant(self, inputs: tuple, targets: tuple) -> Variant:
        if self.max_shapes == 1:
            batch, examples = inputs + targets, self.examples[0] + self.examples[1]
            k = next(k for k, (t, e) in enumerate(zip(batch, examples)) if t.shape != e.shape)
            raise BatchError(f"{self._batch_names(inputs, targets)[k]} is {_describe(batch[k])} but the step was "
                             f"compiled for {_describe(examples[k])}; compile with max_shapes=N to take up to N batch "
                             "shapes (each compiled on first use), or drop the last partial batch")
        examples = (tuple(t.detach() for t in inputs), tuple(t.detach() for t in targets))
        try:
            variant = self._compile_variant(examples)
        except BudgetError:
            raise
        except Exception as err:  # noqa: BLE001 -- the batch is refused; why is in the message and the cause
            first = _shapes(self.first_examples[0] + self.first_examples[1])
            raise BatchError(f"no step could be compiled for batch shapes {_shapes(inputs + targets)} (the "
                             f"examples' were {first}): {type(err).__name__}: {err}") from err
        backend = self.backend.name
        with self._using(variant):
            variant.finish(self, backend)
        return variant

    @contextlib.contextmanager
    def _using(self, variant: Variant):
        """`variant` active inside (to bind, time or export it), the active one back after."""
        previous, self.active = self.active, variant
        try:
            yield variant
        finally:
            self.active = previous

    # -- running --------------------------------------------------------------------------

    def step(self, inputs: tuple, targets: tuple) -> float:
        """One training step on a batch; returns the loss. A batch of a shape unlike the
        examples' runs the step compiled for its shape (compile(max_shapes=...))."""
        inputs, targets = self._inputs(inputs, "inputs"), _as_tuple(targets, "targets")
        self._use_step_for(inputs, targets)
        batch = self._check_batch(inputs, targets)
        try:
            out = self.compiled(*self._arguments(batch, step=self.steps + 1))
        except NonFiniteError:
            raise NonFiniteError(f"step {self.steps + 1}: the loss or a gradient is NaN or infinite; nothing was "
                                 "updated (lower the learning rate, or check the batch)") from None
        self.steps += 1
        directions = ()
        if "zo_grads" in out:
            directions = tuple(zip(self.optimizer.seeds_for(self.steps), out["zo_grads"].tolist()))
        self.last_step = StepResult(float(out["loss"]), int(out["skipped"]), self._writes, directions)
        return self.last_step.loss

    def replay(self, directions: Sequence[tuple[int, float]], lr: float | None = None) -> None:
        """Apply zeroth-order updates given as (seed, projected gradient) pairs, with no forward
        pass: every trained entry moves by -lr * sum of g * z(seed) (the trainer's lr unless
        given; no weight decay). A MeZO step of d directions is its pairs with g / d; FedKSeed
        replays the pairs a server aggregated from other clients' steps."""
        if not isinstance(self.optimizer, MeZO):
            raise TypeError(f"replay() applies MeZO updates; this trainer's optimizer is "
                            f"{type(self.optimizer).__name__}")
        scale = -float(self.lr if lr is None else lr)
        terms = [(int(seed), scale * float(g)) for seed, g in directions]
        held = {**dict(self.model.named_parameters()), **self.adapters}
        with torch.no_grad():
            for u in self.updates:
                zo.add_to_trained(held[u.name], zo.parameter_key(u.name), u.part, terms)

    def _arguments(self, batch: list[torch.Tensor], step: int) -> list[Any]:
        hyper = {"lr": float(self.lr), "step": step}
        if isinstance(self.optimizer, MeZO):
            hyper.update({f"zo_seed{d}": s for d, s in enumerate(self.optimizer.seeds_for(step))})
        return self._bindings.arguments({"hyper": hyper, "input": batch, "target": batch})

    def held(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every tensor a step may hold, by kind and key (edgetune.compiler.inputs): the model's
        parameters and buffers, and what the Trainer holds (optimizer state, LoRA adapters,
        int8 weights)."""
        return {"param": {k: p.detach() for k, p in self.model.named_parameters(remove_duplicate=False)},
                "buffer": dict(self.model.named_buffers()),
                "state": self.state, "adapter": self.adapters,
                "int8": {k: q for k, (q, _) in self.int8.items()},
                "int8_scale": {k: scale for k, (_, scale) in self.int8.items()}}

    def _batch_names(self, inputs: tuple, targets: tuple) -> list[str]:
        names = [f"input {k!r}" for k in self.input_names] if self.input_names else [
            f"input {k}" for k in range(len(inputs))]
        return names + [f"target {k}" for k in range(len(targets))]

    def _inputs(self, inputs: Any, what: str) -> tuple:
        """The model's inputs as a tuple: positional, or a dict's values in the examples' key order."""
        if not isinstance(inputs, Mapping):
            if self.input_names:
                raise TypeError(f"{what} must be a dict of {', '.join(self.input_names)} (as the examples were), "
                                f"got {type(inputs).__name__}")
            return _as_tuple(inputs, what)
        if self.input_names is None:
            raise TypeError(f"{what} must be a tuple of tensors (as the examples were), got a dict")
        if set(inputs) != set(self.input_names):
            raise BatchError(f"{what} has keys {sorted(inputs)}; the examples had {sorted(self.input_names)}")
        return tuple(inputs[k] for k in self.input_names)

    def _check_kind(self, inputs: tuple, targets: tuple) -> None:
        """BatchError unless the batch has the examples' count of tensors, each of their
        dtype, device and number of dimensions (only sizes may differ, with max_shapes > 1)."""
        batch, examples = list(inputs) + list(targets), list(self.examples[0]) + list(self.examples[1])
        if len(inputs) != len(self.examples[0]) or len(targets) != len(self.examples[1]):
            raise BatchError(f"step() got {len(inputs)} inputs and {len(targets)} targets; the examples had "
                             f"{len(self.examples[0])} and {len(self.examples[1])}")
        for what, t, e in zip(self._batch_names(inputs, targets), batch, examples):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{what} must be a tensor, got {type(t).__name__}")
            if t.dtype != e.dtype or t.device != e.device or t.dim() != e.dim():
                raise BatchError(f"{what} is {_describe(t)} but the step was compiled for {_describe(e)}; "
                                 "give it the examples' dtype, device and number of dimensions")

    def _check_batch(self, inputs: tuple, targets: tuple) -> list[torch.Tensor]:
        """The batch as the step takes it (inputs, then targets), or a BatchError before anything
        changes (its count, dtype, device and shape were checked by _use_step_for): a value
        outside the table it indexes (a token id beyond an embedding's rows, a class label
        beyond the loss's classes); a NaN or inf in a float tensor (an attention mask's -inf
        excepted: inputs.mask_inputs). The last is refused unless
        on_nonfinite="apply": the step's guard is there for overflows a step makes, whereas a
        non-finite batch is bad data that would come back every epoch, silently skipped; with
        "apply" (no checks) it runs, as asked. The value checks are one reduction per tensor:
        0.1-1.5% of a small ConvNet's CPU step (batch 32x3x64x64 .. 4x3x8x8), most of it
        fixed per-call overhead."""
        batch, names = list(inputs) + list(targets), self._batch_names(inputs, targets)
        for use in self._index_uses:
            refuse_out_of_range(batch[use.position], names[use.position], use)
        if self.on_nonfinite != "apply":
            if self.active.masks is None:
                self.active.masks = mask_inputs(self.graph)
            for position, (what, t) in enumerate(zip(names, batch)):
                refuse_nonfinite(t, what, mask=position in self.active.masks)
        return batch

    @property
    def _index_uses(self) -> list[IndexUse]:
        """The batch tensors that index a table, and its size: read from the step's graph."""
        if self.active.index_uses is None:
            self.active.index_uses = index_uses(self.graph)
        return self.active.index_uses

    # -- int8 frozen weights ----------------------------------------------------------------

    def _quantize_and_release(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Quantize each weight the step takes as int8 and free its float storage at once, so
        memory never holds both copies of the whole model."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        int8 = {}
        for i in step_inputs(self.graph):
            if i.kind == "int8":
                name = i.key
                int8[name] = quantize_per_channel(params[name])
                params[name].data = params[name].data.new_empty(0)
        return int8

    def _release_int8_floats(self) -> None:
        """Free the float storage of the weights the step holds as int8 (the point of int8)."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        for name in self.int8:
            params[name].data = params[name].data.new_empty(0)

    @contextlib.contextmanager
    def dequantized(self):
        """The model with float weights (dequantized from the int8 the step uses) while inside,
        for plain PyTorch forward passes; released again on exit. A no-op without int8."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        for name, (q, scale) in self.int8.items():
            params[name].data = dequantize(q, scale)
        try:
            yield self.model
        finally:
            self._release_int8_floats()

    # -- state ------------------------------------------------------------------------------

    @property
    def trainable_params(self) -> int:
        return sum(u.trained_entries for u in self.updates)

    def trained_masks(self) -> dict[str, torch.Tensor]:
        """{parameter name: bool mask of the entries a step updates}, for every trained parameter
        of the model (LoRA adapters are not the model's, and a LoRA weight does not change)."""
        params = dict(self.model.named_parameters())
        masks = {}
        for u in self.updates:
            if u.name in self.adapters:
                continue
            mask = torch.zeros_like(params[u.name], dtype=torch.bool)
            if u.part is None:
                mask.fill_(True)
            else:
                index = u.part.index.attrs["value"].to(mask.device)
                mask.index_fill_(u.part.axis, index, True)
            masks[u.name] = mask
        return masks

    def report(self) -> Report:
        return build_report(self)

    def _model_state(self, frozen: bool = True) -> dict[str, torch.Tensor]:
        # Weights held as int8 are left out: they never change, and a trainer compiled with
        # int8 quantizes the same pretrained weights again. frozen=False keeps only what a step
        # can write: the trained parameters and the buffers (a train-mode norm's statistics).
        state = {k: v for k, v in self.model.state_dict().items() if k not in self.int8}
        if frozen:
            return state
        written = self.written_names()
        return {k: v for k, v in state.items() if k in written}

    def written_names(self) -> set[str]:
        """The model's tensors a step may write: trained parameters and buffers."""
        return {u.name for u in self.updates} | {n for n, _ in self.model.named_buffers()}

    def state_dict(self, frozen: bool = True) -> dict[str, Any]:
        """Step count, lr, model weights, optimizer state and LoRA adapters. frozen=False
        leaves out the weights no step changes (a resumable run's checkpoint: the frozen
        weights come again from where the model came from)."""
        return {"step": self.steps, "lr": self.lr, "frozen": frozen, "model": self._model_state(frozen),
                "optimizer": {k: v.clone() for k, v in self.state.items()},
                "adapters": {k: v.clone() for k, v in self.adapters.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore model weights, optimizer state, LoRA adapters, step count and lr; checked
        before anything changes."""
        opt, adapters = state["optimizer"], state.get("adapters", {})  # older checkpoints: no adapters
        _check_same("model weights", state["model"], self._model_state(frozen=state.get("frozen", True)))
        _check_same("optimizer state", opt, self.state)
        _check_same("LoRA adapters", adapters, self.adapters)
        # Checked above; weights held as int8 (and, frozen=False, every frozen weight) are not
        # in the state.
        self.model.load_state_dict(state["model"], strict=False)
        for mine, theirs in ((self.state, opt), (self.adapters, adapters)):
            for k, v in theirs.items():
                mine[k].copy_(v)
        self.steps, self.lr = int(state["step"]), float(state["lr"])
        if state.get("frozen", True):
            self._frozen_changed()

    def _frozen_changed(self) -> None:
        """Every compiled shape's backend sees the frozen weights as they are now."""
        for variant in self.variants.values():
            with self._using(variant):
                variant.backend.frozen_changed(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write a checkpoint (safetensors, edgetune.compiler.checkpoint) atomically: a crash
        leaves the old file or the new, never half of one."""
        save_checkpoint(self.state_dict(), path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint of Trainer.save; checked against this trainer before anything changes."""
        self.load_state_dict(load_checkpoint(path, self.device))

    def export_onnx(self, path: str | os.PathLike) -> Any:
        """Write the whole training step as one plain ONNX graph into folder `path`: step.onnx,
        manifest.json (inputs, outputs, which output feeds which input next step, the scheme
        and optimizer) and state.safetensors (what step 1 takes). Returns the onnx.ModelProto.
        The step is that of the examples' shapes (compiled again if max_shapes let it go).
        See edgetune.compiler.backends.onnx; needs the `onnx` extra."""
        from edgetune.compiler.backends.onnx import export_step

        first = self.first_examples
        variant = self.variants.get(_shapes(first[0] + first[1])) or self._new_variant(*first)
        with self._using(variant):
            return export_step(self, path)


def _check_budget(plan_: MemoryPlan, budget: int, rules: dict[str, schemes.Rule], shapes: tuple) -> None:
    """BudgetError where the predicted peak is over `budget`, naming the three layers that hold
    most of it and the scheme rules that train them."""
    if plan_.peak_bytes <= budget:
        return
    top = plan_.peak_by_layer()[:3]
    mb = lambda n: f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"  # noqa: E731  (never '0.00 MB')
    layers = ", ".join(f"{layer or '<model>'} {mb(n)}" for layer, n in top)
    trained = [name for name in rules if any(layer and name.startswith(layer + ".") for layer, _ in top)]
    drop = f"train fewer of these layers (the scheme trains {', '.join(trained)} there), " if trained else ""
    raise BudgetError(f"the step's predicted peak is {mb(plan_.peak_bytes)} (batch shapes {shapes}), over the "
                      f"memory budget of {mb(budget)}; "
                      f"most of it is held by {layers}. To fit: {drop}use a smaller batch, or search for a "
                      f"scheme that fits: `edgetune search --budget {_budget_text(budget)}` (`search-lm` for a "
                      "language model)")


def _budget_text(budget: int) -> str:
    """A budget as the CLI reads it back: MB, or KB below one MB (never '0MB')."""
    return f"{budget / 2**20:.4g}MB" if budget >= 2**20 else f"{math.ceil(budget / 2**10)}KB"


def _check_same(what: str, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    if set(got) != set(want):
        raise ValueError(f"{what} does not match this trainer: missing {sorted(set(want) - set(got))}, "
                         f"unexpected {sorted(set(got) - set(want))}")
    for k, v in got.items():
        if v.shape != want[k].shape:
            raise ValueError(f"{what} {k!r} has shape {tuple(v.shape)}, expected {tuple(want[k].shape)}")
        if v.dtype != want[k].dtype:  # a copy would convert it silently
            raise ValueError(f"{what} {k!r} is {v.dtype}, this trainer holds {want[k].dtype}: load a checkpoint "
                             "of the model in the dtype it was saved in")


# -- building the training graph ------------------------------------------------------------

def _training_graph(model, loss_fn, examples, rules: dict, optimizer, passes, int8=False, on_nonfinite="skip",
                    channels=None, input_names=None, memory_budget=None) -> tuple[Graph, list[Update], dict[str, float]]:
    """Trace, differentiate under the scheme, add the updates, optimize: the whole compile,
    with the seconds its two phases took (export, graph)."""
    from edgetune.compiler.frontend.torch import export  # loads torch.export: only where the compile runs

    started = time.perf_counter()
    lora_weights = frozenset(name for name, rule in rules.items() if rule.lora)  # a LoRA head stays a linear
    forward = export(model, loss_fn, *examples, input_names=input_names, linear_kept=lora_weights)
    traced = time.perf_counter()
    graph, updates = training_graph(forward, model, rules, optimizer, passes, int8, on_nonfinite, channels,
                                    memory_budget)
    return graph, updates, {"export": traced - started, "graph": time.perf_counter() - traced}


def training_graph(forward: "ForwardGraph", model, rules: dict, optimizer, passes=None,
                   int8: bool = False, on_nonfinite: str = "skip",
                   channels: dict[str, torch.Tensor] | None = None,
                   memory_budget: int | None = None) -> tuple[Graph, list[Update]]:
    """Everything after the trace: differentiate under `rules`, add the updates, optimize.

    `forward` is only read, so one export serves many schemes (edgetune.apps.search does that).
    LoRA rules first rewrite their linears to run the adapters, which then train instead.
    `on_nonfinite`: see `compile`. `channels`: the channels each partial rule trains, by
    parameter name, where an earlier compile chose them (a magnitude choice made again on
    trained weights could differ); else chosen here. `memory_budget`: where the optimized
    step's predicted peak is over it, transformer blocks are recomputed in the backward until it
    fits (edgetune.compiler.passes.blocks)."""
    params = dict(model.named_parameters())
    if isinstance(optimizer, MeZO):
        return _zo_training_graph(forward, model, rules, optimizer, passes, int8, on_nonfinite, channels)
    before_autodiff, after_autodiff = split_passes(passes)
    if on_nonfinite == "raise":  # every gradient is checked before the first update changes anything
        after_autodiff = [p for p in after_autodiff if p[0] != "reorder"]
    if memory_budget is not None:
        after_autodiff = with_blocks_recomputed_to_fit(after_autodiff, memory_budget)
    graph, adapters = _prepared_forward(forward, rules, int8, before_autodiff)
    b = Builder(graph.nodes)
    loss = graph.outputs["loss"]
    loss_ok = b.emit("is_finite", loss) if on_nonfinite != "apply" else None  # before the backward starts
    channels = channels or {}
    parts = {forward.params[name]: _part(b, forward, name, rule, params[name], channels.get(name))
             for name, rule in rules.items() if name in forward.params and not rule.lora}
    trainable = {**{n: (p if p else True) for n, p in parts.items()}, **{a: True for a in adapters.values()}}
    grads = differentiate(graph, loss, trainable, b)
    lr = b.input("lr", (), torch.float64, kind="hyper")
    step = b.input("step", (), torch.int64, kind="hyper")
    guard = _guards(b, on_nonfinite, loss_ok, grads)
    updates = []
    tables = {n.inputs[0] for n in graph.nodes if n.op == "embedding"}  # GaLore leaves these to AdamW by default
    for node, grad in grads.items():
        part, target = parts.get(node), node.attrs["target"]
        module = lora.layer_of(target) if node.attrs["kind"] == "adapter" else target.rpartition(".")[0]
        touched = bool(part and part.touched)  # the state covers the whole table; a row's moves when it is read
        rule = optimizer.update_for(target, node.shape if touched else grad.shape, table=node in tables,
                                    touched=touched)
        state = [b.input(f"{node.name}_{s}", shape, grad.dtype, kind="state", target=f"{target}:{s}")
                 for s, shape in rule.state]
        index = [part.index] if part and not part.first else []
        b.meta = {"module": module, "update_of": target}
        fixed = None if touched else part
        b.emit(rule.op, node, grad, lr, step, *state, *index, *guard.condition(node),
               part=(fixed.axis, fixed.k) if fixed else None, n_state=len(state), **rule.attrs, **guard.attrs,
               **({"touched": True} if touched else {}))
        updates.append(Update(target, node, fixed, state, module))
    b.meta = {}
    for key, value in graph.outputs.items():
        if key.startswith("buffer:"):
            b.emit("assign", forward.buffers[key.removeprefix("buffer:")], value, *guard.condition(None), **guard.attrs)
    graph = leaves_first(b.graph({"loss": loss}))
    if checks_enabled():
        verify(graph, where="autodiff")
    return run_pipeline(graph, after_autodiff), updates


def _prepared_forward(forward: "ForwardGraph", rules: dict, int8: bool, pipeline: list) -> tuple[Graph, dict]:
    """The forward graph running the LoRA adapters, with frozen linears as int8 if asked and
    the forward passes run: (graph, {adapter name: its input node})."""
    graph, adapters = lora.attach(forward.graph, forward.params, rules)
    trained = {forward.params[name] for name, rule in rules.items() if name in forward.params and not rule.lora}
    if int8:
        graph = int8_frozen_linears(graph, trained)
    return run_forward_pipeline(graph, trained, pipeline), adapters


def _zo_training_graph(forward: "ForwardGraph", model, rules: dict, optimizer: MeZO, passes, int8: bool,
                       on_nonfinite: str, channels) -> tuple[Graph, list[Update]]:
    """A zeroth-order step (edgetune.compiler.zo): forward passes at perturbed weights, no autodiff."""
    params = dict(model.named_parameters())
    graph, adapters = _prepared_forward(forward, rules, int8, split_passes(passes)[0])
    b = Builder(graph.nodes)
    moved = []
    for name, rule in rules.items():
        if name not in forward.params or rule.lora:
            continue
        if rule.touched:
            raise schemes.SchemeError(f"{name!r}: a 'touched' rows rule is for gradients; with MeZO give the table "
                                      "chosen rows ({'rows': [ids]}) or 'full'")
        part = _part(b, forward, name, rule, params[name], (channels or {}).get(name))
        moved.append(zo.Trained(forward.params[name], part, zo.parameter_key(name)))
    moved += [zo.Trained(node, None, zo.parameter_key(name)) for name, node in adapters.items()]
    graph = zo.zo_graph(Graph(b.nodes, graph.outputs), moved, optimizer, forward.buffers, on_nonfinite)
    graph = run_pipeline(leaves_first(graph), [p for p in PIPELINE if p[0] == "dce"])
    if checks_enabled():
        verify(graph, where="zo")
    updates = [Update(t.node.attrs["target"], t.node, t.part, [],
                      lora.layer_of(t.node.attrs["target"]) if t.node.attrs["kind"] == "adapter"
                      else t.node.attrs["target"].rpartition(".")[0]) for t in moved]
    return graph, updates


@dataclass
class _Guards:
    """The condition each update (by its parameter node) and each buffer write (None) runs under."""

    mode: str
    conditions: dict[Node | None, Node]

    @property
    def attrs(self) -> dict[str, str]:
        return {"guarded": self.mode} if self.conditions else {}

    def condition(self, node: Node | None) -> list[Node]:
        return [self.conditions[node]] if self.conditions else []


def _guards(b: Builder, mode: str, loss_ok: Node | None, grads: dict[Node, Node]) -> _Guards:
    """skip: an update runs where the loss and its own gradient are finite, a buffer write
    where the loss is. raise: everything runs only where the loss and every gradient are
    finite, checked once before the first update (the reorder pass is off in this mode)."""
    if mode == "apply":
        return _Guards(mode, {})
    finite = {node: b.emit("update_ok", loss_ok, grad) for node, grad in grads.items()}
    if mode == "skip":
        return _Guards(mode, {**finite, None: loss_ok})
    everything = b.emit("all_of", *finite.values()) if finite else loss_ok
    return _Guards(mode, {**{node: everything for node in grads}, None: everything})


def _part(b: Builder, forward: "ForwardGraph", name: str, rule: schemes.Rule, weight: torch.Tensor,
          index: torch.Tensor | None = None):
    if rule.touched:
        return _touched_rows(b, forward, name)
    if not rule.partial:
        return None
    if rule.rows:
        axis, index = _rows_axis(forward, name), _chosen_rows(name, rule, weight)
    else:
        axis = _channel_axis(forward, name)
        index = schemes.choose_channels(weight, axis, rule) if index is None else index
    first = bool(torch.equal(index, torch.arange(len(index))))
    return ChannelSlice(axis, b.const(index), first)


def _chosen_rows(name: str, rule: schemes.Rule, weight: torch.Tensor) -> torch.Tensor:
    if rule.rows[-1] >= weight.shape[0]:
        raise schemes.SchemeError(f"rows rule on {name!r}: row {rule.rows[-1]} is out of range, the table has "
                                  f"{weight.shape[0]} rows (token ids 0..{weight.shape[0] - 1})")
    return torch.tensor(rule.rows, dtype=torch.int64)


def _rows_axis(forward: "ForwardGraph", name: str) -> int:
    """Axis 0, where every op that reads the weight reads it by rows: an embedding lookup, or
    the output features of a linear layer or of the fused vocabulary loss (a tied LM head)."""
    node = forward.params[name]
    for u in forward.graph.nodes:
        if node not in u.inputs:
            continue
        by_rows = (u.op == "embedding" and u.inputs[0] is node) or (
            u.op in ("linear", "vocab_log_prob") and u.inputs[1] is node and u.inputs[0] is not node)
        if not by_rows:
            raise schemes.SchemeError(f"a rows rule needs an embedding table or an LM head (a layer whose rows are its outputs), but {name!r} is "
                                      f"used by op '{u.op}' (module '{u.meta.get('module', '?')}')")
    return 0


def _touched_rows(b: Builder, forward: "ForwardGraph", name: str) -> ChannelSlice:
    """The rows the batch looks up, as the one embedding lookup of the table reads them."""
    node = forward.params[name]
    users = [u for u in forward.graph.nodes if node in u.inputs]
    if len(users) != 1 or users[0].op != "embedding" or users[0].inputs[0] is not node:
        uses = ", ".join(f"'{u.op}' (module '{u.meta.get('module', '?')}')" for u in users) or "nothing"
        raise schemes.SchemeError(
            f"a 'touched' rows rule needs a table that one embedding lookup alone reads, but {name!r} is read by "
            f"{uses}; a tied LM head gives every row a gradient: train chosen rows ({{'rows': [ids]}}) or a "
            "ratio of its hidden axis instead")
    ids = users[0].inputs[1]
    return ChannelSlice(0, b.emit("reshape", ids, shape=(math.prod(ids.shape),)), first=False, touched=True)


def _channel_axis(forward: "ForwardGraph", name: str) -> int:
    """Input channels of the op that consumes the weight: axis 1 of a conv/linear/LSTM weight,
    axis 0 of a depthwise conv's and of a transposed linear's (x @ W, transformers' Conv1D);
    the hidden axis (1) of an embedding table and of the LM head in the fused vocabulary loss
    (a tied embedding is both)."""
    node = forward.params[name]
    users = [n for n in forward.graph.nodes if node in n.inputs]
    axes = set()
    for u in users:
        if u.op == "conv" and u.inputs[1] is node:
            depthwise = u.attrs["groups"] > 1 and u.attrs["groups"] == u.inputs[0].shape[1]
            axes.add(0 if depthwise else 1)
        elif u.op in ("linear", "vocab_log_prob") and u.inputs[1] is node:
            axes.add(1)
        elif u.op == "embedding" and u.inputs[0] is node:
            axes.add(1)
        elif u.op == "mm" and u.inputs[1] is node and u.inputs[0] is not node:
            axes.add(0)
        elif u.op in RNN_WEIGHTS and _only_a_weight_of(node, u, RNN_WEIGHTS[u.op]):
            axes.add(1)  # an LSTM's or GRU's weight: its input features, as a linear's
        else:
            raise schemes.SchemeError(f"a ratio rule needs the weight of a conv, linear or embedding layer, but "
                                      f"{name!r} is used by op '{u.op}' (module '{u.meta.get('module', '?')}')")
    if len(axes) != 1:
        raise schemes.SchemeError(f"cannot tell the channel axis of {name!r}: it is used as {sorted(axes)}")
    return axes.pop()


def _only_a_weight_of(node, user, positions: tuple[int, ...]) -> bool:
    """Whether `node` is among `user`'s inputs at `positions` and at none of its others."""
    used_at = {k for k, x in enumerate(user.inputs) if x is node}
    return bool(used_at) and used_at <= set(positions)


def _as_tuple(x: Any, what: str) -> tuple:
    if isinstance(x, torch.Tensor):
        return (x,)
    if not isinstance(x, (tuple, list)):
        raise TypeError(f"{what} must be a tuple of tensors, got {type(x).__name__}")
    return tuple(x)


def _device_of(model: torch.nn.Module, inputs: tuple) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else (inputs[0].device if inputs else torch.device("cpu"))


def _shapes(tensors: tuple) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(t.shape) for t in tensors)


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)} on {t.device}"
