"""What the experiments share: a measurement run in a fresh process (its last stdout line is
its JSON result), a results file read back, their section of RESULTS.md written in place, and
the rule that keeps a tuned learning rate off its grid's edge."""
from __future__ import annotations

import json
import math
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


def write_marked_section(path: str, markers: tuple[str, str], body: str) -> None:
    """Replace the text between `markers` in the markdown file `path` with `body`, or append
    the marked body where the file has no such section yet."""
    from edgetune.files import write_text

    text = open(path).read() if os.path.exists(path) else ""
    block = f"{markers[0]}\n{body}\n{markers[1]}"
    if markers[0] in text and markers[1] in text:
        head, rest = text.split(markers[0], 1)
        text = head + block + rest.split(markers[1], 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    write_text(path, text)


def choose_lr(grid: list[float], loss: dict[float, float]) -> tuple[float, float | None]:
    """(the rate with the lowest `loss`, the rate to add or None). A best at the top of the grid
    asks for one 3x above it, at the bottom for one 3x below, so that a tuned rate is never a
    grid's edge; where every rate diverged (inf), lower rates are tried."""
    grid = sorted(grid)
    best = min(grid, key=lambda lr: (loss[lr], lr))
    if math.isinf(loss[best]):
        return best, grid[0] / 3
    if best == grid[-1]:
        return best, best * 3
    if best == grid[0]:
        return best, best / 3
    return best, None
