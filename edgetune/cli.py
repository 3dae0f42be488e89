"""The `edgetune` command: `plan` prints a compiled step's report, `demo` fine-tunes a model."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

import edgetune as et
from edgetune.scheme import SchemeError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except (SchemeError, ValueError, NotImplementedError, FileNotFoundError) as err:
        print(f"edgetune: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgetune", description=__doc__)
    sub = parser.add_subparsers(required=True, metavar="command")
    plan = sub.add_parser("plan", help="compile one training step and print its per-layer report")
    plan.add_argument("--model", default="mobilenetv2", help="built-in model: " + ", ".join(_models()))
    _common(plan, batch=8, size=128)
    plan.set_defaults(run=run_plan)
    demo = sub.add_parser("demo", help="fine-tune MobileNetV2 sparsely on the bundled digits data")
    demo.add_argument("--epochs", type=int, default=12)
    demo.add_argument("--lr", type=float, default=0.01)
    _common(demo, batch=32, size=32, scheme="mbv2-99kb", optimizer="adamw")
    demo.set_defaults(run=run_demo)
    return parser


def _common(p: argparse.ArgumentParser, batch: int, size: int, scheme: str = "bias_only",
            optimizer: str = "sgd") -> None:
    p.add_argument("--scheme", default=scheme,
                   help="full | bias_only | last:K | a published TTE scheme (mbv2-49kb ... mbv2-138kb) | a JSON file")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--size", type=int, default=size, help="image side in pixels")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default=optimizer)
    p.add_argument("--train-mode", action="store_true", help="batch statistics in BatchNorm (default: eval mode)")


def _models() -> list[str]:
    from edgetune.models import MODELS

    return sorted(MODELS)


def parse_scheme(spec: str) -> et.schemes.SchemeLike:
    """A preset name, `last:K`, a published TTE scheme, or a JSON file of patterns (or TTE keys)."""
    if spec == "full":
        return et.schemes.full()
    if spec in ("bias_only", "bias-only"):
        return et.schemes.bias_only()
    if spec.startswith("last:"):
        return et.schemes.last(int(spec.split(":", 1)[1]))
    if spec in et.schemes.PUBLISHED_TTE:
        return et.schemes.published(spec)
    if os.path.exists(spec):
        with open(spec) as f:
            data = json.load(f)
        return et.schemes.tte(**data["tte"]) if set(data) == {"tte"} else data
    raise SchemeError(f"unknown scheme {spec!r}: use full, bias_only, last:K, one of "
                      f"{sorted(et.schemes.PUBLISHED_TTE)}, or a JSON file")


def _optimizer(name: str, lr: float) -> et.SGD | et.AdamW:
    return et.SGD(lr=lr, momentum=0.9) if name == "sgd" else et.AdamW(lr=lr)


def run_plan(args: argparse.Namespace) -> int:
    from edgetune.models import build

    extra = {"image_size": args.size} if args.model == "vit" else {}
    model = build(args.model, num_classes=args.classes, **extra)
    model.train(args.train_mode)
    inputs, targets = _example(model, args)
    start = time.perf_counter()
    trainer = et.compile(model, _loss_for(args.model), inputs, targets, scheme=parse_scheme(args.scheme),
                         optimizer=_optimizer(args.optimizer, 0.01))
    print(f"{args.model}, scheme {args.scheme}, batch {args.batch}, "
          f"{'train' if args.train_mode else 'eval'}-mode norms; compiled in {time.perf_counter() - start:.1f}s\n")
    print(trainer.report())
    return 0


def _example(model: torch.nn.Module, args: argparse.Namespace) -> tuple[tuple, tuple]:
    if getattr(model, "is_language_model", False):
        ids = torch.randint(0, args.classes, (args.batch, args.size))
        return (ids,), (ids,)
    return (torch.randn(args.batch, 3, args.size, args.size),), (torch.randint(0, args.classes, (args.batch,)),)


def _loss_for(name: str):
    if name == "llama":
        return lambda logits, ids: F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return F.cross_entropy


def run_demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from edgetune.data import batches, load_digits_images
    from edgetune.models import build

    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = load_digits_images(size=args.size)
    model = build("mobilenetv2", num_classes=10).train()
    print(f"edgetune demo: MobileNetV2 on scikit-learn's handwritten digits ({len(x_train)} train / "
          f"{len(x_test)} held-out images, upsampled to {args.size}x{args.size}), scheme {args.scheme}")
    before = accuracy(model, x_test, y_test)
    trainer = et.compile(model, F.cross_entropy, (x_train[: args.batch],), (y_train[: args.batch],),
                         scheme=parse_scheme(args.scheme), optimizer=_optimizer(args.optimizer, args.lr))
    total = args.epochs * (len(x_train) // args.batch)
    with tqdm(total=total, desc="fine-tuning", unit="step") as bar:
        for epoch in range(args.epochs):
            trainer.lr = args.lr * 0.5 * (1 + torch.cos(torch.tensor(epoch / args.epochs * torch.pi)).item())
            for xb, yb in batches(x_train, y_train, args.batch, shuffle=True, seed=epoch):
                loss = trainer.step((xb,), (yb,))
                bar.set_postfix(loss=f"{loss:.3f}", epoch=epoch + 1)
                bar.update()
    after = accuracy(model, x_test, y_test)
    print(f"\nheld-out accuracy: {100 * before:.1f}% before -> {100 * after:.1f}% after\n")
    print(trainer.report().format(trained_only=True))
    print("(the full per-layer table: edgetune plan --model mobilenetv2 --size 32 --batch 32 "
          f"--train-mode --scheme {args.scheme})")
    return 0


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    """Plain PyTorch evaluation (eval mode) of the weights the trainer updated in place."""
    was_training = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    model.train(was_training)
    return correct / len(x)


if __name__ == "__main__":
    sys.exit(main())
