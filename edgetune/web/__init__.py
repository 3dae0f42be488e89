"""The training step in a web page: `export_web` writes a static folder that any web server can
host, and that fine-tunes the model in the browser with onnxruntime-web, nothing uploaded.

    DIR/model/        the ONNX export (step.onnx, predict.onnx, manifest.json, state.safetensors)
    DIR/ort/          onnxruntime-web's WASM and WebGPU builds, copied from web/node_modules
    DIR/edgetune-web.js   the ES module that steps it: Trainer.load, step, predict, saveState ...
    DIR/index.html, demo.js, demo.css   the fine-tuning page (image classifiers)

onnxruntime-web comes from the npm registry, pinned in web/package.json with its lock file
(`npm ci --prefix web`, which `make web-demo` and `make test` run); nothing is fetched when the
page runs. Threads need the page cross-origin isolated: `serve` sends the headers for it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from edgetune.files import write_json

STATIC = Path(__file__).parent / "static"
PAGE_FILES = ("edgetune-web.js", "index.html", "demo.js", "demo.css")
# onnxruntime-web's WASM build (default) and its build with WebGPU, each an ES module and its binary
ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm",
             "ort.min.mjs", "ort-wasm-simd-threaded.jsep.mjs", "ort-wasm-simd-threaded.jsep.wasm")
REPO_WEB = Path(__file__).resolve().parents[2] / "web"


class WebExportError(FileNotFoundError):
    """What the web export needs and does not have, and how to get it."""


IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def export_web(trainer: Any, folder: str | os.PathLike, demo: dict[str, Any] | None = None) -> Path:
    """Write `trainer`'s step as a static web folder (see the module's doc). For an image
    classifier (input [B, 3, S, S], output [B, classes]) the manifest's web.demo describes it to
    the page (class names, input size and normalisation, memory); `demo` overrides any of that.
    Returns the folder."""
    folder = Path(folder)
    ort_dist = onnxruntime_web_dist()  # checked before the export's work
    model = folder / "model"
    trainer.export_onnx(model)
    describe_for_web(model, trainer, demo or {})
    copy_files(ort_dist, folder / "ort", ORT_FILES)
    copy_files(STATIC, folder, PAGE_FILES)
    return folder


def onnxruntime_web_dist() -> Path:
    """onnxruntime-web's dist folder: $EDGETUNE_ORT_WEB, or web/node_modules of this checkout."""
    dist = Path(os.environ.get("EDGETUNE_ORT_WEB") or REPO_WEB / "node_modules" / "onnxruntime-web" / "dist")
    missing = [f for f in ORT_FILES if not (dist / f).is_file()]
    if missing:
        raise WebExportError(f"onnxruntime-web is not installed at {dist} (missing {missing[0]}): run "
                             f"`npm ci --prefix {REPO_WEB}` (the version web/package-lock.json pins), or set "
                             "EDGETUNE_ORT_WEB to an onnxruntime-web dist folder")
    return dist


def describe_for_web(model_folder: Path, trainer: Any, demo: dict[str, Any]) -> None:
    """Add to the export's manifest what a page needs and cannot find out without parsing ONNX:
    which data files each graph reads (onnxruntime-web takes them as buffers), a fingerprint
    of the export under which the page keeps its saved state, and for the demo page, what the
    model is (web.demo)."""
    import onnx

    path = model_folder / "manifest.json"
    manifest = json.loads(path.read_text())
    described = {**(_image_classifier(manifest, trainer) or {}), **demo}
    graphs = [manifest["model"]] + ([manifest["predict"]["model"]] if "predict" in manifest else [])
    external = {g: _external_files(onnx.load(str(model_folder / g), load_external_data=False)) for g in graphs}
    digest = hashlib.sha256()
    for name in graphs + [manifest.get("state")] + sorted({f for fs in external.values() for f in fs}):
        if name:
            digest.update(name.encode() + (model_folder / name).read_bytes())
    manifest["web"] = {"external_data": external, "fingerprint": digest.hexdigest()[:16],
                       **({"demo": described} if described else {})}
    write_json(str(path), manifest)


def _image_classifier(manifest: dict, trainer: Any) -> dict[str, Any] | None:
    """What the demo page needs of an image classifier (one input [B, 3, S, S], output
    [B, classes]), with ImageNet's normalisation; None for any other model."""
    predict = manifest.get("predict")
    if not predict:
        return None
    inputs = [i for i in predict["inputs"] if i["kind"] == "input"]
    shape, out = (inputs[0]["shape"] if len(inputs) == 1 else []), predict["output"]["shape"]
    if len(shape) != 4 or shape[1] != 3 or shape[2] != shape[3] or len(out) != 2:
        return None
    return {"model": type(trainer.model).__name__, "scheme": "as exported", "classes": [str(c) for c in range(out[1])],
            "size": shape[2], "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "trainable_params": trainer.trainable_params,
            "total_params": sum(p.numel() for p in trainer.model.parameters()),
            "predicted_peak_bytes": trainer.plan.peak_bytes}


def _external_files(model: Any) -> list[str]:
    import onnx

    files = {entry.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
             for entry in t.external_data if entry.key == "location"}
    return sorted(files)


def copy_files(source: Path, destination: Path, names: tuple[str, ...]) -> None:
    destination.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(source / name, destination / name)
