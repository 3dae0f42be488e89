"""`edgetune web-demo` (and `make web-demo`): an ImageNet MobileNetV2 exported for the browser
with a sparse scheme and a new 10-class head, fine-tuned in the page on symbols the user draws,
or on scikit-learn's handwritten digits packaged beside it, then served on localhost.

The page (static/index.html, demo.js) holds everything in the tab: the model, the user's
drawings, the trained weights. The same digits, as the same uint8 images, are what
experiments.web_accuracy fine-tunes with `edgetune finetune` to compare accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

MODEL = "mobilenetv2-imagenet"
CLASSES = [str(d) for d in range(10)]  # the sample set's; the user may draw anything in their place


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=os.path.join("runs", "web-demo"), help="the folder to write and serve")
    p.add_argument("--scheme", default="mbv2-99kb", help="what trains (any --scheme value; the head always trains)")
    p.add_argument("--size", type=int, default=96, help="image side in pixels")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.001, help="SGD (momentum 0.9) learning rate the page starts with "
                   "(0.001: the best of 3e-4..3e-2 on the packaged digits, experiments.web_accuracy)")
    p.add_argument("--port", type=int, default=8000, help="0: any free port")
    p.add_argument("--no-serve", action="store_true", help="write the folder and stop")


def run(args: argparse.Namespace) -> int:
    folder = build(args.out, scheme=args.scheme, size=args.size, batch=args.batch, lr=args.lr)
    if args.no_serve:
        print(f"the page is in {folder}/: serve it with any web server (threads need the headers of edgetune.web.serve)")
        return 0
    from edgetune.web.serve import serve

    serve(folder, args.port, "edgetune web demo: open {address} in a browser (Ctrl-C stops the server). "
          "Training runs in the page; nothing you draw leaves it.")
    return 0


def build(out: str | os.PathLike, scheme: str = "mbv2-99kb", size: int = 96, batch: int = 8,
          lr: float = 0.001, samples_per_class_train: int = 20, seed: int = 0) -> Path:
    """Compile, export for the web and write the sample digits into `out`; returns it. `seed`
    draws the new head."""
    from edgetune.web import export_web, onnxruntime_web_dist

    onnxruntime_web_dist()  # said before the compile, not after
    trainer, pre = demo_trainer(scheme, size, batch, lr, seed)
    folder = Path(out)
    images, labels = digit_samples(size)
    train, test = sample_split(labels, samples_per_class_train)
    samples = write_samples(folder / "samples", images, labels, train, test)
    export_web(trainer, folder, demo={"model": "MobileNetV2 (ImageNet weights), new 10-class head", "scheme": scheme,
                                      "classes": CLASSES, "mean": list(pre.mean), "std": list(pre.std),
                                      "samples": samples})
    return folder


def demo_trainer(scheme: str = "mbv2-99kb", size: int = 96, batch: int = 8, lr: float = 0.001,
                 seed: int = 0) -> tuple:
    """(the compiled Trainer, the Pretrained model) of the demo: MobileNetV2 with ImageNet weights
    and a new 10-class head drawn after torch.manual_seed(seed) (as `edgetune finetune --seed`
    draws it), eval-mode BatchNorm, `scheme` plus the head, SGD momentum 0.9."""
    import torch
    import torch.nn.functional as F

    import edgetune as et
    from edgetune.models.pretrained import load_pretrained

    torch.manual_seed(seed)
    pre = load_pretrained(MODEL, len(CLASSES))
    pre.model.eval()  # BatchNorm keeps ImageNet's statistics: a few examples cannot estimate them
    rules = et.schemes.with_head(et.schemes.parse(scheme), pre.head)
    example = (torch.zeros(batch, 3, size, size),), (torch.zeros(batch, dtype=torch.int64),)
    trainer = et.compile(pre.model, F.cross_entropy, *example, scheme=rules, optimizer=et.SGD(lr=lr, momentum=0.9))
    return trainer, pre


def digit_samples(size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits as uint8 grey images [N, size, size] (ink bright on
    dark, as the page's drawing pad makes them), upsampled bilinearly as ImagePreprocess would."""
    import torch
    import torch.nn.functional as F

    from edgetune.data import load_digits

    data = load_digits()
    x = F.interpolate(data.items.float(), size=(size, size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)[:, 0].numpy(), data.labels.numpy()


def sample_split(labels: np.ndarray, per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: `per_class` training examples of each class, the rest held out."""
    rng = np.random.default_rng(seed)
    train = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)])
    train = rng.permutation(train)
    return train, np.setdiff1d(np.arange(len(labels)), train)


def write_samples(folder: Path, images: np.ndarray, labels: np.ndarray, train: np.ndarray,
                  test: np.ndarray) -> dict:
    """The images as one raw uint8 file, and their labels and split for the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    np.ascontiguousarray(images).tofile(folder / "digits.bin")
    return {"file": "samples/digits.bin", "count": int(len(images)), "size": int(images.shape[-1]),
            "labels": labels.tolist(), "train": train.tolist(), "test": test.tolist(),
            "source": "scikit-learn's handwritten digits (8x8, upsampled)"}


def built_samples(folder: str | os.PathLike) -> tuple[dict, np.ndarray, np.ndarray]:
    """(the manifest's web.demo, the packaged images uint8 [N, S, S], their labels int64 [N]) of
    a folder `build` wrote."""
    folder = Path(folder)
    demo = json.loads((folder / "model" / "manifest.json").read_text())["web"]["demo"]
    s = demo["samples"]
    images = np.fromfile(folder / s["file"], np.uint8).reshape(s["count"], s["size"], s["size"])
    return demo, images, np.array(s["labels"], np.int64)


def sample_batch(folder: str | os.PathLike, rows: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The first `rows` packaged training digits of a built folder, as the page makes its inputs:
    (float32 [rows, 3, S, S] normalised per channel, int64 labels [rows])."""
    demo, images, labels = built_samples(folder)
    take = np.array(demo["samples"]["train"][:rows])
    grey = images[take].astype(np.float32)[:, None] / 255
    mean, std = (np.array(demo[k], np.float32).reshape(1, 3, 1, 1) for k in ("mean", "std"))
    return np.ascontiguousarray((grey - mean) / std, dtype=np.float32), labels[take]
