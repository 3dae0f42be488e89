"""The web demo's step in the browser against the same step in Python: `python -m bench.web`
writes the section of BENCHMARKS.md between its markers (and bench/results-web.json).

Three engines run the demo's step (MobileNetV2 ImageNet, mbv2-99kb + head, 96x96, batch 8,
SGD momentum) on the same batch of packaged digits:
- the page in headless Chromium: onnxruntime-web (WASM) through edgetune-web.js, timed in the
  page with performance.now(); memory: the tab's renderer process, VmHWM;
- edgetune.runtime.StepRunner: onnxruntime in Python on the same exported folder;
- edgetune's torch backend (the compiled Trainer).
Each run is a fresh process (a fresh browser for the page): WARMUP steps, then --steps timed
ones; the engines take turns, --rounds times, at each thread count; medians are reported. The
Python processes' peaks are VmHWM with MALLOC_MMAP_THRESHOLD_=65536, like the rest of bench/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import sections
from bench.child import ROOT

BEGIN, END = "<!-- web-bench:begin -->", "<!-- web-bench:end -->"
ENGINES = ("browser", "python-ort", "torch")
SIZE, BATCH, SCHEME = 96, 8, "mbv2-99kb"
# V8 runs WebAssembly first from its baseline compiler and tiers hot functions up in the
# background: the page's first ~8 steps are 2x slower than the rest. Every engine gets as many.
WARMUP = 10
MB = 2 ** 20


def write_batch(folder: Path) -> None:
    """test/ of the site: 8 packaged training digits as the page makes its inputs."""
    import numpy as np

    from edgetune.web.browser import write_test_batch
    from edgetune.web.demo import sample_batch

    x, y = sample_batch(folder)
    write_test_batch(folder, [x, y], ["input", "target"])
    np.save(folder / "test" / "x.npy", x)
    np.save(folder / "test" / "y.npy", y)


def run_browser(url: str, threads: int, steps: int) -> dict:
    from edgetune.web.browser import drive

    got = drive("bench", url, "--steps", str(steps), "--threads", str(threads), "--warmup", str(WARMUP))
    if got["threads"] != threads:
        raise RuntimeError(f"the page ran {got['threads']} threads, not {threads} (cross-origin isolated: "
                           f"{got.get('isolated')})")
    tab = max(got["renderers"], key=lambda r: r["hwm_kb"])  # the page's renderer: the one that grew
    return {"times_ms": got["times_ms"], "warmup_ms": got["warmup_ms"], "peak_mb": tab["hwm_kb"] / 1024}


def run_python(engine: str, folder: Path, threads: int, steps: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "bench.web", "--child", engine, "--folder", str(folder), "--threads", str(threads),
           "--steps", str(steps)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    if run.returncode:
        raise RuntimeError(f"{engine} failed: {run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def child(engine: str, folder: Path, threads: int, steps: int) -> None:
    """One engine's timed steps, in this (fresh) process; prints one JSON line."""
    import numpy as np

    from edgetune.procmem import vm_hwm_bytes  # no torch: the onnxruntime child never imports it

    x, y = np.load(folder / "test" / "x.npy"), np.load(folder / "test" / "y.npy")
    if engine == "python-ort":
        import onnxruntime as ort

        from edgetune.runtime import StepRunner
        from edgetune.runtime.runner import lean_session_options

        options = lean_session_options(ort)
        options.intra_op_num_threads = threads
        runner = StepRunner(folder / "model", session_options=options)
        step = lambda: runner.step(x, y)  # noqa: E731
    else:
        import torch

        from edgetune.web.demo import demo_trainer

        torch.set_num_threads(threads)
        trainer, _ = demo_trainer(SCHEME, SIZE, BATCH)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        step = lambda: trainer.step(xt, yt)  # noqa: E731
    for _ in range(WARMUP):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000)
    print(json.dumps({"times_ms": times, "peak_mb": vm_hwm_bytes() / 2**20}))


def measure(folder: Path, url: str, threads_list: list[int], rounds: int, steps: int) -> list[dict]:
    rows = []
    for threads in threads_list:
        runs = {e: [] for e in ENGINES}
        for r in range(rounds):
            for engine in ENGINES:  # in turns: the machine's drift hits every engine alike
                got = run_browser(url, threads, steps) if engine == "browser" else \
                    run_python(engine, folder, threads, steps)
                runs[engine].append(got)
                print(f"threads {threads} round {r + 1} {engine}: median {statistics.median(got['times_ms']):.1f} ms, "
                      f"peak {got['peak_mb']:.0f} MB", flush=True)
        for engine, got in runs.items():
            medians = [statistics.median(g["times_ms"]) for g in got]
            rows.append({"engine": engine, "threads": threads, "median_ms": statistics.median(medians),
                         "round_medians_ms": medians, "peak_mb": statistics.median(g["peak_mb"] for g in got),
                         "warmup_median_ms": statistics.median(statistics.median(g["warmup_ms"]) for g in got)
                         if "warmup_ms" in got[0] else None})
    return rows


def section(rows: list[dict], rounds: int, steps: int) -> str:
    by = {(r["engine"], r["threads"]): r for r in rows}
    names = {"browser": "page in Chromium (onnxruntime-web, WASM)", "python-ort": "StepRunner (onnxruntime, Python)",
             "torch": "edgetune torch backend"}
    lines = [BEGIN, "## The step in a web page (`python -m bench.web`, issue 15)", "",
             f"{datetime.date.today()}, {sections.cpu_model()}, edgetune {sections.edgetune_revision()}. "
             f"The web demo's step: MobileNetV2 (ImageNet weights, new 10-class head), `{SCHEME}` + head, "
             f"{SIZE}x{SIZE}, batch {BATCH}, SGD momentum, on 8 packaged digits. Each run a fresh process "
             f"(a fresh headless Chromium for the page), {WARMUP} warm-up steps then {steps} timed; the three engines "
             f"in turns, {rounds} rounds; the median of the rounds' medians. Peak: the page's renderer process "
             "(VmHWM: JS heap, WASM memory, the models as loaded), or the Python process (VmHWM, "
             "MALLOC_MMAP_THRESHOLD_=65536; the interpreter and libraries included).", "",
             "| engine | threads | step (ms) | steps/s | vs onnxruntime in Python | peak (MB) |", "|---|---|---|---|---|---|"]
    for (engine, threads), r in sorted(by.items(), key=lambda kv: (kv[0][1], ENGINES.index(kv[0][0]))):
        ratio = r["median_ms"] / by[("python-ort", threads)]["median_ms"]
        lines.append(f"| {names[engine]} | {threads} | {r['median_ms']:.1f} | {1000 / r['median_ms']:.1f} | "
                     f"{ratio:.2f}x the time | {r['peak_mb']:.0f} |")
    warm = [f"{r['warmup_median_ms']:.0f} ms at {t} thread{'s' * (t > 1)}" for (e, t), r in sorted(by.items())
            if e == "browser"]
    lines += ["", f"The page's first {WARMUP} steps (V8 tiering the WebAssembly up) take a median of {', '.join(warm)}."]
    browser2 = by.get(("browser", 2))
    if browser2:
        ratio = browser2["median_ms"] / by[("python-ort", 2)]["median_ms"]
        verdict = "met" if ratio <= 2 else "missed"
        lines += ["", f"Goal: a step in the browser (WASM, 2 threads) within 2x of onnxruntime in Python: "
                  f"**{ratio:.2f}x, {verdict}.**"]
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--folder", help="an existing web-demo build (default: build one in a temporary folder)")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--child", choices=ENGINES[1:], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, Path(args.folder), int(args.threads), args.steps)
    from edgetune.web.demo import build
    from edgetune.web.serve import address, make_server, start_in_thread

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder) if args.folder else build(Path(tmp) / "site", SCHEME, SIZE, BATCH)
        write_batch(folder)
        server = make_server(folder)
        start_in_thread(server)
        rows = measure(folder, address(server), [int(t) for t in args.threads.split(",")], args.rounds, args.steps)
        server.shutdown()
    (ROOT / "bench" / "results-web.json").write_text(json.dumps(rows, indent=1))
    text = section(rows, args.rounds, args.steps)
    print(text)
    sections.replace_section(Path(args.out), text, BEGIN, END)


if __name__ == "__main__":
    main()
