"""Fine-tuning a causal language model with a compiled step: the loop, the held-out loss,
generation, and what a run saves.

    lm = load_lm("smollm2-135m")                      # or "tiny-llama": random, for tests
    data = load_lm_data("sharegpt", lm.tokenizer, seq_len=128)
    train, val = data.split(val_fraction=0.05)
    trainer = compile_lm(lm.model, scheme, batch_size=4, seq_len=128, optimizer=et.AdamW(lr=1e-4))
    history = finetune_lm(trainer, train, val, steps=200, batch_size=4, lr=1e-4)
    save_trained(trainer, "runs/x/trained.safetensors")
    print(generate(lm.model, lm.tokenizer, "Name three primary colors."))

Evaluation and generation run the plain transformers model: the compiled step updates its
parameters in place, so it always sees the trained weights.

What is saved: only the parameters the scheme trains (every entry of each, also of those
trained on a ratio of their channels), since the rest equal the pretrained weights the model
loads anyway: a sparse run of SmolLM2-135M saves megabytes, not 540 MB. `save_trained(...,
whole=True)` writes the whole model. LoRA runs save a PEFT adapter (edgetune.compiler.lora).
"""
from __future__ import annotations

import itertools
import math
import os
import time
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

import edgetune as et
from edgetune.data.chat import IGNORE, LMData
from edgetune.apps.finetune import History, _progress, learning_rate, save_weights
from edgetune.apps.peft import adapters_merged
from edgetune.files import atomic_write
from edgetune.models.hf import CAUSAL_LMS, CausalLM, causal_lm_loss, load_causal_lm, tiny_causal_lm

TINY_LMS = {"tiny-llama": "llama", "tiny-qwen2": "qwen2"}  # random weights + a character tokenizer
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]    # input_ids, attention_mask, labels


# -- models ----------------------------------------------------------------------------------

def lm_names() -> list[str]:
    return sorted(CAUSAL_LMS) + sorted(TINY_LMS)


def load_lm(name: str, seq_len: int = 64) -> CausalLM:
    """A registered pretrained LM with its tokenizer, or a tiny random one (seeded, so every
    load is the same model) for tests and dry runs."""
    if name in TINY_LMS:
        model = tiny_causal_lm(TINY_LMS[name], max_position_embeddings=max(64, seq_len))
        return CausalLM(model, tiny_chat_tokenizer(), name)
    if name not in CAUSAL_LMS:
        raise ValueError(f"unknown language model {name!r}; known: {', '.join(lm_names())}")
    return load_causal_lm(name)


def tiny_chat_tokenizer():
    """A character tokenizer for the tiny models: the 95 printable ASCII characters, newline,
    and ChatML's markers, 100 ids in all (the tiny configs have 128), with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + ["\n"] + [chr(c) for c in range(32, 127)])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token a character
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                  eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def compile_lm(model: torch.nn.Module, scheme, batch_size: int, seq_len: int, optimizer,
               frozen_weights: str = "float", buckets: Sequence[int] = (), memory_budget=None) -> et.Trainer:
    """A compiled step for batches of [batch_size, seq_len] token ids, mask and labels. The
    example's values do not matter, only its shapes (padding masks are honoured either way).
    `buckets`: the shorter lengths batches may be cut to (LMData.batches), each compiled on
    first use; the step for seq_len, the longest, is compiled now. Each is held to
    `memory_budget` (see et.compile). `frozen_weights="int8"`: see et.compile."""
    inputs, targets = lm_example(batch_size, seq_len)
    return et.compile(model, causal_lm_loss, inputs, targets, scheme=scheme, optimizer=optimizer,
                      frozen_weights=frozen_weights, max_shapes=len(set(buckets) | {seq_len}),
                      memory_budget=memory_budget)


def lm_example(batch_size: int, seq_len: int) -> tuple[tuple, tuple]:
    """((ids, mask), (labels,)) shaped as the step takes them; their values do not matter."""
    ids = torch.zeros(batch_size, seq_len, dtype=torch.int64)
    return (ids, torch.ones_like(ids)), (torch.zeros_like(ids),)


# -- evaluation ------------------------------------------------------------------------------

def evaluate_lm(model: torch.nn.Module, batches: LMData | Iterable[Batch], batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over every learned token of every batch (token-weighted,
    so a batch with more answer tokens counts more); on one batch it equals causal_lm_loss."""
    return lm_metrics(model, batches, batch_size)["loss"]


@torch.no_grad()
def lm_metrics(model: torch.nn.Module, batches: LMData | Iterable[Batch], batch_size: int = 8) -> dict[str, float]:
    """{"loss": evaluate_lm's loss, "token_accuracy": the share of learned tokens that are the
    model's most likely next token}: a task measure beside the loss, from the same forward."""
    if isinstance(batches, LMData):
        batches = batches.batches(batch_size)
    was_training, total, hits, count = model.training, 0.0, 0, 0
    model.eval()
    try:
        for ids, mask, labels in batches:
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            target = labels[:, 1:]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                           ignore_index=IGNORE, reduction="sum"))
            learned = target != IGNORE
            hits += int((logits.argmax(-1)[learned] == target[learned]).sum())
            count += int(learned.sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no batch holds a token to learn: the evaluation set is empty or all masked")
    return {"loss": total / count, "token_accuracy": hits / count}


# -- the loop --------------------------------------------------------------------------------

def finetune_lm(trainer: et.Trainer, train: LMData, val: LMData, *, steps: int | None = None,
                epochs: int | None = None, batch_size: int, lr: float, schedule: str = "cosine",
                warmup: int = 0, eval_every: int | None = None, seed: int = 0, progress: bool = True,
                train_eval_size: int = 64, log: Callable[[str], None] | None = None,
                checkpoints=None, buckets: Sequence[int] | None = None,
                group_by_length: bool | None = None) -> History:
    """Train for `steps` steps (or `epochs` passes over `train`), evaluating before, every
    `eval_every` steps and at the end. Each evaluation records the held-out loss ("loss") and
    the loss on a fixed sample of `train_eval_size` training examples ("train_loss"): the same
    measure on both, so fitting and generalising can be told apart. `checkpoints`
    (edgetune.apps.runs.Checkpoints): saved every N steps, after each evaluation and at the
    end of each pass over the data; where one exists, the loop goes on from it.
    `buckets`: batches are cut to the shortest of these lengths that holds them (the
    trainer must take those shapes: compile_lm(buckets=...)). The last batch of a pass is
    filled up with rows that learn nothing (LMData.batches(fill=True)), so it trains too.
    `group_by_length` (default: whenever there are buckets to cut to): batches of examples of
    similar length (LMData.batches), so that buckets cut more."""
    total = _total_steps(len(train), batch_size, steps, epochs)
    train_sample = train.subset(range(min(train_eval_size, len(train))))
    history = (checkpoints and checkpoints.restore(History)) or History()
    start, bar = time.perf_counter() - history.seconds, _progress(total, progress)
    bar.update(len(history.losses))
    log = log or bar.write

    def save() -> None:
        if checkpoints:
            history.seconds = time.perf_counter() - start
            checkpoints.save(history)

    if not history.evals:
        _record(history, trainer, train_sample, val, batch_size, log)
        save()
    if group_by_length is None:  # without a shorter bucket, grouping would cut nothing
        group_by_length = bool(buckets) and min(buckets) < train.seq_len
    batches = _endless(train, batch_size, seed, total, buckets, group_by_length)
    for ids, mask, labels in itertools.islice(batches, len(history.losses), None):
        trainer.lr = learning_rate(len(history.losses), total, lr, schedule, warmup)
        loss = trainer.step((ids, mask), (labels,))
        if not math.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss} at step {len(history.losses) + 1}; lower the learning rate")
        history.losses.append(loss)
        history.lrs.append(trainer.lr)
        bar.set_postfix(loss=f"{loss:.3f}")
        bar.update()
        evaluate = len(history.losses) == total or (eval_every and len(history.losses) % eval_every == 0)
        if evaluate:
            _record(history, trainer, train_sample, val, batch_size, log)
        epoch_end = len(history.losses) % _steps_per_pass(len(train), batch_size) == 0
        if evaluate or epoch_end or (checkpoints and checkpoints.due(len(history.losses))):
            save()
    bar.close()
    history.seconds = time.perf_counter() - start
    return history


def _total_steps(n: int, batch_size: int, steps: int | None, epochs: int | None) -> int:
    if (steps is None) == (epochs is None):
        raise ValueError("give either steps or epochs (one of them)")
    if n < batch_size:
        raise ValueError(f"{n} training examples cannot fill one batch of {batch_size}; use a smaller batch")
    total = steps if steps is not None else epochs * _steps_per_pass(n, batch_size)
    if total < 1:
        raise ValueError(f"nothing to train: {total} steps")
    return total


def _steps_per_pass(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)  # the last batch, filled up, trains too


def _endless(data: LMData, batch_size: int, seed: int, total: int, buckets: Sequence[int] | None,
             group_by_length: bool = False) -> Iterable[Batch]:
    """`total` batches of `batch_size` rows, reshuffled at every pass over the data."""
    done, epoch = 0, 0
    while True:
        epoch += 1
        for batch in data.batches(batch_size, shuffle=True, seed=seed + epoch, fill=True, buckets=buckets,
                                  group_by_length=group_by_length):
            if done == total:
                return
            done += 1
            yield batch


def _record(history: History, trainer: et.Trainer, train_sample: LMData, val: LMData, batch_size: int, log) -> None:
    step = len(history.losses)
    with adapters_merged(trainer) as model:
        held_out, fitted = lm_metrics(model, val, batch_size), evaluate_lm(model, train_sample, batch_size)
    history.evals.append({"step": step, "loss": held_out["loss"], "train_loss": fitted,
                          "token_accuracy": held_out["token_accuracy"]})
    log(f"step {step}: held-out loss {held_out['loss']:.4f} (next-token accuracy {held_out['token_accuracy']:.2%}), "
        f"training loss {fitted:.4f} (on {len(train_sample)} training examples)")


# -- generation ------------------------------------------------------------------------------

@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             system: str | None = None, seed: int = 0) -> str:
    """The model's answer to `prompt` as a user turn of the tokenizer's chat template (plain
    continuation where the tokenizer has none). temperature 0 = greedy, else sampling."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                         max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
                         **sampling)
    model.train(was_training)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def answer_scores(model: torch.nn.Module, tokenizer, questions, max_new_tokens: int = 32) -> dict:
    """Greedy replies to `questions` (edgetune.data.tasks.Question) scored two ways:
    {"exact": share whose reply is the answer alone, "contained": share whose reply says the
    answer and no distractor, "by_kind": {kind: contained share}, "replies": what was said}."""
    replies = [generate(model, tokenizer, q.prompt, max_new_tokens=max_new_tokens) for q in questions]
    exact = [q.is_answered_by(r) for q, r in zip(questions, replies)]
    said = [q.is_said_in(r) for q, r in zip(questions, replies)]
    kinds: dict[str, list[bool]] = {}
    for q, ok in zip(questions, said):
        kinds.setdefault(q.kind, []).append(ok)
    return {"exact": sum(exact) / len(exact), "contained": sum(said) / len(said),
            "by_kind": {k: sum(v) / len(v) for k, v in kinds.items()}, "replies": replies}


# -- saving ----------------------------------------------------------------------------------

def trained_names(trainer: et.Trainer) -> list[str]:
    """The model's parameters a step changes (a LoRA weight stays frozen: its adapters train)."""
    return [n for n, rule in trainer.rules.items() if not getattr(rule, "lora", 0)]


def uses_lora(trainer: et.Trainer) -> bool:
    return any(getattr(rule, "lora", 0) for rule in trainer.rules.values())


def save_trained(trainer: et.Trainer, path: str, whole: bool = False, metadata: dict[str, str] | None = None) -> int:
    """The trained parameters (or, with whole=True, every weight) as safetensors, written
    atomically; returns the bytes written. Tied weights are stored once. LoRA adapters are
    not parameters of the model: save them with edgetune.apps.peft.save_peft_adapter."""
    from safetensors.torch import save_file

    metadata = dict(metadata or {}, contents="whole" if whole else "trained")
    if whole:  # LoRA adapters folded in: the file is a plain model
        with adapters_merged(trainer) as model:
            save_weights(model, path, metadata)
    else:
        params = dict(trainer.model.named_parameters())
        tensors = {n: params[n].detach().contiguous() for n in trained_names(trainer)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return os.path.getsize(path)


def check_weights_file(path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weights file {path}: give the .safetensors file finetune or finetune-lm "
                                "wrote (runs/.../model.safetensors or trained.safetensors)")


def load_trained(model: torch.nn.Module, path: str) -> dict[str, str]:
    """Load a file of save_trained (trained parameters or whole model) into `model`; every
    tensor must name a weight of the model with its shape. Returns the file's metadata."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    check_weights_file(path)
    try:
        tensors = load_file(path)
    except SafetensorError as err:
        raise ValueError(f"{path} is not a safetensors file ({err}); give the .safetensors file finetune or "
                         "finetune-lm wrote") from None
    own = model.state_dict()
    wrong = [n for n, t in tensors.items() if n not in own or own[n].shape != t.shape]
    if wrong:
        raise ValueError(f"{path} does not fit this model: {wrong[:3]} (of {len(wrong)}) are not its weights "
                         "or have other shapes; load it into the model it was trained from (the same --model, "
                         "and for a classifier the same --classes)")
    model.load_state_dict(tensors, strict=False)
    with safe_open(path, "pt") as f:
        return f.metadata() or {}
