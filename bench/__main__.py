"""Side-by-side benchmark of edgetune against PyTorch eager, torch.compile and a forward floor.

    python -m bench                  # quick: MobileNetV2 at batch 8 (+ batch 1 for two schemes)
    python -m bench --models resnet  # the same quick selection for other models
    python -m bench --full           # every model x scheme x batch x engine
    python -m bench --full --models vit --schemes tte,bias-only --batches 8
    python -m bench --engines eager,edgetune,edgetune-ort,edgetune-auto  # edgetune's other backends (opt-in)

    python -m bench --threads 1      # step times at one thread only (default: 1 and torch's default)

Each engine x configuration runs in fresh subprocesses (bench/run_one.py): one for peak memory
(with MALLOC_MMAP_THRESHOLD_=65536), then one per thread count for step time (without it), the
engines of a model and batch timed in turns (bench/interleave.py).
Writes a markdown report (--out, default BENCHMARKS.md) and the raw results (--json).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import configs
from bench.child import run_child
from bench.sections import LM_BEGIN, compared, cpu_model, edgetune_revision, time_modes
from bench.configs import Config
from bench.goals import goals_section
from bench.interleave import STEPS_PER_TURN, time_in_turns

ROOT = Path(__file__).resolve().parent.parent
MB = 2 ** 20


# -- running ------------------------------------------------------------------------------------

def write_report(path: Path, text: str) -> None:
    """The vision report replaces the file up to the LM benchmark's marked section, which
    bench/lm.py writes, and keeps that section and whatever follows it (notes by hand)."""
    old = path.read_text() if path.exists() else ""
    if LM_BEGIN in old:
        text = text.rstrip("\n") + "\n\n" + old[old.index(LM_BEGIN):]
    path.write_text(text)


def run_memory(config: Config, args, env: dict) -> dict:
    """One subprocess; its JSON result, or {"ok": False, "error": ...} if it failed or hung."""
    cmd = [sys.executable, "-m", "bench.run_one", *config.argv(), "--mode", "memory", "--threads", str(args.threads[0])]
    return run_child(cmd, "memory", {**env, "OMP_NUM_THREADS": str(args.threads[0])}, args.timeout)


def run_all(selected: list[Config], args) -> list[dict]:
    """Peak memory of each configuration in a process of its own (at the first thread count);
    then step times at each thread count, every engine of a model and batch in turns
    (bench/interleave.py)."""
    # A fresh Inductor cache per invocation: torch.compile's setup time is then a cold compile
    # in the memory run (which runs first) and a cache hit in the time runs, whatever ran before.
    cache = tempfile.mkdtemp(prefix="edgetune-bench-inductor-")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    rows = [{"config": vars(c), "time_by_threads": {}} for c in selected]
    try:
        for n, row in enumerate(rows, 1):
            t0 = time.perf_counter()
            row["memory"] = run_memory(Config(**row["config"]), args, env)
            print(f"[{n}/{len(rows)}] memory: {memory_line(row)} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        for group in model_batch_groups(rows):
            for threads in args.threads:
                t0 = time.perf_counter()
                times = time_in_turns([Config(**r["config"]) for r in group], threads, args.steps,
                                      {**env, "OMP_NUM_THREADS": str(threads)}, args.timeout)
                for row, result in zip(group, times):
                    row["time_by_threads"][str(threads)] = result
                c = group[0]["config"]
                print(f"time, {c['model']} b{c['batch']}, {threads} thread(s), {len(group)} engines in turns "
                      f"({time.perf_counter() - t0:.0f} s): " + "; ".join(time_line(r, threads) for r in group),
                      file=sys.stderr)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    for row in rows:
        row["time"] = row["time_by_threads"][str(args.threads[0])]
    return rows


def model_batch_groups(rows: list[dict]) -> list[list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["config"]["model"], r["config"]["batch"]), []).append(r)
    return list(groups.values())


def memory_line(row: dict) -> str:
    c, m = row["config"], row["memory"]
    mem = f"{m['peak_bytes'] / MB:.1f} MB" if m["ok"] else f"n/a ({m['error']})"
    return f"{c['model']} b{c['batch']} {c['scheme']} {c['engine']}: {mem}"


def time_line(row: dict, threads: int) -> str:
    c, t = row["config"], row["time_by_threads"][str(threads)]
    return f"{c['scheme']} {c['engine']} " + (f"{t['median_s'] * 1e3:.1f} ms" if t["ok"] else f"n/a ({t['error']})")


# -- selecting ------------------------------------------------------------------------------------

def select(args) -> list[Config]:
    # Opt-in engines (edgetune's onnxruntime and auto backends) run only where --engines names them.
    extra = [e for e in configs.OPT_IN_ENGINES if e in (args.engines or [])]
    chosen = (configs.expand(list(configs.MODELS), configs.SCHEMES, configs.BATCHES, configs.ENGINES + extra)
              if args.full else configs.quick(args.models or ["mobilenetv2"], extra))
    keep = lambda value, allowed: allowed is None or value in allowed  # noqa: E731
    return [c for c in chosen
            if keep(c.model, args.models) and keep(c.batch, args.batches) and keep(c.engine, args.engines)
            and (c.scheme == "-" or keep(c.scheme, args.schemes))]


def csv(kind=str):
    return lambda text: [kind(v) for v in text.split(",") if v]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="every model, scheme, batch and engine")
    p.add_argument("--models", type=csv(), help=f"comma-separated subset of {list(configs.MODELS)}")
    p.add_argument("--schemes", type=csv(), help=f"comma-separated subset of {configs.SCHEMES}")
    p.add_argument("--batches", type=csv(int), help=f"comma-separated subset of {configs.BATCHES}")
    p.add_argument("--engines", type=csv(), help=f"comma-separated subset of {configs.ALL_ENGINES}; {configs.OPT_IN_ENGINES} (edgetune's onnxruntime "
                   "and auto backends) run only when named here")
    p.add_argument("--steps", type=int, default=12, help="timed steps per configuration and thread count "
                   "(median reported)")
    # One thread, and torch's default: users run with the default, while one thread shows each
    # engine's own work (its CPU time) through the load of a shared machine.
    p.add_argument("--threads", type=csv(int), default=sorted({1, torch.get_num_threads()}),
                   help="comma-separated intra-op thread counts; step times are measured at each, peak "
                   "memory at the first (default: 1 and torch's default here)")
    p.add_argument("--timeout", type=int, default=600, help="seconds before a subprocess counts as n/a")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--json", default=str(ROOT / "bench" / "results.json"),
                   help="raw results (with --render: several comma-separated files are rendered together)")
    p.add_argument("--render", action="store_true", help="measure nothing: rewrite --out from the results in --json")
    args = p.parse_args(argv)
    for name, known in [("models", configs.MODELS), ("schemes", configs.SCHEMES), ("engines", configs.ALL_ENGINES)]:
        bad = set(getattr(args, name) or []) - set(known)
        if bad:
            p.error(f"unknown {name}: {sorted(bad)}; known: {list(known)}")
    if not args.threads or min(args.threads) < 1 or args.steps < 1:
        p.error("--threads needs at least one count of 1 or more, and --steps at least 1")
    return args


# -- environment ----------------------------------------------------------------------------------

def environment(started: float, load_start: tuple, revision: str, args) -> dict:
    end = edgetune_revision()
    return {"command": shlex.join(["python", "-m", "bench", *sys.argv[1:]]),
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "revision": revision if end == revision else f"{revision}, changed to {end} during the run",
            "cpu": cpu_model(),
            "cores": os.cpu_count(), "torch": torch.__version__, "threads": args.threads,
            "default_threads": torch.get_num_threads(),
            "python": platform.python_version(), "runtime_s": time.perf_counter() - started,
            "load_start": load_start, "load_end": os.getloadavg()}


def merged_environment(envs: list[dict]) -> dict:
    """One description of several runs rendered together (`--render --json A,B`)."""
    if len(envs) == 1:
        return envs[0]
    join = lambda key: "; ".join(dict.fromkeys(str(e[key]) for e in envs))  # noqa: E731
    return {**envs[0], "command": "`, then `".join(e["command"] for e in envs), "date": join("date"),
            "revision": join("revision"), "runtime_s": sum(e["runtime_s"] for e in envs),
            "load_end": envs[-1]["load_end"]}


# -- the report -----------------------------------------------------------------------------------

class Cells:
    """Looks up results by (model, scheme, batch, engine) and formats them, collecting n/a reasons."""

    def __init__(self, results: list[dict]):
        self.by_key = {}
        for r in results:
            c = r["config"]
            self.by_key[(c["model"], c["scheme"], c["batch"], c["engine"])] = r
        self.notes: list[str] = []

    def get(self, model, scheme, batch, engine, mode):
        """mode: "memory", "time" (at the run's first thread count) or "time@N" (at N threads)."""
        r = self.by_key.get((model, "-" if engine in configs.SCHEME_FREE else scheme, batch, engine))
        if r is None:
            return None
        if mode.startswith("time@"):
            return r.get("time_by_threads", {}).get(mode.removeprefix("time@"))
        return r[mode]

    def value(self, model, scheme, batch, engine, mode, key):
        r = self.get(model, scheme, batch, engine, mode)
        return r[key] if r and r["ok"] else None

    def text(self, model, scheme, batch, engine, mode, key, scale, fmt="{:.1f}"):
        r = self.get(model, scheme, batch, engine, mode)
        if r is None:
            return "—"
        if not r["ok"]:
            return self.na(f"{engine}, {model} {scheme} b{batch}: {r['error']}")
        return fmt.format(r[key] * scale)

    def na(self, reason: str) -> str:
        if reason not in self.notes:
            self.notes.append(reason)
        return f"n/a[^{self.notes.index(reason) + 1}]"


def mb(n) -> str:
    return "—" if n is None else f"{n / MB:.1f}"


def ratio(a, b) -> str:
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def rows(cells: Cells, model: str):
    """(scheme, batch) pairs that have any scheme-dependent result, batch-major; ("-", batch)
    where only scheme-free engines ran at that batch."""
    for batch in configs.BATCHES:
        schemes = [s for s in configs.SCHEMES if any((model, s, batch, e) in cells.by_key for e in configs.ALL_ENGINES)]
        if not schemes and any((model, "-", batch, e) in cells.by_key for e in configs.SCHEME_FREE):
            schemes = ["-"]
        yield from ((s, batch) for s in schemes)


def columns(cells: Cells) -> list[str]:
    """The default engines, and the opt-in ones that have results."""
    ran = {k[3] for k in cells.by_key}
    return configs.ENGINES + [e for e in configs.OPT_IN_ENGINES if e in ran]


def memory_table(cells: Cells, model: str) -> list[str]:
    engines = columns(cells)
    head = (["scheme", "batch"] + engines
            + ["edgetune / eager", "edgetune / eager-full", "predicted", "measured / predicted",
               "edgetune's compile child"])
    out = [table_row(head), table_row(["---"] * len(head))]
    for scheme, batch in rows(cells, model):
        v = lambda e, k="peak_bytes": cells.value(model, scheme, batch, e, "memory", k)  # noqa: E731
        predicted = v("edgetune", "predicted_peak_bytes")
        out.append(table_row(
            [scheme, str(batch)]
            + [cells.text(model, scheme, batch, e, "memory", "peak_bytes", 1 / MB) for e in engines]
            + [ratio(v("edgetune"), v("eager")), ratio(v("edgetune"), v("eager-full")),
               mb(predicted), ratio(v("edgetune"), predicted), mb(v("edgetune", "child_peak_bytes"))]))
    return out


def step_memory_table(cells: Cells, model: str) -> list[str]:
    """Steps-only peak above the RSS that setup left, with that RSS in parentheses."""
    engines = columns(cells)
    head = ["scheme", "batch"] + engines + ["predicted", "edgetune / predicted"]
    out = [table_row(head), table_row(["---"] * len(head))]
    for scheme, batch in rows(cells, model):
        predicted = cells.value(model, scheme, batch, "edgetune", "memory", "predicted_peak_bytes")
        above = _above(cells.get(model, scheme, batch, "edgetune", "memory"))
        out.append(table_row(
            [scheme, str(batch)] + [step_memory_cell(cells, model, scheme, batch, e) for e in engines]
            + [mb(predicted), ratio(above, predicted)]))
    return out


def step_memory_cell(cells: Cells, model, scheme, batch, engine) -> str:
    r = cells.get(model, scheme, batch, engine, "memory")
    if r is None or not r["ok"]:  # "—" or the same n/a note as the first table
        return cells.text(model, scheme, batch, engine, "memory", "peak_bytes", 1 / MB)
    return f"{mb(_above(r))} ({mb(r['warm_rss_bytes'])})"


def _above(r: dict | None) -> int | None:
    return r["steps_peak_bytes"] - r["warm_rss_bytes"] if r and r["ok"] else None


def time_table(cells: Cells, model: str, mode: str = "time", threads: int | None = None) -> list[str]:
    engines = columns(cells)
    key, kind = compared(threads)
    head = (["scheme", "batch"] + engines
            + [f"edgetune / eager ({kind})", f"edgetune / eager-full ({kind})",
               "setup s: edgetune", "setup s: compile"])
    out = [table_row(head), table_row(["---"] * len(head))]
    for scheme, batch in rows(cells, model):
        v = lambda e: cells.value(model, scheme, batch, e, mode, key)  # noqa: E731
        setup = lambda e: cells.text(model, scheme, batch, e, "memory", "setup_s", 1)  # noqa: E731
        out.append(table_row(
            [scheme, str(batch)] + [time_cell(cells, model, scheme, batch, e, mode) for e in engines]
            + [ratio(v("edgetune"), v("eager")), ratio(v("edgetune"), v("eager-full")),
               setup("edgetune"), setup("compile")]))
    return out


def time_cell(cells: Cells, model, scheme, batch, engine, mode: str = "time") -> str:
    """'wall (CPU)' in ms."""
    wall = cells.text(model, scheme, batch, engine, mode, "median_s", 1e3)
    cpu = cells.value(model, scheme, batch, engine, mode, "cpu_median_s")
    return wall if cpu is None else f"{wall} ({cpu * 1e3:.1f})"


def table_row(cols: list[str]) -> str:
    return "| " + " | ".join(cols) + " |"


def loads(results: list[dict]) -> list[float]:
    timed = [t for r in results for t in (r.get("time_by_threads") or {"": r["time"]}).values()]
    return [t[k] for t in timed if t["ok"] for k in ("load_before", "load_after")]


def modules_summary(results: list[dict]) -> str:
    """'eager 818, edgetune 2, ...': modules each engine's setup and first step imported."""
    counts: dict[str, set] = {}
    for r in results:
        if r["memory"]["ok"]:
            counts.setdefault(r["config"]["engine"], set()).add(r["memory"]["modules_imported"])
    text = ", ".join(f"{e} {min(c)}" + (f"–{max(c)}" if len(c) > 1 else "") for e, c in counts.items())
    return (f"setup and the first step imported {text} modules (torch.optim's first step loads "
            "torch._dynamo; torch.compile loads Inductor)")


def method(env: dict, results: list[dict], args) -> list[str]:
    ls = loads(results)
    load = (f"{min(ls):.1f}–{max(ls):.1f} (1-minute load average around the timed runs; "
            f"{env['load_start'][0]:.1f} at the start, {env['load_end'][0]:.1f} at the end)") if ls else "?"
    return [
        "## Method", "",
        f"- Machine: {env['cpu']}, {env['cores']} cores; torch {env['torch']}; Python {env['python']}. "
        f"Intra-op threads in every engine: {thread_counts(env)} (`--threads`; torch's default here is "
        f"{env['default_threads']}). "
        f"Run on {env['date']}, edgetune/ as of commit {env['revision']}; the whole run took "
        f"{env['runtime_s'] / 60:.1f} min.",
        f"- Load: {load}. Other jobs shared the machine, so step times are noisier than the memory "
        "figures; the raw per-step times are in `bench/results.json`.",
        "- Every engine x configuration runs in its own subprocess (`bench/run_one.py`): "
        "**peak memory** with `MALLOC_MMAP_THRESHOLD_=65536` (freed activations go back to the OS, so the "
        "high-water mark follows live memory): build the model and batch, reset VmHWM (`5` to "
        "`/proc/self/clear_refs`), read it, then setup (compile / optimizer) + 1 warm-up + 5 steps, read "
        "VmHWM again; the table shows the difference. Python modules that an engine imports on its first "
        f"use count like any other memory: {modules_summary(results)}; it is measured at the first thread "
        "count. " + step_time_method(results, args),
        "- Engines: **edgetune** = `edgetune.compile` with the scheme; **eager** = PyTorch eager on the same "
        "scheme (`requires_grad` only on trained parameters; partially trained weights get their gradient "
        "multiplied by a channel mask after backward, channels chosen by edgetune's own rule); "
        "**eager-full** = eager full backprop; **compile** = the eager step with `torch.compile` "
        "(Inductor) over forward + loss, whose backward AOTAutograd compiles too, optimizer eager; "
        "**forward** = forward + loss under `torch.no_grad()`, the floor for any step. All training uses "
        f"SGD lr {configs.LR}, momentum {configs.MOMENTUM}.",
        f"- Inputs: random normal {configs.IMAGE_SIZE}x{configs.IMAGE_SIZE} images, random integer targets "
        f"({configs.NUM_CLASSES} classes), models in eval mode (running BN statistics, no dropout), "
        "cross-entropy loss.",
        "- **predicted** is edgetune's `report().predicted_peak_bytes` (activations, gradients and optimizer "
        "state of one step; parameters, buffers and the batch excluded); **measured / predicted** divides "
        "the measured edgetune peak by it. **edgetune's compile child**: edgetune compiles in a forked "
        "child process (unless `EDGETUNE_COMPILE_IN_PROCESS=1`), whose memory VmHWM of the training "
        "process does not see; this column is that child's peak RSS (`getrusage(RUSAGE_CHILDREN)`) minus "
        "the same baseline. The fork starts out sharing the parent's pages, so this approximates what "
        "the machine held above the loaded model while compiling; the larger of it and the edgetune "
        "column is edgetune's peak over the whole run. torch.compile's Inductor compile workers are "
        "separate processes too and are not counted anywhere here.",
        "- The second memory table splits that peak: RSS above the baseline once setup and the warm-up "
        "are done (in parentheses: imported modules, what a compiler keeps, optimizer state, touched "
        "library pages), and how far the 5 steps then rose above it (first figure: the memory of a "
        "step itself, the part comparable with the prediction).",
        "- **setup s** is the time from the start of setup through the first step in the memory run, "
        "which for torch.compile is a cold Inductor compile (a fresh cache per `python -m bench` run).",
        "- MB = 2^20 bytes. Ratios < 1 mean edgetune uses less. `—` = not run in this selection"
        + ("." if args.full else "; the quick default leaves torch.compile out at batch 1, where each "
           "configuration would cost another cold Inductor compile of minutes (`--full` runs it)."),
    ]


def thread_counts(env: dict) -> str:
    counts = env["threads"] if isinstance(env["threads"], list) else [env["threads"]]
    return " and ".join(map(str, counts))


def step_time_method(results: list[dict], args) -> str:
    if not any("time_by_threads" in r for r in results):  # a run from before the turns
        return (f"**Step time** in a second subprocess without that variable: setup, 2 warm-ups, then the "
                f"median of {args.steps} steps, as wall time and, in parentheses, CPU time of the process; "
                "the ratios use CPU time.")
    return ("**Step time**, at each thread count, in another subprocess per engine x configuration, "
            "without that variable: setup, 2 warm-ups, then the engines of a model and batch take turns "
            f"(`bench/interleave.py`), {STEPS_PER_TURN} steps each per turn, until each has run {args.steps}: "
            "a busy spell on this shared machine then stretches every engine, not one. The tables show the "
            "median step as wall time and, in parentheses, CPU time of the process. With one thread the "
            "ratios use CPU time, the step's own work (the wall time also holds waits for a core another "
            "job took); with more threads they use wall time, since CPU time then counts every thread.")


def schemes_section() -> list[str]:
    return ["## Schemes", ""] + [f"- **{name}**: {text}" for name, text in configs.SCHEME_NOTES.items()]


def same_entries(results: list[dict]) -> str:
    """Whether edgetune and eager/compile trained the same number of entries in each configuration."""
    counts: dict[tuple, set] = {}
    for r in results:
        c, m = r["config"], r["memory"]
        if c["engine"] in ("edgetune", "eager", "compile", *configs.OPT_IN_ENGINES) and m["ok"]:
            counts.setdefault((c["model"], c["scheme"], c["batch"]), set()).add(m["trainable_params"])
    if not counts:
        return "No edgetune, eager or compile configuration completed, so nothing to compare."
    differ = [f"{k[0]} {k[1]} b{k[2]}: {sorted(v)}" for k, v in counts.items() if len(v) > 1]
    if differ:
        return "Trainable entries DIFFER between engines in: " + "; ".join(differ) + "."
    return (f"edgetune, eager and compile train the same number of parameter entries in all {len(counts)} "
            "configurations that ran (edgetune's `trainable_params`; for eager, the sum of the trained masks).")


def report(results: list[dict], env: dict, args) -> str:
    cells = Cells(results)
    lines = ["# Benchmarks", "",
             f"Generated by `{env['command']}` (see `bench/`). "
             f"Every number below was measured in {'those runs' if '`, then `' in env['command'] else 'that run'}.", ""]
    lines += method(env, results, args) + [""] + schemes_section() + [""]
    for model in configs.MODELS:
        if not any(k[0] == model for k in cells.by_key):
            continue
        lines += [f"## {model}", "", "Peak memory above the loaded model (MB):", ""]
        lines += memory_table(cells, model) + [""]
        lines += ["Peak of the 5 steps above the RSS left after setup + warm-up (that RSS in parentheses), MB:", ""]
        lines += step_memory_table(cells, model) + [""]
        for mode, threads in time_modes(results):
            at = "" if threads is None else f" at {threads} thread{'s' if threads > 1 else ''}"
            lines += [f"Median step time{at}, ms: wall (CPU):", ""] + time_table(cells, model, mode, threads) + [""]
    lines += ["## Checks", "", same_entries(results), ""]
    goals = goals_section(cells)
    if goals:
        lines += ["## Against the goals (MobileNetV2 width 1.0 unless a row names another model, 128x128, "
                  "eval-mode BN, SGD momentum)", "",
                  "Computed from the tables above. Ratios of medians on a shared machine: runs differ "
                  "by 5-15% in step time.", ""] + goals + [""]
    if cells.notes:
        lines += ["## Not measured", ""] + [f"[^{i}]: {n}" for i, n in enumerate(cells.notes, 1)] + [""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.render:
        runs = [json.loads(Path(path).read_text()) for path in args.json.split(",")]
        # The options of the (first) run that measured them, not of this call, describe the results.
        measured = parse_args(shlex.split(runs[0]["environment"]["command"])[3:])
        results = [r for run in runs for r in run["results"]]
        write_report(Path(args.out), report(results, merged_environment([run["environment"] for run in runs]), measured))
        return
    started, load_start, revision = time.perf_counter(), os.getloadavg(), edgetune_revision()
    selected = select(args)
    if not selected:
        sys.exit("nothing selected: check --models/--schemes/--batches/--engines (or add --full)")
    print(f"{len(selected)} configurations; a memory subprocess each, then a timing one per thread count "
          f"{args.threads}", file=sys.stderr)
    results = run_all(selected, args)
    env = environment(started, load_start, revision, args)
    Path(args.json).write_text(json.dumps({"environment": env, "results": results}, indent=1) + "\n")
    write_report(Path(args.out), report(results, env, args))
    print(f"wrote {args.out} and {args.json} in {env['runtime_s'] / 60:.1f} min", file=sys.stderr)


if __name__ == "__main__":
    main()
