"""Runs web/drive.mjs (headless Chromium through playwright-core) against a served page: the
browser half of the web tests, `bench.web` and `experiments.web_accuracy`."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from edgetune.web import REPO_WEB

DRIVER = REPO_WEB / "drive.mjs"


class BrowserRunError(RuntimeError):
    """The page failed in the browser; the message ends with the driver's error and the browser's console."""


def write_test_batch(folder: str | os.PathLike, batch: list, kinds: list[str], lr: float | None = None) -> None:
    """test/ of a served folder: the batch drive.mjs's page-side code steps on (arrays in step()'s
    order, each "input" or "target"), and the rate to use (None: the export's)."""
    import numpy as np

    test = Path(folder) / "test"
    test.mkdir(parents=True, exist_ok=True)
    arrays = []
    for k, (array, kind) in enumerate(zip(batch, kinds)):
        array = np.ascontiguousarray(array)
        array.tofile(test / f"array{k}.bin")
        arrays.append({"file": f"array{k}.bin", "dtype": str(array.dtype), "shape": list(array.shape), "kind": kind})
    (test / "batch.json").write_text(json.dumps({"arrays": arrays, **({"lr": lr} if lr is not None else {})}))


def drive(mode: str, url: str, *args: str, out: str | os.PathLike | None = None, timeout: float = 900) -> dict:
    """`node web/drive.mjs MODE URL OUT ARGS...`; returns its results.json. `out` keeps what it
    writes (downloads, screenshots); by default a temporary folder that is removed."""
    if out is None:
        with tempfile.TemporaryDirectory() as tmp:
            return drive(mode, url, *args, out=tmp, timeout=timeout)
    run = subprocess.run(["node", str(DRIVER), mode, url, os.fspath(out), *args], capture_output=True, text=True,
                         timeout=timeout)
    if run.returncode:
        raise BrowserRunError(f"web/drive.mjs {mode} failed:\n{run.stderr[-6000:]}")
    return json.loads((Path(out) / "results.json").read_text())
