"""The fine-tuning loop around a compiled Trainer: epochs, learning-rate schedule, evaluation,
history, checkpoints to resume from (edgetune.apps.runs) and plot.

    task = image_task(size=112, mean=..., std=...)        # raw items -> model inputs
    history = finetune(trainer, train, val, task, epochs=3, batch_size=32, lr=0.01)
    save_weights(model, "runs/x/model.safetensors"); history.plot("runs/x/curves.png")

The last partial batch of an epoch trains too where the trainer takes a second batch shape
(compile(max_shapes=2) or more; `edgetune finetune` does), else it is dropped; a last batch
of one item is always dropped (a train-mode norm's statistics of one item are degenerate).
Evaluation runs the plain PyTorch model (which the trainer updates in place) on every item.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from edgetune.files import atomic_write, write_json

Prepare = Callable[[object, bool], tuple]  # (raw items of a batch, training?) -> model inputs


# -- tasks: raw data items -> model inputs ---------------------------------------------------

class ImageTask:
    """Images: resize, normalise; light augmentation (crop, flip) on training batches only.
    Its random generator is named in `generators`, so that a resumed run draws on from where
    the checkpoint left it."""

    def __init__(self, size: int, mean, std, augment: bool = True):
        from edgetune.data import ImagePreprocess

        self.train = ImagePreprocess(size, mean, std, augment=augment)
        self.test = ImagePreprocess(size, mean, std, augment=False)

    def __call__(self, items, training: bool) -> tuple:
        return ((self.train if training else self.test)(items),)

    @property
    def generators(self) -> dict:
        return {"augment": self.train.generator}


def image_task(size: int, mean, std, augment: bool = True) -> Prepare:
    return ImageTask(size, mean, std, augment)


def text_task(tokenizer: Callable[[list[str]], tuple]) -> Prepare:
    """Texts: the model's tokenizer pads/truncates every batch to one fixed length."""
    return lambda items, training: tuple(tokenizer(list(items)))


# -- learning rate ---------------------------------------------------------------------------

def learning_rate(step: int, total: int, base: float, schedule: str = "cosine", warmup: int = 0) -> float:
    """The rate for `step` (0-based) of `total`: linear warmup, then cosine decay or constant."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"unknown learning-rate schedule {schedule!r}: use 'cosine' or 'constant'")
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# -- evaluation ------------------------------------------------------------------------------

@dataclass
class Metrics:
    accuracy: float
    loss: float


@torch.no_grad()
def evaluate(model: torch.nn.Module, data, prepare: Prepare, batch_size: int = 128) -> Metrics:
    """Accuracy and mean cross-entropy of `model` in eval mode over every item of `data`."""
    if len(data) == 0:
        raise ValueError("nothing to evaluate on: the held-out split is empty")
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    for items, labels in data.batches(batch_size, shuffle=False, drop_last=False):
        logits = model(*prepare(items, False))
        correct += int((logits.argmax(-1) == labels).sum())
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
    model.train(was_training)
    return Metrics(correct / len(data), loss_sum / len(data))


# -- the loop --------------------------------------------------------------------------------

def fit_batch(batch_size: int, items: int, what: str = "training items", log: Callable[[str], None] = print) -> int:
    """`batch_size`, or `items` where the data hold fewer. The step is compiled for one batch
    shape and training drops partial batches, so a batch larger than the data would never
    run: a few-shot folder of 19 images trains in batches of 19. Says so when it clips."""
    if batch_size < 1:
        raise ValueError(f"the batch size must be at least 1, got {batch_size}")
    if items < 1:
        raise ValueError(f"no {what} to train on")
    if batch_size <= items:
        return batch_size
    log(f"note: only {items} {what}, so the batch is {items} instead of {batch_size}")
    return items


@dataclass
class History:
    """What happened: the loss of every step, and evaluations (step, epoch, accuracy, loss)."""

    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final(self) -> dict:
        return self.evals[-1] if self.evals else {}

    def save(self, path: str) -> None:
        write_json(path, asdict(self))

    def plot(self, path: str, title: str = "") -> None:
        """A PNG with the training loss per step and held-out accuracy (or loss) per evaluation."""
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a board or in CI
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
        left.plot(self.losses, lw=0.6, alpha=0.5, label="step")
        left.plot(_smooth(self.losses), lw=1.5, label="moving mean")
        left.set(xlabel="step", ylabel="training loss", title="loss")
        left.legend()
        if self.evals and "accuracy" not in self.evals[0]:  # language models: held-out loss instead
            right.plot([e["step"] for e in self.evals], [e["loss"] for e in self.evals], "o-")
            right.set(xlabel="step", ylabel="held-out loss", title="held-out loss")
        else:
            right.plot([e["step"] for e in self.evals], [100 * e["accuracy"] for e in self.evals], "o-")
            right.set(xlabel="step", ylabel="held-out accuracy (%)", title="accuracy")
        fig.suptitle(title)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)


def finetune(trainer, train, val, prepare: Prepare, *, epochs: int, batch_size: int, lr: float,
             schedule: str = "cosine", warmup: int = 0, seed: int = 0, progress: bool = True,
             evaluate_before: bool = True, log: Callable[[str], None] | None = None,
             checkpoints=None) -> History:
    """Train `epochs` passes over `train`, evaluating on `val` before (optional) and after each.
    `log` receives one line per evaluation (default: printed above the progress bar).
    `checkpoints` (edgetune.apps.runs.Checkpoints): saved every N steps and after each
    evaluation; where one exists, the loop goes on from it."""
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    partial = trainer.max_shapes > 1 and len(train) % batch_size >= 2
    per_epoch = len(train) // batch_size + partial
    total = epochs * per_epoch
    if total == 0:
        raise ValueError(f"{len(train)} training items cannot fill one batch of {batch_size}; use a smaller --batch")
    history = (checkpoints and checkpoints.restore(History)) or History()
    start, bar = time.perf_counter() - history.seconds, _progress(total, progress)
    bar.update(len(history.losses))
    log = log or bar.write

    def save() -> None:
        if checkpoints:
            history.seconds = time.perf_counter() - start
            checkpoints.save(history)

    if evaluate_before and not history.evals:
        _record(history, trainer, val, prepare, step=0, epoch=0, log=log)
        save()
    for epoch in range(_epochs_evaluated(history) + 1, epochs + 1):
        done_before = (epoch - 1) * per_epoch  # steps of the earlier epochs
        batches = train.batches(batch_size, shuffle=True, seed=seed + epoch, drop_last=not partial)
        for i, (items, labels) in enumerate(batches):
            if done_before + i < len(history.losses):
                continue  # trained on before the checkpoint this run resumed from
            trainer.lr = learning_rate(len(history.losses), total, lr, schedule, warmup)
            loss = trainer.step(prepare(items, True), (labels,))
            if not math.isfinite(loss):
                raise FloatingPointError(f"the loss became {loss} at step {len(history.losses) + 1}; "
                                         "lower the learning rate")
            history.losses.append(loss)
            history.lrs.append(trainer.lr)
            bar.set_postfix(loss=f"{loss:.3f}", epoch=epoch)
            bar.update()
            if checkpoints and checkpoints.due(len(history.losses)):
                save()
        _record(history, trainer, val, prepare, step=len(history.losses), epoch=epoch, log=log)
        save()
    bar.close()
    history.seconds = time.perf_counter() - start
    return history


def _epochs_evaluated(history: History) -> int:
    return max((e["epoch"] for e in history.evals), default=0)


def _record(history: History, trainer, val, prepare: Prepare, step: int, epoch: int, log) -> None:
    from edgetune.apps.peft import adapters_merged

    with adapters_merged(trainer) as model:  # LoRA adapters live in the trainer, int8 weights too
        m = evaluate(model, val, prepare)
    history.evals.append({"step": step, "epoch": epoch, "accuracy": m.accuracy, "loss": m.loss})
    log(f"epoch {epoch}: held-out accuracy {100 * m.accuracy:.2f}%, loss {m.loss:.4f}")


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="fine-tuning", unit="step", disable=not enabled)


def _smooth(values: list[float], window: int = 25) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


# -- files -----------------------------------------------------------------------------------

def save_weights(model: torch.nn.Module, path: str, metadata: dict[str, str] | None = None) -> None:
    """The model's weights as safetensors, written atomically (tied weights stored once)."""
    from safetensors.torch import save_model

    atomic_write(path, lambda tmp: save_model(model, tmp, metadata=metadata))


def load_weights(model: torch.nn.Module, path: str) -> None:
    from safetensors.torch import load_model

    missing, unexpected = load_model(model, path, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")

