"""One language-model engine in a process of its own, replying in JSON lines on stdout.

    python -m bench.lm_one --engine edgetune-sparse --mode memory --steps 5   # SmolLM2-135M
    python -m bench.lm_one --engine peft-lora --mode serve --tiny             # then "3" on stdin: 3 steps

--mode memory: VmHWM above the loaded model and batch over setup (compile / adapters /
optimizer) + 2 warm-up steps + --steps steps. Run it with MALLOC_MMAP_THRESHOLD_=65536 (bench.lm
does) so that freed activations go back to the OS and the high-water mark follows live memory.
--mode serve: set up and run 2 warm-ups, then run steps when asked (bench/interleave.py):
bench.lm times every engine in turns, a few steps each, without that variable.
Both record the loss of every step; the first one is computed before any update, so every
engine must report the same step-1 loss.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import traceback
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub, PEFT included

import peft  # noqa: E402  imported before the baseline: libraries are not what a step costs
import torch  # noqa: E402

import edgetune  # noqa: E402
from edgetune.compiler import scheme as schemes  # noqa: E402
from edgetune.apps.baseline import eager_step  # noqa: E402
from edgetune.procmem import release_free_heap, reset_hwm, vm_hwm_bytes, vm_rss_bytes  # noqa: E402
from edgetune.models.hf import causal_lm_loss, load_causal_lm, tiny_causal_lm  # noqa: E402

from bench.interleave import reply, serve_steps  # noqa: E402

LR = 1e-4
WARMUP = 2
SEED = 0
LORA_RANK, LORA_ALPHA, LORA_TARGETS = 8, 16, ["q_proj", "v_proj"]
SPARSE_BLOCKS = 6  # the issue's scheme: the last 6 of SmolLM2's 30 blocks
# The same adapters as the PEFT engine: rank, alpha (scale alpha/r) and layers.
EDGETUNE_LORA = {"model.layers.*.self_attn.q_proj.weight": {"lora": LORA_RANK, "alpha": LORA_ALPHA},
                 "model.layers.*.self_attn.v_proj.weight": {"lora": LORA_RANK, "alpha": LORA_ALPHA}}

Step = Callable[[], float]


def sparse_scheme(n_layers: int) -> schemes.Scheme:
    """The issue's sparse scheme, edgetune's preset for it: in each of the last `SPARSE_BLOCKS`
    blocks (all of a smaller --tiny model's), q_proj at 1/2 of its input channels, v_proj fully,
    up_proj at 1/4, both RMSNorm weights fully. The eager engine resolves the same object, so
    both train the same entries."""
    return schemes.lm_sparse(min(SPARSE_BLOCKS, n_layers))


def adamw() -> edgetune.AdamW:
    return edgetune.AdamW(lr=LR, weight_decay=0.0)


# -- engines: each returns a step closure and facts about what it built --------------------------

def setup_eager(model, batch, scheme) -> tuple[Step, dict]:
    """loss.backward + torch.optim.AdamW on the scheme's parameters; partial weights get their
    gradient multiplied by a channel mask (edgetune's own channel choice) before the update."""
    ids, mask = batch
    step = eager_step(model, causal_lm_loss, (ids, mask), (ids,), scheme, adamw())
    return step, {"trainable_params": _trained_entries(model, scheme)}


def setup_peft(model, batch, _scheme) -> tuple[Step, dict]:
    ids, mask = batch
    config = peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=LORA_TARGETS,
                             task_type="CAUSAL_LM")
    torch.manual_seed(SEED)
    lora = peft.get_peft_model(model, config).eval()
    trained = [p for p in lora.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=LR, weight_decay=0.0)

    def step() -> float:
        loss = causal_lm_loss(lora(input_ids=ids, attention_mask=mask), ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, {"trainable_params": sum(p.numel() for p in trained)}


def setup_edgetune(model, batch, scheme, optimizer=None) -> tuple[Step, dict]:
    ids, mask = batch
    trainer = edgetune.compile(model, causal_lm_loss, (ids, mask), (ids,), scheme=scheme,
                               optimizer=optimizer or adamw())
    info = {"trainable_params": trainer.trainable_params,
            "predicted_peak_bytes": trainer.report().predicted_peak_bytes}
    return (lambda: trainer.step((ids, mask), (ids,))), info


def setup_forward(model, batch, _scheme) -> tuple[Step, dict]:
    ids, mask = batch

    def step() -> float:
        with torch.no_grad():
            return causal_lm_loss(model(input_ids=ids, attention_mask=mask), ids).item()

    return step, {"trainable_params": 0}


ENGINES: dict[str, tuple[Callable, Callable[[int], object]]] = {
    # name: (setup, scheme builder from the number of blocks)
    "eager-full": (setup_eager, lambda n: schemes.full()),
    "peft-lora": (setup_peft, lambda n: None),
    "eager-sparse": (setup_eager, sparse_scheme),
    "edgetune-sparse": (setup_edgetune, sparse_scheme),
    "edgetune-lora": (setup_edgetune, lambda n: dict(EDGETUNE_LORA)),
    "forward": (setup_forward, lambda n: None),
    # the sparse scheme trained zeroth-order (two forward passes a step): run when named
    "edgetune-mezo-sparse": (lambda m, b, s: setup_edgetune(m, b, s, edgetune.MeZO(lr=1e-6)), sparse_scheme),
}


def _trained_entries(model, scheme) -> int:
    """Entries the eager step changes: whole parameters, or the chosen channels of partial ones."""
    params = dict(model.named_parameters())
    total = 0
    for name, rule in schemes.resolve(scheme, model).items():
        p = params[name]
        total += p.numel() if not rule.partial else p.numel() // p.shape[1] * rule.channels(p.shape[1])
    return total


# -- the model and the batch --------------------------------------------------------------------

def load_model(tiny: bool) -> torch.nn.Module:
    model = tiny_causal_lm("llama", seed=SEED) if tiny else load_causal_lm("smollm2-135m").model
    model.config.use_cache = False  # a training step needs no KV cache
    return model.eval()


def make_batch(model, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids (seeded, so every engine sees the same) with a full attention mask."""
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    return ids, torch.ones_like(ids)


# -- measurements ------------------------------------------------------------------------------------

def measure_memory(setup, model, batch, scheme, steps: int) -> dict:
    """Peak RSS above the loaded model and batch over setup + warm-ups + steps (one VmHWM window)."""
    release_free_heap()  # what loading freed must not hide what the step allocates
    reset_hwm()
    base, modules, children = vm_hwm_bytes(), len(sys.modules), _children_peak_kb()
    t0 = time.perf_counter()
    step, info = setup(model, batch, scheme)
    losses = [step()]
    setup_s = time.perf_counter() - t0
    losses += [step() for _ in range(WARMUP - 1 + steps)]
    kb = _children_peak_kb()  # edgetune compiles in a forked child, which VmHWM does not see
    return {**info, "peak_bytes": vm_hwm_bytes() - base, "end_rss_bytes": vm_rss_bytes() - base,
            "base_bytes": base, "child_peak_bytes": kb * 1024 - base if kb > children else None,
            "modules_imported": len(sys.modules) - modules, "setup_s": setup_s, "losses": losses}


def _children_peak_kb() -> int:
    """Peak RSS of the largest finished child process. A fork starts with this process's resident
    pages, so a compile child's peak minus our baseline is about what compiling added."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def warmed_up(engine: str, tiny: bool, batch: int, seq: int) -> tuple[Step, dict]:
    """The engine set up on the model and batch, after its warm-up steps: (step, its facts with
    setup_s, the warm-ups' losses and the tokens a step sees)."""
    model, data, setup, scheme = _prepared(engine, tiny, batch, seq)
    t0 = time.perf_counter()
    step, info = setup(model, data, scheme)
    setup_s = time.perf_counter() - t0
    losses = [step() for _ in range(WARMUP)]
    return step, {**info, "setup_s": setup_s, "losses": losses, "tokens": batch * seq}


def _prepared(engine: str, tiny: bool, batch: int, seq: int):
    # The first heap trim looks glibc up, which forks: do it while this process is small, so that
    # no child as large as the loaded model hides edgetune's compile child.
    release_free_heap()
    model = load_model(tiny)
    setup, scheme_of = ENGINES[engine]
    return model, make_batch(model, batch, seq), setup, scheme_of(model.config.num_hidden_layers)


def run(engine: str, mode: str, steps: int, tiny: bool, batch: int, seq: int) -> dict | None:
    if mode == "serve":  # steps when bench.lm asks, in turns with the other engines (bench/interleave.py)
        return serve_steps(*warmed_up(engine, tiny, batch, seq))
    model, data, setup, scheme = _prepared(engine, tiny, batch, seq)
    return {"tokens": batch * seq, **measure_memory(setup, model, data, scheme, steps)}


def run_safely(engine: str, mode: str, steps: int, tiny: bool, batch: int, seq: int) -> dict | None:
    """run(), or {"ok": False, "error": ...}: a failing engine is a row of the report, not a crash.
    None where it served steps (it has replied as it went)."""
    try:
        result = run(engine, mode, steps, tiny, batch, seq)
        return None if result is None else {"ok": True, **result}
    except Exception as e:
        traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return {"ok": False, "error": f"{type(e).__name__}: {first}"[:300]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", choices=list(ENGINES), required=True)
    p.add_argument("--mode", choices=["memory", "serve"], required=True)
    p.add_argument("--steps", type=int, default=5, help="steps after the warm-ups")
    p.add_argument("--tiny", action="store_true", help="a tiny random HF Llama instead of SmolLM2-135M")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run_safely(args.engine, args.mode, args.steps, args.tiny, args.batch, args.seq)
    if result is not None:
        reply(result)


if __name__ == "__main__":
    main()
