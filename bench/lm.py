"""Language-model benchmark: edgetune against PyTorch and PEFT on SmolLM2-135M (issue 5, item 6).

    python -m bench.lm                                   # every engine, 10 timed steps
    python -m bench.lm --steps 5 --engines peft-lora,edgetune-sparse
    python -m bench.lm --tiny --steps 2                  # tiny random Llama: development, smoke tests
    python -m bench.lm --render                          # measure nothing: rewrite the section from --json

Each engine runs twice, each time in a fresh subprocess (bench/lm_one.py): once for peak memory
(with MALLOC_MMAP_THRESHOLD_=65536), one engine after another; then once for step time (without
it), all engines set up side by side and timed in turns of a few steps (bench/interleave.py).
Prints a table, writes the raw results (--json, default bench/results/lm.json) and replaces
the LM section of --out (default BENCHMARKS.md) between the markers below, appending it where
they are absent; the rest of that file is left as it was. With --tiny the defaults are
bench/results/lm-tiny.json and no markdown file, so development runs never overwrite the real
numbers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

from bench import sections
from bench.child import run_child
from bench.interleave import STEPS_PER_TURN, Server, time_in_turns
from bench.lm_one import ENGINES, EDGETUNE_LORA, LORA_ALPHA, LORA_RANK, LORA_TARGETS, LR, SPARSE_BLOCKS, WARMUP

ROOT = Path(__file__).resolve().parent.parent
MB = 2 ** 20
BEGIN, END = sections.LM_BEGIN, sections.LM_END
REFERENCE = "peft-lora"
TRAINING = [e for e in ENGINES if e != "forward"]


# -- running ------------------------------------------------------------------------------------

def engine_cmd(engine: str, mode: str, args) -> list[str]:
    cmd = [sys.executable, "-m", "bench.lm_one", "--engine", engine, "--mode", mode, "--steps", str(args.steps),
           "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]
    return cmd + (["--tiny"] if args.tiny else [])


def engine_env(args) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}


def run_all(args) -> dict[str, dict]:
    """Each engine's peak memory in a process of its own, one after another; then the step
    times of all of them in turns (bench/interleave.py), so that the machine's load changes
    slow every engine alike."""
    results = {}
    for i, engine in enumerate(args.engines, 1):
        t0 = time.perf_counter()
        results[engine] = {"memory": run_child(engine_cmd(engine, "memory", args), "memory", engine_env(args),
                                               args.timeout)}
        print(f"[{i}/{len(args.engines)}] {engine}: {memory_line(results[engine]['memory'])} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    t0 = time.perf_counter()

    def start(engine: str, threads: int, env: dict, timeout: float) -> Server:
        return Server(engine_cmd(engine, "serve", args), env, timeout)

    for engine, timed in zip(args.engines, time_in_turns(args.engines, args.threads, args.steps, engine_env(args),
                                                         args.timeout, start=start)):
        if timed["ok"]:
            timed["tokens_per_s"] = timed["tokens"] / timed["median_s"]
        results[engine]["time"] = timed
        print(f"time, in turns: {engine}: {time_line(timed)}", file=sys.stderr)
    print(f"({time.perf_counter() - t0:.0f} s for the timed turns)", file=sys.stderr)
    return results


def memory_line(m: dict) -> str:
    return f"{m['peak_bytes'] / MB:.0f} MB" if m["ok"] else f"memory n/a ({m['error']})"


def time_line(t: dict) -> str:
    return f"{t['tokens_per_s']:.0f} tok/s" if t["ok"] else f"time n/a ({t['error']})"


# -- numbers ---------------------------------------------------------------------------------------

def value(results: dict, engine: str, mode: str, key: str):
    r = results.get(engine, {}).get(mode)
    return r[key] if r and r.get("ok") and r.get(key) is not None else None


def step1_loss(results: dict, engine: str):
    """The loss of the first step (before any update), from the time run, else the memory run."""
    for mode in ("time", "memory"):
        losses = value(results, engine, mode, "losses")
        if losses:
            return losses[0]
    return None


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def goals(results: dict) -> list[tuple[str, str, bool | None]]:
    """(goal, measured, met) from the issue, met None where an engine has no number."""
    tps = lambda e: value(results, e, "time", "tokens_per_s")  # noqa: E731
    peak = lambda e: value(results, e, "memory", "peak_bytes")  # noqa: E731
    checks = [
        ("edgetune-sparse tok/s >= 1.45x PEFT LoRA", ratio(tps("edgetune-sparse"), tps(REFERENCE)), "{:.2f}x",
         lambda r: r >= 1.45),
        ("edgetune-sparse tok/s >= eager-sparse (same scheme)", ratio(tps("edgetune-sparse"), tps("eager-sparse")),
         "{:.2f}x", lambda r: r >= 1.0),
        ("edgetune-sparse peak <= 0.5x PEFT LoRA", ratio(peak("edgetune-sparse"), peak(REFERENCE)), "{:.2f}x",
         lambda r: r <= 0.5),
        ("edgetune-lora peak < PEFT LoRA (item 3)", ratio(peak("edgetune-lora"), peak(REFERENCE)), "{:.2f}x",
         lambda r: r < 1.0),
    ]
    return [(text, "n/a" if r is None else fmt.format(r), None if r is None else test(r))
            for text, r, fmt, test in checks]


def loss_spread(results: dict) -> str:
    """How far the step-1 losses of the engines that ran lie apart (they should agree)."""
    losses = {e: step1_loss(results, e) for e in results}
    losses = {e: v for e, v in losses.items() if v is not None}
    if len(losses) < 2:
        return "fewer than two engines reported a step-1 loss"
    spread = max(losses.values()) - min(losses.values())
    return (f"step-1 losses of {len(losses)} engines lie within {spread:.2e} of each other "
            f"(relative {spread / abs(statistics.median(losses.values())):.1e})")


# -- the report ----------------------------------------------------------------------------------------

def fmt(v, spec: str = "{:.0f}", scale: float = 1.0) -> str:
    return "—" if v is None else spec.format(v * scale)


def table(results: dict) -> tuple[list[str], list[str]]:
    """Markdown rows and the footnotes of engines that failed."""
    head = ["engine", "tok/s", "× PEFT LoRA", "peak MB above model", "× PEFT LoRA", "step-1 loss",
            "median step ms (CPU ms)", "setup s", "trained entries"]
    rows, notes = [row(head), row(["---"] * len(head))], []
    for engine, r in results.items():
        failed = [f"{mode}: {r[mode]['error']}" for mode in ("time", "memory") if not r[mode]["ok"]]
        name = engine
        if failed:
            notes.append(f"{engine}: " + "; ".join(failed))
            name += f" [^{len(notes)}]"
        tps, peak = value(results, engine, "time", "tokens_per_s"), value(results, engine, "memory", "peak_bytes")
        step = value(results, engine, "time", "median_s")
        cpu = value(results, engine, "time", "cpu_median_s")
        trained = value(results, engine, "memory", "trainable_params") or value(results, engine, "time",
                                                                                 "trainable_params")
        rows.append(row([
            name, fmt(tps), fmt(ratio(tps, value(results, REFERENCE, "time", "tokens_per_s")), "{:.2f}"),
            fmt(peak, "{:.0f}", 1 / MB), fmt(ratio(peak, value(results, REFERENCE, "memory", "peak_bytes")), "{:.2f}"),
            fmt(step1_loss(results, engine), "{:.4f}"),
            "—" if step is None else f"{step * 1e3:.0f} ({cpu * 1e3:.0f})",
            fmt(value(results, engine, "memory", "setup_s"), "{:.1f}"),
            "—" if trained is None else f"{trained:,}"]))
    return rows, notes


def row(cols: list[str]) -> str:
    return "| " + " | ".join(cols) + " |"


def compile_child(results: dict) -> str:
    peaks = [f"{e} {max(v, 0) / MB:.0f} MB" for e in results
             if e.startswith("edgetune") and (v := value(results, e, "memory", "child_peak_bytes")) is not None]
    return ", ".join(peaks) if peaks else "not seen (no child peaked above the earlier ones)"


def predicted(results: dict) -> str:
    peaks = [f"{e} {v / MB:.0f} MB" for e in results
             if (v := value(results, e, "memory", "predicted_peak_bytes")) is not None]
    return ", ".join(peaks) if peaks else "none"


def loads(results: dict) -> str:
    ls = [r["time"][k] for r in results.values() if r["time"]["ok"] for k in ("load_before", "load_after")]
    return f"{min(ls):.1f}–{max(ls):.1f}" if ls else "?"


def section(results: dict, env: dict) -> str:
    rows, notes = table(results)
    model = ("tiny random HF Llama (`tiny_causal_lm('llama')`)" if env["tiny"] else
             "SmolLM2-135M-Instruct (`load_causal_lm('smollm2-135m')`, GGUF Q4_1 dequantized to fp32)")
    lines = [
        BEGIN, f"## Language models: {'tiny random Llama' if env['tiny'] else 'SmolLM2-135M'} (`python -m bench.lm`)", "",
        f"Generated by `{env['command']}` on {env['date']}; {env['cpu']}, {env['cores']} cores; "
        f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}; "
        f"edgetune/ as of commit {env['revision']}; {env['threads']} intra-op thread(s); "
        f"the run took {env['runtime_s'] / 60:.1f} min; 1-minute load average {loads(results)} around the timed runs "
        "(other jobs may have shared the machine, so step times are noisier than peaks).", "",
        f"Model: {model}, fp32, eval() mode (no dropout), no KV cache. Batch {env['batch']} × {env['seq']} "
        "random token ids (seeded, the same for every engine), full attention mask, labels = ids, next-token "
        f"cross-entropy (`causal_lm_loss`). AdamW lr {LR:g}, weight decay 0.", "",
        *rows, "",
        "Engines: **eager-full** = PyTorch `loss.backward()` + `torch.optim.AdamW` on every parameter; "
        f"**peft-lora** = PEFT `get_peft_model` with LoRA r={LORA_RANK}, alpha {LORA_ALPHA}, dropout 0 on "
        f"{'/'.join(LORA_TARGETS)}, AdamW on the adapters; **eager-sparse** = PyTorch with the sparse scheme "
        "(`requires_grad` only on its parameters, partial weights' gradients multiplied by edgetune's channel "
        "mask before AdamW, so the same entries change); **edgetune-sparse** = `edgetune.compile` with the "
        f"sparse scheme; **edgetune-lora** = `edgetune.compile` with `{json.dumps(EDGETUNE_LORA)}` (the "
        "same adapters as PEFT's); **forward** = forward + loss under `torch.no_grad()`, the floor. Sparse scheme: in "
        f"each of the last {SPARSE_BLOCKS} blocks (24–29 of SmolLM2's 30), `self_attn.q_proj.weight` at 1/2 of its input "
        "channels (chosen by magnitude), `self_attn.v_proj.weight` full, `mlp.up_proj.weight` at 1/4, "
        "`input_layernorm.weight` and `post_attention_layernorm.weight` full.", "",
        f"**tok/s** = {env['batch']}·{env['seq']} tokens / the median wall time of {env['steps']} steps after "
        f"{WARMUP} warm-ups, each engine in a fresh process without `MALLOC_MMAP_THRESHOLD_`, all set up side by "
        f"side and timed in turns of {STEPS_PER_TURN} steps (`bench/interleave.py`), so that a busy spell of the "
        "machine slows every engine alike (in parentheses in the step column: the median CPU time of the "
        "process). **peak MB above model**: a second fresh process with "
        "`MALLOC_MMAP_THRESHOLD_=65536` loads the model and builds the batch (libraries torch, transformers, "
        "peft, edgetune imported before), returns free heap to the OS (`malloc_trim`), resets VmHWM, then runs "
        f"setup (PEFT wrapping / edgetune compile / optimizer creation) + {WARMUP} warm-ups + {env['steps']} "
        "steps and reports VmHWM minus the RSS at the reset. Included: activations, gradients, optimizer "
        "state, adapters, edgetune's plan and buffers, modules imported on first use (torch.optim's first "
        "step imports torch._dynamo), allocator slack. Not included: the model's weights and the batch "
        "(before the reset), and edgetune's compile, which runs in a forked child whose peak RSS above the "
        f"same baseline was: {compile_child(results)}. edgetune's own prediction of a step "
        f"(`report().predicted_peak_bytes`): {predicted(results)}. MB = 2^20 bytes. **step-1 loss** is the loss of the "
        f"first step, before any update: every engine should agree ({loss_spread(results)}).", "",
        "Goals (issue 5), computed from the table:", "",
        *[f"- {text}: {measured} — **{'met' if met else 'missed' if met is not None else 'not measured'}**"
          for text, measured, met in goals(results)],
    ]
    if notes:
        lines += [""] + [f"[^{i}]: {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines + ["", END]) + "\n"


def replace_section(path: Path, text: str) -> None:
    """Put `text` between the LM section's markers of `path`, or append it."""
    sections.replace_section(path, text, BEGIN, END)


def console_table(results: dict) -> str:
    rows, notes = table(results)
    return "\n".join(rows + [""] + [f"[^{i}]: {n}" for i, n in enumerate(notes, 1)]
                     + [f"{t}: {m} ({'met' if ok else 'missed' if ok is not None else 'n/a'})"
                        for t, m, ok in goals(results)] + [loss_spread(results)])


# -- environment ---------------------------------------------------------------------------------------

def environment(args, started: float) -> dict:
    return {"command": shlex.join(["python", "-m", "bench.lm", *args.argv]),
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "cpu": sections.cpu_model(),
            "cores": os.cpu_count(), "python": platform.python_version(), "revision": sections.edgetune_revision(),
            **{lib: _version(lib) for lib in ("torch", "transformers", "peft")},
            "threads": args.threads, "steps": args.steps, "batch": args.batch, "seq": args.seq, "tiny": args.tiny,
            "runtime_s": time.perf_counter() - started}


def _version(lib: str) -> str:
    try:
        return metadata.version(lib)
    except metadata.PackageNotFoundError:
        return "not installed"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.lm", description=__doc__.splitlines()[0])
    p.add_argument("--engines", type=lambda s: [e for e in s.split(",") if e], default=list(ENGINES),
                   help=f"comma-separated subset of {list(ENGINES)}")
    p.add_argument("--steps", type=int, default=10, help="timed steps per engine (median reported)")
    p.add_argument("--tiny", action="store_true", help="tiny random Llama (development, smoke tests)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, help="tokens per sequence (default 128; 32 with --tiny)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of every engine")
    p.add_argument("--timeout", type=int, default=300, help="seconds before an engine's subprocess counts as n/a")
    p.add_argument("--out", help="markdown file whose LM section to write ('' for none; "
                                 "default BENCHMARKS.md, none with --tiny)")
    p.add_argument("--json", help="raw results (default bench/results/lm.json, lm-tiny.json with --tiny)")
    p.add_argument("--render", action="store_true", help="measure nothing: rewrite --out from --json")
    args = p.parse_args(argv)
    bad = set(args.engines) - set(ENGINES)
    if bad:
        p.error(f"unknown engines: {sorted(bad)}; known: {list(ENGINES)}")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.seq = args.seq or (32 if args.tiny else 128)
    args.json = Path(args.json or ROOT / "bench" / "results" / ("lm-tiny.json" if args.tiny else "lm.json"))
    if args.out is None:
        args.out = "" if args.tiny else str(ROOT / "BENCHMARKS.md")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.render:
        saved = json.loads(args.json.read_text())
        results, env = saved["results"], saved["environment"]
    else:
        started = time.perf_counter()
        print(f"{len(args.engines)} engines: a memory process each, then their steps timed in turns", file=sys.stderr)
        results = run_all(args)
        env = environment(args, started)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env, "results": results}, indent=1) + "\n")
    print(console_table(results))
    if args.out:
        replace_section(Path(args.out), section(results, env))
    print(f"wrote {args.json}" + (f" and the LM section of {args.out}" if args.out else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
