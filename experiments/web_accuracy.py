"""Does fine-tuning in the browser reach the accuracy of `edgetune finetune`? (issue 15)

    python -m experiments.web_accuracy            # writes experiments/results/web_accuracy.json

The web demo's model and scheme (ImageNet MobileNetV2, mbv2-99kb + a new head, 96x96, batch 8,
SGD momentum 0.9 at a constant rate, BatchNorm in eval mode) on the demo's packaged data: 20
handwritten digits of each class to train on, the other 1,597 held out. Both sides see the same
uint8 images, without augmentation, for the same number of epochs:
- the page in headless Chromium (onnxruntime-web, WASM), through web/drive.mjs's `fit`;
- `edgetune finetune` on the same images as .npz files (--no-augment --schedule constant).
Each at several seeds (data order), since one seed's accuracy on 200 examples moves by points.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "web_accuracy.json"
TITLE = "## Fine-tuning in the browser against `edgetune finetune` (issue 15)"
SIZE, BATCH, SCHEME = 96, 8, "mbv2-99kb"


def browser_run(url: str, epochs: int, seed: int, lr: float, schedule: str, order: str | None = None) -> dict:
    from edgetune.web.browser import drive

    got = drive("fit", url, "--epochs", str(epochs), "--seed", str(seed), "--lr", str(lr), "--schedule", schedule,
                *(["--order", order] if order else []), timeout=3600)
    return {k: got[k] for k in ("before", "after", "seconds", "steps", "losses", "threads")}


def python_run(folder: Path, epochs: int, seed: int, lr: float, schedule: str, work: Path) -> dict:
    """`edgetune finetune` on the page's images (written once as train.npz / test.npz)."""
    train, test = work / "train.npz", work / "test.npz"
    if not train.exists():
        from edgetune.web.demo import built_samples

        demo, images, labels = built_samples(folder)
        for path, idx in ((train, demo["samples"]["train"]), (test, demo["samples"]["test"])):
            np.savez(path, x=images[idx][:, None], y=labels[idx], classes=np.array(demo["classes"]))
    cmd = [sys.executable, "-m", "edgetune.cli", "finetune", "--model", "mobilenetv2-imagenet", "--data", str(train),
           "--val-data", str(test), "--scheme", SCHEME, "--size", str(SIZE), "--batch", str(BATCH),
           "--epochs", str(epochs), "--lr", str(lr), "--schedule", schedule, "--no-augment", "--seed", str(seed),
           "--no-progress", "--out", str(work / f"run-{seed}-{lr:g}")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=ROOT)
    if run.returncode:
        raise RuntimeError(f"edgetune finetune failed: {run.stderr[-3000:]}")
    summary = re.search(r"held-out accuracy ([\d.]+)% -> ([\d.]+)%", run.stdout)
    if not summary:
        raise RuntimeError(f"no held-out accuracy in edgetune finetune's output:\n{run.stdout[-2000:]}")
    return {"before": float(summary[1]) / 100, "after": float(summary[2]) / 100}


SIDES = ("browser", "browser_same_order", "python")


def finetune_order(folder: Path, epochs: int, seed: int) -> str:
    """The batches `edgetune finetune --seed seed` trains on (as sample indices), written into the
    site for the page to take: test/order-<seed>.json."""
    from edgetune.data.core import batch_indices
    from edgetune.web.demo import built_samples

    train = built_samples(folder)[0]["samples"]["train"]
    batches = [[train[i] for i in idx.tolist()] for epoch in range(epochs)
               for idx in batch_indices(len(train), BATCH, shuffle=True, seed=seed + epoch, drop_last=True)]
    (folder / "test").mkdir(exist_ok=True)
    (folder / "test" / f"order-{seed}.json").write_text(json.dumps(batches))
    return f"test/order-{seed}.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lr", type=float, default=0.001, help="the demo's rate: the best of 3e-4..3e-2 "
                        "for this job in a scan with the torch backend")
    parser.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                        help="the rate over the run (finetune's schedules; the page follows the same formula)")
    parser.add_argument("--sides", default=",".join(SIDES), help="which to run: browser (the page's own data "
                        "order), browser_same_order (finetune's batches), python (edgetune finetune); the "
                        "others are kept from the last results with the same settings")
    args = parser.parse_args()
    from edgetune.web.demo import build
    from edgetune.web.serve import address, make_server, start_in_thread

    seeds = [int(s) for s in args.seeds.split(",")]
    meta = {"epochs": args.epochs, "lr": args.lr, "schedule": args.schedule, "seeds": seeds, "scheme": SCHEME, "size": SIZE, "batch": BATCH}
    old = load()
    same = old.get("meta", {}) | {"date": None} == meta | {"date": None}
    runs = {side: (old["runs"].get(side, {}) if same else {}) for side in SIDES}
    sides = args.sides.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        server = make_server(tmp)
        start_in_thread(server)
        for seed in seeds:  # in turns, so that the machine's drift hits every side alike
            key = str(seed)
            # the page starts from the head `edgetune finetune --seed` draws
            folder = build(Path(tmp) / f"site-{seed}", SCHEME, SIZE, BATCH, lr=args.lr, seed=seed)
            url = f"{address(server)}site-{seed}/"
            if "browser" in sides:
                runs["browser"][key] = browser_run(url, args.epochs, seed, args.lr, args.schedule)
            if "browser_same_order" in sides:
                order = finetune_order(folder, args.epochs, seed)
                runs["browser_same_order"][key] = browser_run(url, args.epochs, seed, args.lr, args.schedule, order)
            if "python" in sides:
                runs["python"][key] = python_run(folder, args.epochs, seed, args.lr, args.schedule, Path(tmp))
            print(f"seed {seed}: " + ", ".join(f"{side} {100 * runs[side][key]['after']:.2f}%" for side in SIDES
                                                if key in runs[side]), flush=True)
        server.shutdown()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"meta": {**meta, "date": str(datetime.date.today())}, "runs": runs}, indent=1))
    print(section(load()))
    return 0


def load() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def section(results: dict) -> str:
    meta, runs = results["meta"], {side: r for side, r in results["runs"].items() if r}
    pct = lambda v: f"{100 * v:.2f}%"  # noqa: E731
    names = {"browser": "in Chromium, the page's own data order", "browser_same_order":
             "in Chromium, `edgetune finetune`'s batches", "python": "`edgetune finetune` (torch backend)"}
    lines = [TITLE, "",
             f"`python -m experiments.web_accuracy` — the web demo's model and scheme (ImageNet MobileNetV2, "
             f"`{meta['scheme']}` + a new 10-class head, {meta['size']}x{meta['size']}, batch {meta['batch']}, SGD "
             f"momentum 0.9 at {meta['lr']:g}, {meta.get('schedule', 'constant')} schedule, eval-mode BatchNorm) on the demo's packaged digits: 20 "
             f"of each class to train on, the other 1,597 held out, the same uint8 images on both sides, no "
             f"augmentation, {meta['epochs']} epochs; seeds {meta['seeds']} (data order); {meta['date']}. In "
             "Chromium: onnxruntime-web, WASM, 2 threads (web/drive.mjs fit).", "",
             "| where | held-out accuracy, mean (min..max) | per seed |", "|---|---|---|"]
    for side, r in runs.items():
        after = [v["after"] for v in r.values()]
        lines.append(f"| {names[side]} | {pct(statistics.mean(after))} ({pct(min(after))}..{pct(max(after))}) | "
                     f"{', '.join(pct(a) for a in after)} |")
    python = runs.get("python", {})
    page = runs.get("browser_same_order") or runs.get("browser") or {}
    both = sorted(set(page) & set(python))
    if both:
        lines += ["", "Before training (each seed's new head, the same on both sides): the page "
                  f"{', '.join(pct(page[k]['before']) for k in both)}, `edgetune finetune` "
                  f"{', '.join(pct(python[k]['before']) for k in both)}."]
    for side in ("browser_same_order", "browser"):
        if side not in runs or not python:
            continue
        seeds = sorted(set(runs[side]) & set(python))
        gaps = [100 * (runs[side][k]["after"] - python[k]["after"]) for k in seeds]
        gap = statistics.mean(gaps)
        lines += ["", f"{names[side][0].upper() + names[side][1:]}: {gap:+.2f} points from `edgetune finetune` on average "
                  f"(per seed {', '.join(f'{g:+.2f}' for g in gaps)}): within 1 point "
                  f"**{'met' if abs(gap) <= 1 else 'missed'}**."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
