"""`make demo`: ImageNet-pretrained MobileNetV2 fine-tuned sparsely on Fashion-MNIST, in a few
minutes on two CPU cores, with the memory it took next to what PyTorch takes for the same job.

Fashion-MNIST comes from Debian's `dataset-fashion-mnist` (the Makefile unpacks it into
.venv); where that could not be fetched, the demo says so and uses scikit-learn's digits.
"""
from __future__ import annotations

import argparse
import os

import torch

import edgetune as et
from edgetune.apps.finetune import finetune, fit_batch, save_weights
from edgetune.apps.jobs import build_job


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheme", default="mbv2-99kb", help="the Tiny Training Engine's scheme, or any --scheme value")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=96, help="image side in pixels")
    p.add_argument("--train-limit", type=int, default=6000)
    p.add_argument("--val-limit", type=int, default=2000)
    p.add_argument("--out", default=os.path.join("runs", "demo"))
    p.add_argument("--no-compare", action="store_true", help="skip measuring PyTorch's peak on the same job")


def run(args: argparse.Namespace) -> int:

    torch.manual_seed(0)
    data = _dataset()
    job = build_job("mobilenetv2-imagenet", data, size=args.size, train_limit=args.train_limit,
                    val_limit=args.val_limit)
    args.batch = fit_batch(args.batch, len(job.train))
    scheme = et.schemes.with_head(et.schemes.parse(args.scheme), job.head)
    optimizer = et.SGD(lr=args.lr, momentum=0.9)
    inputs, targets = job.example(args.batch)
    # Each peak is measured in a fresh process the job is pickled to (edgetune.apps.measure).
    peaks = None if args.no_compare else _measure_peaks(job, scheme, optimizer, inputs, targets)
    trainer = et.compile(job.model, job.loss_fn, inputs, targets, scheme=scheme, optimizer=optimizer)
    total = sum(p.numel() for p in job.model.parameters())
    print(f"edgetune demo: MobileNetV2 (ImageNet weights, new {len(job.train.classes)}-class head) on {data}: "
          f"{len(job.train)} train / {len(job.val)} held-out images at {args.size}x{args.size}, batch {args.batch}\n"
          f"scheme {args.scheme}: {trainer.trainable_params:,} of {total:,} parameters train\n")
    history = finetune(trainer, job.train, job.val, job.prepare, epochs=args.epochs, batch_size=args.batch, lr=args.lr)
    save_weights(job.model, os.path.join(args.out, "model.safetensors"), metadata={"model": "mobilenetv2-imagenet"})
    history.save(os.path.join(args.out, "history.json"))
    history.plot(os.path.join(args.out, "curves.png"), title=f"MobileNetV2 on {data}, scheme {args.scheme}")
    print(f"\nheld-out accuracy: {100 * history.evals[0]['accuracy']:.1f}% before -> "
          f"{100 * history.final['accuracy']:.1f}% after {args.epochs} epochs ({history.seconds:.0f}s)")
    if peaks:
        _print_peaks(*peaks)
    print(f"checkpoint: {args.out}/model.safetensors   plot: {args.out}/curves.png")
    return 0


def _dataset() -> str:
    from edgetune.data import load_fashion_mnist

    try:
        load_fashion_mnist("test")
        return "fashion-mnist"
    except FileNotFoundError as err:
        print(f"note: {err}\nnote: using scikit-learn's bundled digits instead\n")
        return "digits"


def _measure_peaks(job, scheme, optimizer, inputs, targets) -> tuple[int, int, int]:
    """Peak memory of one training step above the weights: edgetune, then PyTorch eager on the
    same scheme and on full fine-tuning, each in a fresh process."""
    from edgetune.apps.measure import measure_eager_peak, measure_peak

    ours = measure_peak(job.model, job.loss_fn, inputs, targets, scheme, optimizer)
    eager = measure_eager_peak(job.model, job.loss_fn, inputs, targets, scheme, optimizer)
    full = measure_eager_peak(job.model, job.loss_fn, inputs, targets, et.schemes.full(), optimizer)
    return ours, eager, full


def _print_peaks(ours: int, eager: int, full: int) -> None:
    mb = 2**20
    print(f"peak memory of one training step, above the weights (measured, VmHWM):\n"
          f"  edgetune, this scheme            {ours / mb:7.1f} MB\n"
          f"  PyTorch eager, the same scheme   {eager / mb:7.1f} MB  ({eager / ours:.1f}x more)\n"
          f"  PyTorch eager, full fine-tuning  {full / mb:7.1f} MB  ({full / ours:.1f}x more)")
