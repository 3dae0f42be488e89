"""What the language-model experiments share: a measurement run in a fresh process (its
last stdout line is its JSON result), and a results file read back."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_child(module: str, args: list[str]):
    """`python -m module *args` from the repository root; the JSON of its last output line."""
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def load_json(path: str) -> dict:
    """The results saved at `path`, or {} before the first run."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)
