"""This checkout's step against another commit's, configuration by configuration, in turns.

    python -m bench.against a05d568 --models mobilenetv2-0.35,vit --schemes bias-only,tte --batches 1

A change to the engine is judged by its effect on the same step on the same machine. The
other commit is checked out in a temporary git worktree; for each model x scheme x batch,
edgetune (torch backend) from both checkouts and PyTorch eager (this checkout's
`bench.run_one`, for scale) each run in a fresh process, timed in turns (bench/interleave.py)
so that a busy spell of the machine slows them alike. One thread: CPU time; more: wall time
(bench/sections.compared). Prints a Markdown table of medians and ratios; --json keeps the
raw times.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import configs
from bench.interleave import ROOT, STEPS_PER_TURN, Server, time_in_turns
from bench.sections import compared, cpu_model, edgetune_revision
from edgetune.files import write_json


def worktree(ref: str, where: Path) -> Path:
    """A detached checkout of `ref` in `where` (git worktree: shares this repository's objects)."""
    subprocess.run(["git", "worktree", "add", "--detach", str(where), ref], cwd=ROOT, check=True,
                   capture_output=True, text=True)
    return where


def remove_worktree(where: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=ROOT, capture_output=True)


def server_in(checkout: Path):
    """A `time_in_turns` start function that runs `bench.run_one` from `checkout`: `python -m`
    puts the working directory first on sys.path, so its edgetune/ is the one imported."""
    def start(config: configs.Config, threads: int, env: dict, timeout: float) -> Server:
        cmd = [sys.executable, "-m", "bench.run_one", *config.argv(), "--mode", "serve", "--threads", str(threads)]
        return Server(["bash", "-c", 'cd "$0" && exec "$@"', str(checkout), *cmd], env, timeout)
    return start


def compare(ref: str, models: list[str], schemes: list[str], batches: list[int], threads: int,
            steps: int, timeout: float) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        other = worktree(ref, Path(tmp) / "other")
        try:
            members = {"eager": ROOT, "edgetune@" + ref: other, "edgetune": ROOT}
            for model in models:
                for scheme in schemes:
                    for batch in batches:
                        group = [(name, checkout, configs.Config(model, scheme, batch, name.split("@")[0]))
                                 for name, checkout in members.items()]
                        results = time_in_turns(group, threads, steps, dict(os.environ), timeout,
                                                start=lambda m, t, e, s: server_in(m[1])(m[2], t, e, s))
                        rows.append({"model": model, "scheme": scheme, "batch": batch, "threads": threads,
                                     "results": {name: r for (name, _, _), r in zip(group, results)}})
                        print(_line(rows[-1], ref), flush=True)
        finally:
            remove_worktree(other)
    return rows


def _line(row: dict, ref: str) -> str:
    key, _ = compared(row["threads"])
    r = row["results"]
    if not all(x.get("ok") for x in r.values()):
        errors = "; ".join(f"{k}: {x.get('error')}" for k, x in r.items() if not x.get("ok"))
        return f"| {row['model']} | {row['scheme']} | {row['batch']} | failed: {errors} |||||"
    eager, old, new = (r[k][key] * 1e3 for k in ("eager", "edgetune@" + ref, "edgetune"))
    paired = _per_turn_ratio(r["edgetune@" + ref], r["edgetune"], key)
    return (f"| {row['model']} | {row['scheme']} | {row['batch']} | {old:.2f} | {new:.2f} | {new / old:.3f} "
            f"({paired[0]:.3f}-{paired[1]:.3f}) | {eager:.2f} | {eager / old:.2f}x | {eager / new:.2f}x |")


def _per_turn_ratio(old: dict, new: dict, key: str) -> tuple[float, float]:
    """Quartiles of new/old over the turns (each turn's median step of each)."""
    times = "cpu_times_s" if key == "cpu_median_s" else "times_s"
    per = STEPS_PER_TURN
    ratios = [statistics.median(new[times][k:k + per]) / statistics.median(old[times][k:k + per])
              for k in range(0, min(len(old[times]), len(new[times])), per)]
    if len(ratios) < 2:
        return ratios[0], ratios[0]
    q = statistics.quantiles(ratios, n=4)
    return q[0], q[2]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ref", help="the commit to compare with (any git ref)")
    p.add_argument("--models", default="mobilenetv2-0.35")
    p.add_argument("--schemes", default="bias-only,tte")
    p.add_argument("--batches", default="1")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", help="also write the raw results here")
    args = p.parse_args(argv)
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    mode = "CPU ms, 1 thread" if args.threads == 1 else f"wall ms, {args.threads} threads"
    print(f"edgetune/ at {edgetune_revision()} against {args.ref}; {cpu_model()}; {mode}; "
          f"medians of {args.steps} steps in turns\n")
    print(f"| model | scheme | batch | {args.ref} | this | this / {args.ref} (per-turn quartiles) | eager | "
          f"eager / {args.ref} | eager / this |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = compare(args.ref, split(args.models), split(args.schemes), [int(b) for b in split(args.batches)],
                   args.threads, args.steps, args.timeout)
    if args.json:
        write_json(Path(args.json), {"ref": args.ref, "revision": edgetune_revision(), "cpu": cpu_model(),
                                     "rows": rows})


if __name__ == "__main__":
    main()
