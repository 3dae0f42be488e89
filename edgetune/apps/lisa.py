"""LISA (Layerwise Importance Sampled AdamW; Pan et al. 2024, "LISA: Layerwise Importance
Sampling for Memory-Efficient Large Language Model Fine-Tuning") as a schedule over compiled steps.

    lisa = lisa_lm(lm.model, batch_size=4, seq_len=128, optimizer=et.AdamW(lr=1e-4), layers=2, interval=20)
    history = finetune_lm(lisa, train, val, steps=200, batch_size=4, lr=1e-4)
    save_trained(lisa, "runs/x/trained.safetensors")   # every parameter any period trained

Algorithm 1 of the paper: training is cut into periods of `interval` (K) steps. In each, the
`always` modules (by default the input embedding and the LM head) and `layers` (gamma) of the
model's intermediate blocks train; every other parameter is frozen for the period. The blocks
of period p are drawn uniformly without replacement by a generator seeded with (seed, p)
alone, so a resumed run, or anyone who knows the seed, draws the same ones. Each period runs
the step that edgetune compiles for that active set (its whole blocks' parameters and the
always-on ones, `scheme_for`): the compile happens when the period starts, so LISA pays one
compile per period, fewer where the same active set comes back while its compiled step is
still cached (`cache` of them, least recently used dropped first). Measured on this
project's 2-core VM: 1.7 s a compile for a 4-block tiny Llama (batch 2 x 12 tokens); 9.3 s
for SmolLM2-135M with 2 of its 30 blocks (batch 2 x 64; 8.3 s of it torch.export), which at
K = 20 steps a period adds about 0.5 s to each step. With length buckets
(compile_lm's `buckets`) each length compiles on first use in each period.

Optimizer state, precisely: every period starts the optimizer afresh over its active set, as
Algorithm 1 runs AdamW anew on each: zero moments (AdamW's exp_avg and exp_avg_sq, SGD's
momentum) and a step count that is 1 at the period's first step (AdamW's bias correction
starts over). The always-on parameters start over with it: their state is not carried
across periods. The learning rate is global: the loop sets `lr` before each step from its
schedule over the whole run, and a period does not restart it.

Memory is the active set's: the running step's activations, gradients and optimizer state.
A cached step that is not running keeps its compiled graph but lets go of its optimizer
state, which it would have to zero anyway when its active set comes back.

LisaTrainer looks like a Trainer to the loops and savers (edgetune.apps.lm's finetune_lm,
save_trained, the run checkpoints of edgetune.apps.runs). Its `rules` are every parameter the
periods so far trained, since that is what differs from the pretrained weights; a
checkpoint holds those and the running period's optimizer state, and a resumed run compiles
that period's step again and goes on from its step within the period.
"""
from __future__ import annotations

import os
import random
import time
from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch

import edgetune as et
from edgetune.compiler.optim import MeZO
from edgetune.compiler.scheme import Rule, SchemeError, transformer_blocks

CompileFn = Callable[[dict[str, str]], "et.Trainer"]
DEFAULT_INTERVAL = 20  # steps a period (K): LMFlow's default for LISA


class LisaError(ValueError):
    """Settings LISA cannot run with: a model without blocks, a bad layers or interval, an
    optimizer or scheme it does not go with."""


# -- what trains ------------------------------------------------------------------------------

def lm_blocks(model: torch.nn.Module) -> list[str]:
    """The intermediate transformer blocks' module paths in order, e.g. ['model.layers.0', ...]
    (HF decoders; also the repo's own Llama's 'layers.N', GPT-2's 'h.N')."""
    try:
        return transformer_blocks(model, "LISA")
    except SchemeError as err:
        raise LisaError(f"{err}; or give LisaTrainer the blocks to sample from (blocks=[...])") from None


def lm_always(model: torch.nn.Module) -> list[str]:
    """The modules LISA always trains: the input embedding and the LM head (the same weight
    where they are tied; it trains once). Found through transformers' get_input_embeddings /
    get_output_embeddings, or else as the embeddings and the last linear layer outside the blocks.
    As the paper's Algorithm 1 has it; LMFlow's implementation trains everything outside the
    blocks (the final norm too): pass that as `always` to do the same."""
    blocks = lm_blocks(model)
    names = {id(m): n for n, m in model.named_modules()}
    if hasattr(model, "get_input_embeddings") and hasattr(model, "get_output_embeddings"):
        found = [model.get_input_embeddings(), model.get_output_embeddings()]
        return [names[id(m)] for m in found if m is not None and id(m) in names]
    outside = [(n, m) for n, m in model.named_modules() if not _under(n, blocks)]
    embeddings = [n for n, m in outside if isinstance(m, torch.nn.Embedding)]
    linears = [n for n, m in outside if isinstance(m, torch.nn.Linear)]
    return embeddings + linears[-1:]


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def scheme_for(model: torch.nn.Module, modules: Sequence[str]) -> dict[str, str]:
    """{parameter name: "full"} for every parameter under `modules`, in named_parameters order.
    A tied parameter is named once, as named_parameters names it (SmolLM2's LM head is
    'model.embed_tokens.weight'), however many of its names fall under `modules`."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    chosen = {canonical[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if _under(n, modules)}
    return {n: "full" for n in canonical.values() if n in chosen}


# -- the schedule -----------------------------------------------------------------------------

class LisaTrainer:
    """LISA over compiled steps: `step` runs the step compiled for the current period's active
    set, compiling it when the period starts. See the module's docstring for what a period
    trains and how the optimizer state starts over.

    `compile_fn(scheme) -> Trainer` compiles a step for a scheme of exact parameter names (e.g.
    a partial of edgetune.compile or edgetune.apps.lm.compile_lm with everything but the scheme
    fixed); its optimizer is LISA's. `layers` (gamma): blocks trained a period; `interval` (K):
    steps a period; `always`: module paths trained every period (default: lm_always); `blocks`:
    the module paths sampled from (default: lm_blocks); `cache`: compiled steps kept for
    active sets that may come back.
    """

    def __init__(self, model: torch.nn.Module, compile_fn: CompileFn, *, layers: int,
                 interval: int = DEFAULT_INTERVAL, always: Sequence[str] | None = None,
                 blocks: Sequence[str] | None = None, seed: int = 0, cache: int = 4) -> None:
        self.model, self.compile_fn, self.seed = model, compile_fn, seed
        self.blocks = list(lm_blocks(model) if blocks is None else blocks)
        self.always = list(lm_always(model) if always is None else always)
        _check_settings(model, self.blocks, self.always, layers, interval, cache)
        self.layers, self.interval, self.cache_size = layers, interval, cache
        self._cache: OrderedDict[tuple[str, ...], et.Trainer] = OrderedDict()
        self._parked: dict[tuple[str, ...], dict[str, tuple[torch.Size, torch.dtype]]] = {}
        self.compile_seconds: list[float] = []  # each compile's, in order
        self.period: int | None = None
        self.active: et.Trainer | None = None
        self.steps = 0
        self._activate(0)  # the first period's step compiles now: a bad setting fails before the loop
        self.lr = self.active.lr

    # -- sampling ---------------------------------------------------------------------------

    def sample(self, period: int) -> list[str]:
        """The blocks period `period` trains: `layers` of them, drawn from (seed, period) alone."""
        rng = random.Random(f"edgetune-lisa:{self.seed}:{period}")  # str seeds hash with SHA-512: stable
        return [self.blocks[i] for i in sorted(rng.sample(range(len(self.blocks)), self.layers))]

    def scheme(self, period: int) -> dict[str, str]:
        """The scheme period `period` compiles: its sampled blocks and the always-on modules."""
        return scheme_for(self.model, self.always + self.sample(period))

    # -- running ----------------------------------------------------------------------------

    def step(self, inputs: tuple, targets: tuple) -> float:
        """One training step of the current period (compiling its step where the period starts
        here); returns the loss."""
        trainer = self._trainer_for(self.steps // self.interval)
        trainer.lr = self.lr
        loss = trainer.step(inputs, targets)
        self.steps += 1
        return loss

    def _trainer_for(self, period: int) -> et.Trainer:
        if period != self.period:
            self._activate(period)
        return self.active

    def _activate(self, period: int) -> None:
        """Make `period`'s step the running one, with its optimizer state fresh."""
        if self.active is not None:
            self._park(self._key_of(self.period))
        self.period, self.active = None, None  # until the new one is ready: a failed compile leaves none
        key = self._key_of(period)
        trainer = self._cache.pop(key, None)
        if trainer is None:
            trainer = self._compile(period)
        else:
            self._unpark(key, trainer)
        self._cache[key] = trainer  # the most recently used last
        while len(self._cache) > self.cache_size:
            dropped, _ = self._cache.popitem(last=False)
            self._parked.pop(dropped, None)
        self.period, self.active = period, trainer

    def _key_of(self, period: int) -> tuple[str, ...]:
        return tuple(self.sample(period))

    def _compile(self, period: int) -> et.Trainer:
        scheme = self.scheme(period)
        started = time.perf_counter()
        trainer = self.compile_fn(scheme)
        self.compile_seconds.append(time.perf_counter() - started)
        _check_compiled(trainer, scheme)
        return trainer

    def _park(self, key: tuple[str, ...]) -> None:
        """Let go of a step's optimizer state once its period ends: the next period that runs it
        starts from zeros anyway. The tensors stay (the compiled step is bound to them), empty."""
        trainer = self._cache[key]
        self._parked[key] = {k: (t.shape, t.dtype) for k, t in trainer.state.items()}
        for t in trainer.state.values():
            t.data = t.data.new_empty(0)

    def _unpark(self, key: tuple[str, ...], trainer: et.Trainer) -> None:
        """A cached step, ready to run a new period: zero optimizer state, step count 0 (its
        next step is the optimizer's first), and the frozen weights as they are now (other
        periods trained them; a backend that copies them, onnxruntime's, copies them again)."""
        for k, (shape, dtype) in self._parked.pop(key).items():
            trainer.state[k].data = torch.zeros(shape, dtype=dtype, device=trainer.device)
        trainer.steps = 0
        trainer._frozen_changed()

    # -- what the loops and savers read -----------------------------------------------------

    @property
    def rules(self) -> dict[str, Rule]:
        """Every parameter the periods so far trained (before the first step: the first
        period's), each fully: what a saved run must hold to differ from the pretrained model."""
        last = max(self.steps - 1, 0) // self.interval
        modules = list(self.always)
        for period in range(last + 1):
            modules += self.sample(period)
        return {name: Rule() for name in scheme_for(self.model, modules)}

    @property
    def trainable_params(self) -> int:
        """What the running period trains (the active set)."""
        return self.active.trainable_params

    @property
    def optimizer(self):
        return self.active.optimizer

    @property
    def device(self) -> torch.device:
        return self.active.device

    @property
    def last_step(self):
        return self.active.last_step

    @property
    def adapters(self) -> dict[str, torch.Tensor]:
        return {}  # LISA trains the model's own parameters

    @property
    def int8(self) -> dict:
        return {}  # refused: a weight frozen now trains in a later period (_check_compiled)

    def dequantized(self):
        return self.active.dequantized()

    def report(self):
        """The running period's step: its active set, predicted peak and compile times."""
        return self.active.report()

    def describe(self) -> str:
        seconds = self.compile_seconds
        mean = f", {sum(seconds) / len(seconds):.1f} s a compile so far" if seconds else ""
        return (f"LISA: {self.layers} of {len(self.blocks)} blocks ({self.blocks[0]} .. {self.blocks[-1]}) every "
                f"{self.interval} steps, always {', '.join(self.always)}{mean}")

    # -- checkpoints ------------------------------------------------------------------------

    def written_names(self) -> set[str]:
        """The model's tensors some period may write: every parameter of the blocks and the
        always-on modules (each name of a tied one), and the buffers."""
        names = {n for n, _ in self.model.named_parameters(remove_duplicate=False)
                 if _under(n, self.blocks + self.always)}
        return names | {n for n, _ in self.model.named_buffers()}

    def _model_state(self, frozen: bool) -> dict[str, torch.Tensor]:
        state = self.model.state_dict()
        if frozen:
            return state
        written = self.written_names()
        return {k: v for k, v in state.items() if k in written}

    def state_dict(self, frozen: bool = True) -> dict[str, Any]:
        """As Trainer.state_dict: step count, lr, weights (frozen=False: those LISA may write)
        and the running period's optimizer state (none at a period's end: the next starts over)."""
        mid_period = self.steps % self.interval != 0
        optimizer = {k: v.clone() for k, v in self.active.state.items()} if mid_period else {}
        return {"step": self.steps, "lr": self.lr, "frozen": frozen, "model": self._model_state(frozen),
                "optimizer": optimizer, "adapters": {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict: the period of its step count runs next (compiled here), from its
        step within the period. Names and shapes are checked before anything changes."""
        steps = int(state["step"])
        period, into = divmod(steps, self.interval)
        _check_same("model weights", state["model"], self._model_state(state.get("frozen", True)))
        if state.get("adapters"):
            raise ValueError("the checkpoint holds LoRA adapters: it is not a LISA run's")
        trainer = self._trainer_for(period)
        _check_same("optimizer state", state["optimizer"], trainer.state if into else {})
        self.model.load_state_dict(state["model"], strict=False)
        for k, v in state["optimizer"].items():
            trainer.state[k].copy_(v)
        trainer.steps, self.steps, self.lr = into, steps, float(state["lr"])
        trainer._frozen_changed()

    def save(self, path: str | os.PathLike) -> None:
        from edgetune.compiler.checkpoint import save_checkpoint

        save_checkpoint(self.state_dict(), path)

    def load(self, path: str | os.PathLike) -> None:
        from edgetune.compiler.checkpoint import load_checkpoint

        self.load_state_dict(load_checkpoint(path, self.device))


def _check_settings(model: torch.nn.Module, blocks: list[str], always: list[str], layers: Any, interval: Any,
                    cache: Any) -> None:
    for what, value in (("layers", layers), ("interval", interval), ("cache", cache)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LisaError(f"LISA {what} must be a whole number >= 1, got {value!r}")
    if layers > len(blocks):
        raise LisaError(f"LISA cannot train {layers} of the model's {len(blocks)} blocks a period; "
                        f"use at most {len(blocks)}")
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    for kind, prefixes in (("block", blocks), ("always-on module", always)):
        empty = [p for p in prefixes if not any(_under(n, [p]) for n in names)]
        if empty:
            raise LisaError(f"LISA {kind} {empty[0]!r} holds no parameter of {type(model).__name__}")
    overlap = [a for a in always if any(_under(a, [b]) or _under(b, [a]) for b in blocks)]
    if overlap:
        raise LisaError(f"the always-on module {overlap[0]!r} overlaps the sampled blocks: a block is trained "
                        "only when sampled")


def _check_compiled(trainer: et.Trainer, scheme: dict[str, str]) -> None:
    if isinstance(trainer.optimizer, MeZO):
        raise LisaError(_NOT_MEZO)
    if set(trainer.rules) != set(scheme):
        raise LisaError("LISA's compile_fn must compile the scheme it is given (it trains "
                        f"{len(trainer.rules)} parameters, the scheme names {len(scheme)})")
    if trainer.int8:
        raise LisaError(_NOT_INT8)


_NOT_MEZO = ("LISA samples blocks for a gradient step (AdamW, as in its paper, or SGD); MeZO estimates "
             "gradients from forward passes and needs no such sampling: use one or the other")
_NOT_INT8 = ("LISA cannot hold frozen weights as int8: a block frozen in one period trains in another, and an "
             "int8 weight gives up its float values")


def _check_same(what: str, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """The Trainer's check of a checkpoint's names, shapes and dtypes, with what to do for LISA."""
    from edgetune.compiler.trainer import _check_same as check

    try:
        check(what, got, want)
    except ValueError as err:
        raise ValueError(f"the checkpoint's {what} do not fit this LISA run ({err}): resume with the same model, "
                         "seed, --lisa-layers and --lisa-interval") from None


# -- builders -----------------------------------------------------------------------------------

def lisa(model: torch.nn.Module, loss_fn: Callable, example_inputs: tuple, example_targets: tuple, optimizer,
         *, layers: int, interval: int = DEFAULT_INTERVAL, always: Sequence[str] | None = None,
         blocks: Sequence[str] | None = None, seed: int = 0, cache: int = 4, **compile_options) -> LisaTrainer:
    """LISA over edgetune.compile(model, loss_fn, example_inputs, example_targets, scheme=<the
    period's>, optimizer=optimizer, **compile_options)."""
    _check_optimizer(optimizer, compile_options.get("frozen_weights", "float"))

    def compile_fn(scheme: dict[str, str]) -> et.Trainer:
        return et.compile(model, loss_fn, example_inputs, example_targets, scheme=scheme, optimizer=optimizer,
                          **compile_options)

    return LisaTrainer(model, compile_fn, layers=layers, interval=interval, always=always, blocks=blocks,
                       seed=seed, cache=cache)


def lisa_lm(model: torch.nn.Module, batch_size: int, seq_len: int, optimizer, *, layers: int,
            interval: int = DEFAULT_INTERVAL, buckets: Sequence[int] = (), seed: int = 0,
            cache: int = 4) -> LisaTrainer:
    """LISA over edgetune.apps.lm.compile_lm's steps for a causal LM (the embedding and LM head
    always train). Each period compiles its step for seq_len now and, with `buckets`, the
    shorter lengths on first use: more compiles a period."""
    from edgetune.apps.lm import compile_lm

    _check_optimizer(optimizer, "float")

    def compile_fn(scheme: dict[str, str]) -> et.Trainer:
        return compile_lm(model, scheme, batch_size, seq_len, optimizer, buckets=buckets)

    return LisaTrainer(model, compile_fn, layers=layers, interval=interval, seed=seed, cache=cache)


def _check_optimizer(optimizer, frozen_weights: str) -> None:
    if isinstance(optimizer, MeZO):
        raise LisaError(_NOT_MEZO)
    if frozen_weights != "float":
        raise LisaError(_NOT_INT8)
