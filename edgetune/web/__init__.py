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
# onnxruntime-web's WASM build (default) and its WebGPU build, each an ES module and its binary
ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm",
             "ort.webgpu.min.mjs", "ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm")
REPO_WEB = Path(__file__).resolve().parents[2] / "web"


class WebExportError(RuntimeError):
    """What the web export needs and does not have, and how to get it."""


def export_web(trainer: Any, folder: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write `trainer`'s step as a static web folder (see the module's doc). `extra` goes into
    the manifest's "web" entry (e.g. the page's class names and preprocessing). Returns the
    folder."""
    folder = Path(folder)
    ort_dist = onnxruntime_web_dist()  # checked before the export's work
    model = folder / "model"
    trainer.export_onnx(model)
    describe_for_web(model, extra or {})
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


def describe_for_web(model_folder: Path, extra: dict[str, Any]) -> None:
    """Add to the export's manifest what a page needs and cannot find out without parsing ONNX:
    which data files each graph reads (onnxruntime-web takes them as buffers), and a
    fingerprint of the export under which the page keeps its saved state."""
    import onnx

    path = model_folder / "manifest.json"
    manifest = json.loads(path.read_text())
    graphs = [manifest["model"]] + ([manifest["predict"]["model"]] if "predict" in manifest else [])
    external = {g: _external_files(onnx.load(str(model_folder / g), load_external_data=False)) for g in graphs}
    digest = hashlib.sha256()
    for name in graphs + [manifest.get("state")] + sorted({f for fs in external.values() for f in fs}):
        if name:
            digest.update(name.encode() + (model_folder / name).read_bytes())
    manifest["web"] = {**extra, "external_data": external, "fingerprint": digest.hexdigest()[:16]}
    write_json(str(path), manifest)


def _external_files(model: Any) -> list[str]:
    import onnx

    files = {entry.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
             for entry in t.external_data if entry.key == "location"}
    return sorted(files)


def copy_files(source: Path, destination: Path, names: tuple[str, ...]) -> None:
    destination.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(source / name, destination / name)
