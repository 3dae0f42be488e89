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
