"""BENCHMARKS.md as the benchmarks write it: the sections each one rewrites between its own
markers, and the facts every section states (which CPU, which commit of edgetune/)."""
from __future__ import annotations

import argparse
import platform
import subprocess
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
# The vision report (python -m bench) rewrites the file up to the LM section and keeps the rest.
LM_BEGIN, LM_END = "<!-- lm-bench:begin -->", "<!-- lm-bench:end -->"
PREDICTION_BEGIN, PREDICTION_END = "<!-- prediction:begin -->", "<!-- prediction:end -->"


def replace_section(path: Path, text: str, begin: str, end: str) -> None:
    """Put `text` (which starts with `begin` and ends with `end`) in place of that section of
    `path`, or append it; nothing else in the file changes."""
    old = path.read_text() if path.exists() else ""
    start, stop = old.find(begin), old.find(end)
    if start >= 0 and stop > start:
        new = old[:start] + text.rstrip("\n") + old[stop + len(end):]
    else:
        new = old + ("" if not old or old.endswith("\n\n") else "\n" if old.endswith("\n") else "\n\n") + text
    path.write_text(new)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def edgetune_revision() -> str:
    """The last commit that touched edgetune/, marked when edgetune/ has uncommitted changes.

    Others commit while a run goes on; what matters is the engine code that was measured."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    rev = git("log", "-1", "--format=%h", "--", "edgetune") or "unknown"
    return rev + (" with uncommitted changes" if git("status", "--porcelain", "edgetune") else "")


def time_modes(results: list[dict]) -> list[tuple[str, int | None]]:
    """(cells mode, thread count) of each time table: one per thread count measured, or the one
    "time" of results from before thread counts were recorded per run."""
    counts = sorted({int(t) for r in results for t in r.get("time_by_threads", {})})
    return [(f"time@{t}", t) for t in counts] or [("time", None)]


def compared(threads: int | None) -> tuple[str, str]:
    """Which median the ratios compare: CPU time with one thread (the step's own work, whatever
    the load), wall time with more (CPU time then counts every thread, spinning ones too)."""
    return ("cpu_median_s", "CPU") if threads in (1, None) else ("median_s", "wall")


def one_process_main(doc: str, run: Callable[[int, int], dict], report: Callable[[dict], str], *,
                     steps: int, out: str, argv=None) -> int:
    """The command line of a benchmark whose variants take turns in one process: `run(threads,
    steps)` measures (its results name their date, cpu and commit), the results go to --out as
    JSON, and `report(results)` is printed under the line that says where they were measured."""
    from edgetune.files import write_json

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--out", default=out)
    args = p.parse_args(argv)
    result = run(args.threads, args.steps)
    write_json(args.out, result)
    print(f"{result['date']}, {result['cpu']}, {args.threads} thread(s), edgetune/ at {result['commit']}")
    print(report(result))
    return 0
