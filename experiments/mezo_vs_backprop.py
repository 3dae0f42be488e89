"""MeZO against backprop on the same sparse scheme, centralized: peak memory, steps per second
and held-out loss after equal wall time (issue 14, RESULTS experiment (c)).

    python -m experiments.mezo_vs_backprop              # the measurements and runs, then the section
    python -m experiments.mezo_vs_backprop --report     # only print the section from the results

SmolLM2-135M-Instruct on the ShareGPT subset and split of experiments.lm_quality (up to 1,024
characters, 128 tokens, batch 4, 100 test and 50 validation conversations), scheme
`lm-sparse:6` (the benchmark's) trained two ways: backprop with AdamW (lm_quality's best rate
for this scheme, cosine after 10 warm-up steps) and MeZO (edgetune's zeroth-order SGD: two
forward passes a step, one +-1 direction, eps 1e-3, constant rate as in its paper).

- Memory: each of backprop, MeZO and a plain forward (eager PyTorch, `no_grad`, the same batch:
  the floor for any step) in a fresh process with MALLOC_MMAP_THRESHOLD_=65536, so that freed
  tensors leave the resident set: VmHWM above the loaded model and batch over setup (compile)
  and the steps, and the steps' own peak above what setup left resident.
- Steps/s: all three in one process, in turns (each round runs one of each, the order rotated),
  so that whatever else loads this shared machine hits them alike; medians of the rounds.
- Quality after equal wall time: the wall budget W is what BUDGET_STEPS backprop steps take at
  the median step time measured in turns, and each optimizer gets W / (its own median step
  time) steps. Counting steps from medians measured in turns, rather than stopping runs on a
  clock, keeps the comparison fair when other work slows one run and not the other. MeZO's
  rate is the one of MEZO_LRS with the lowest validation loss after its full run; the test
  loss of that run is the reported one.

Each measurement and run is a fresh process; results go to
experiments/results/mezo_vs_backprop.json after each one (an interrupted sweep resumes).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import time

from edgetune.files import write_json
from experiments.children import load_json, run_child

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_JSON = os.path.join(ROOT, "experiments", "results", "mezo_vs_backprop.json")
TITLE = "## SmolLM2-135M-Instruct -> ShareGPT: MeZO against backprop on the same sparse scheme (issue 14)"

# threads=1: two other jobs share this 2-core machine, and two intra-op threads each spin at their
# barriers against them (a forward pass measured 6.5x slower with 2 threads than with 1 there), as in
# BENCHMARKS.md's MeZO section (--threads 1).
# lm_quality's split and scheme; AdamW at its best rate for lm-sparse:6 (3e-3 of 3e-5..1e-2, 150 steps).
# MeZO's paper tunes 1e-7..1e-5 for all of a model's weights; lm-sparse:6 trains ~3 M entries, 1/45 of
# SmolLM2's, and a direction's variance grows with the entries perturbed, so the grid reaches higher:
# decades first (mezo_lrs), widened by a decade while the best is an edge (at most twice), then the
# best's neighbours at 0.3x and 3x (mezo_lr_rounds).
SETTINGS = dict(model="smollm2-135m", data="sharegpt", max_chars=1024, seq_len=128, batch=4, test=100, val=50,
                seed=0, scheme="lm-sparse:6", adamw_lr=3e-3, warmup=10, mezo_eps=1e-3,
                mezo_lrs=[1e-5, 1e-4, 1e-3], budget_steps=150, timing_rounds=20, timing_warmup=2,
                memory_steps=3, threads=1)
KINDS = ("backprop", "mezo", "forward")
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def split(settings: dict):
    """(model, train, val, test): experiments.lm_quality's split."""
    from experiments.lm_quality import split as lm_quality_split

    return lm_quality_split(settings)


def optimizer(kind: str, lr: float, settings: dict):
    import edgetune as et

    if kind == "backprop":
        return et.AdamW(lr=lr, weight_decay=0.0)
    return et.MeZO(lr=lr, eps=settings["mezo_eps"], seed=settings["seed"])


def trainer_for(kind: str, model, settings: dict, lr: float | None = None):
    """The compiled lm-sparse step of `kind` ("backprop" or "mezo") on `model`."""
    import edgetune as et
    from edgetune.apps.lm import compile_lm

    if lr is None:  # memory and step time do not depend on the rate
        lr = settings["adamw_lr"] if kind == "backprop" else settings["mezo_lrs"][0]
    return compile_lm(model, et.schemes.from_string(settings["scheme"]), settings["batch"], settings["seq_len"],
                      optimizer(kind, lr, settings))


def stepper(kind: str, model, settings: dict):
    """(step(batch) -> loss, facts): a compiled backprop or MeZO step, or the plain forward
    (eager PyTorch, no_grad: the floor for any step)."""
    import torch

    from edgetune.models.hf import causal_lm_loss

    if kind == "forward":
        model.eval()

        def forward(batch) -> float:
            ids, mask, labels = batch
            with torch.no_grad():
                return float(causal_lm_loss(model(input_ids=ids, attention_mask=mask), labels))
        return forward, {}
    trainer = trainer_for(kind, model, settings)
    report = trainer.report()
    return (lambda batch: trainer.step(batch[:2], batch[2:])), {
        "predicted_peak": report.predicted_peak_bytes, "trainable": report.trainable_params}


def first_batch(train, settings: dict):
    """The first training batch of the runs' shuffle."""
    return next(iter(train.batches(settings["batch"], shuffle=True, seed=settings["seed"] + 1, fill=True)))


# -- the children ----------------------------------------------------------------------------

def measure_memory(kind: str, settings: dict) -> dict:
    """In a fresh process started with MALLOC_MMAP_THRESHOLD_=65536: bytes above the loaded model
    and batch over setup and the steps ("peak"), and over the steps alone above what setup left
    resident ("steps_peak"). Library code faulted in on first use (file-backed, clean, shared
    with any other torch process) is left out, as edgetune.apps.measure does."""
    from edgetune.procmem import release_free_heap, reset_hwm, rss_file_bytes, vm_hwm_bytes, vm_rss_bytes

    lm, train, _, _ = split(settings)
    batch = first_batch(train, settings)
    release_free_heap()  # what loading freed must not hide what the step allocates
    reset_hwm()
    base, files = vm_rss_bytes(), rss_file_bytes()
    step, info = stepper(kind, lm.model, settings)
    step(batch)  # the first step: what it allocates once (kernel caches, optimizer state) stays
    setup_peak, warm = vm_hwm_bytes(), vm_rss_bytes()
    reset_hwm()
    for _ in range(settings["memory_steps"]):
        step(batch)
    steps_peak, grown = vm_hwm_bytes(), rss_file_bytes() - files
    return {**info, "kind": kind, "peak": max(setup_peak, steps_peak) - base - grown,
            "steps_peak": steps_peak - base - grown, "warm": warm - base - grown,
            "steps_over_warm": steps_peak - warm, "library_pages": grown,
            "mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}


def time_in_turns(settings: dict) -> dict:
    """Backprop step, MeZO step and forward pass in one process, one of each a round, the order
    rotated every round; each on its own copy of the model, all on the same training batches."""
    lm, train, _, _ = split(settings)
    batches = list(train.batches(settings["batch"], shuffle=True, seed=settings["seed"] + 1, fill=True))
    steps = {}
    for kind in KINDS:  # each on its own copy of the weights: the trainers change theirs
        steps[kind] = stepper(kind, lm.model if kind == "forward" else copy.deepcopy(lm.model), settings)[0]
    n = 0
    for _ in range(settings["timing_warmup"]):
        for step in steps.values():
            step(batches[n % len(batches)])
        n += 1
    seconds: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for r in range(settings["timing_rounds"]):
        batch = batches[n % len(batches)]
        n += 1
        for kind in KINDS[r % 3:] + KINDS[:r % 3]:
            t = time.perf_counter()
            steps[kind](batch)
            seconds[kind].append(time.perf_counter() - t)
    median = {kind: statistics.median(s) for kind, s in seconds.items()}
    return {"median": median, "seconds": seconds, "rounds": settings["timing_rounds"],
            "forward_threads": _threads_check(steps["forward"], batches[0], settings)}


def _threads_check(forward, batch, settings: dict, turns: int = 3) -> dict:
    """The forward pass's median seconds with 1 and with 2 intra-op threads, in turns: why the
    runs use settings["threads"]."""
    import torch

    seconds: dict[str, list[float]] = {"1": [], "2": []}
    for _ in range(turns):
        for n in seconds:
            torch.set_num_threads(int(n))
            t = time.perf_counter()
            forward(batch)
            seconds[n].append(time.perf_counter() - t)
    torch.set_num_threads(settings["threads"])
    return {n: statistics.median(s) for n, s in seconds.items()}


def run_one(kind: str, lr: float, steps: int, settings: dict) -> dict:
    """`steps` steps of one optimizer from the pretrained model; validation and test loss after."""
    from edgetune.apps.lm import adapters_merged, evaluate_lm, finetune_lm

    lm, train, val, test = split(settings)
    trainer = trainer_for(kind, lm.model, settings, lr)
    step, seconds = trainer.step, []

    def timed(inputs, targets):
        t = time.perf_counter()
        loss = step(inputs, targets)
        seconds.append(time.perf_counter() - t)
        return loss

    trainer.step = timed
    schedule = dict(schedule="cosine", warmup=settings["warmup"]) if kind == "backprop" else \
        dict(schedule="constant", warmup=0)
    out = {"kind": kind, "lr": lr, "steps": steps}
    try:
        history = finetune_lm(trainer, train, val, steps=steps, batch_size=settings["batch"], lr=lr,
                              seed=settings["seed"], progress=False, log=lambda _: None,
                              train_eval_size=settings["batch"], **schedule)
    except FloatingPointError as e:  # diverged: a rate too high is a result of the grid, not a crash
        return {**out, "diverged": str(e), "val": None, "test": None}
    with adapters_merged(trainer) as model:
        test_loss = evaluate_lm(model, test)
    return {**out, "val_before": history.evals[0]["loss"], "val": history.evals[-1]["loss"], "test": test_loss,
            "losses": history.losses, "train_loss_first10": _mean(history.losses[:10]),
            "train_loss_last10": _mean(history.losses[-10:]), "training_seconds": sum(seconds),
            "median_step": statistics.median(seconds),
            "examples": {"train": len(train), "val": len(val), "test": len(test)}}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def losses_before(settings: dict) -> dict:
    from edgetune.apps.lm import evaluate_lm

    lm, _, val, test = split(settings)
    return {"val": evaluate_lm(lm.model, val), "test": evaluate_lm(lm.model, test)}


# -- the sweep -------------------------------------------------------------------------------

def sweep(settings: dict) -> dict:
    results = load()
    results.setdefault("meta", {}).update(settings=settings, cpu=platform.processor() or platform.machine(),
                                          commit=_commit())
    if "before" not in results:
        _step("losses before training")
        results["before"] = _child(["--before"])
        _save(results)
    memory = results.setdefault("memory", {})
    for kind in KINDS:
        if kind not in memory:
            _step(f"memory: {kind}")
            with _env(MMAP_ENV):
                memory[kind] = _child(["--memory", kind])
            _save(results)
    if "timing" not in results:
        _step("step times in turns")
        results["timing"] = _child(["--timing"])
        _save(results)
    budget = equal_wall_time(results)
    runs = results.setdefault("runs", {})
    _run(results, "backprop", settings["adamw_lr"], budget)
    for lr in settings["mezo_lrs"]:
        _run(results, "mezo", lr, budget)
    for _ in range(2):  # widen while the best rate is an edge of the grid
        tried, best = sorted(r["lr"] for r in runs.values() if r["kind"] == "mezo"), best_mezo(results)
        if best is None or best["lr"] not in (tried[0], tried[-1]):
            break
        _run(results, "mezo", _round(best["lr"] * (10 if best["lr"] == tried[-1] else 0.1)), budget)
    best = best_mezo(results)
    if best is not None:
        for factor in (0.3, 3):
            _run(results, "mezo", _round(best["lr"] * factor), budget)
    return results


def _round(lr: float) -> float:
    return float(f"{lr:.2g}")


def _run(results: dict, kind: str, lr: float, budget: dict) -> None:
    """One training run in a fresh process, unless the results hold it already."""
    runs, key = results["runs"], f"{kind}@{lr:g}"
    if key in runs:
        return
    _step(f"{key}: {budget['steps'][kind]} steps")
    started = time.perf_counter()
    runs[key] = dict(_child(["--one", kind, "--lr", str(lr), "--steps", str(budget["steps"][kind])]),
                     process_seconds=time.perf_counter() - started)
    results["meta"]["date"] = datetime.date.today().isoformat()
    _save(results)


def equal_wall_time(results: dict) -> dict:
    """The wall budget (BUDGET_STEPS backprop steps at their median time in turns) and the
    steps each optimizer gets in it."""
    s, median = results["meta"]["settings"], results["timing"]["median"]
    wall = s["budget_steps"] * median["backprop"]
    return {"wall": wall, "steps": {kind: max(1, round(wall / median[kind])) for kind in ("backprop", "mezo")}}


@contextlib.contextmanager
def _env(extra: dict):
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _step(what: str) -> None:
    print(f"[mezo_vs_backprop] {what} ...", flush=True)


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True).stdout.strip() or "?"


def _child(args: list[str]):
    return run_child("experiments.mezo_vs_backprop", args)


def load() -> dict:
    return load_json(RESULTS_JSON)


def _save(results: dict) -> None:
    write_json(RESULTS_JSON, results)


# -- the report ------------------------------------------------------------------------------

def best_mezo(results: dict) -> dict | None:
    mezo = [r for r in results.get("runs", {}).values() if r["kind"] == "mezo" and r["val"] is not None]
    return min(mezo, key=lambda r: r["val"]) if mezo else None


def section(results: dict) -> str:
    s, meta = results["meta"]["settings"], results["meta"]
    mem, med = results["memory"], results["timing"]["median"]
    budget = equal_wall_time(results)
    runs = results.get("runs", {})
    bp = next((r for r in runs.values() if r["kind"] == "backprop"), None)
    mz = best_mezo(results)
    mb = lambda b: f"{b / 2**20:.0f} MB"  # noqa: E731
    fwd = mem["forward"]
    examples = next((r["examples"] for r in runs.values() if "examples" in r), None)
    lines = [TITLE, "",
             f"`python -m experiments.mezo_vs_backprop` — `{s['scheme']}` on lm_quality's split "
             + (f"({examples['train']} training, {examples['val']} validation, {examples['test']} test conversations "
                f"of up to {s['max_chars']} characters)" if examples else "")
             + f", batch {s['batch']} x {s['seq_len']} tokens. Backprop = AdamW lr {s['adamw_lr']:g} (lm_quality's "
             f"best for this scheme), cosine after {s['warmup']} warm-up steps; MeZO = edgetune's zeroth-order SGD, "
             f"one +-1 direction a step (two forward passes), eps {s['mezo_eps']:g}, constant rate chosen on the "
             f"validation split; forward = eager PyTorch forward + loss under `no_grad` on the same batch, the "
             f"benchmarks' floor for any step. Peaks: each in a fresh process with MALLOC_MMAP_THRESHOLD_=65536, "
             f"VmHWM above the loaded model and batch over setup and {s['memory_steps'] + 1} steps (library code "
             f"pages left out); held = resident after setup and one step, rise = the later steps' peak above it. "
             f"Step times: the three in one process taking turns, {results['timing']['rounds']} rounds, medians. "
             f"Every process runs {s['threads']} intra-op thread" + ("s" if s["threads"] > 1 else "")
             + _threads_note(results) + "."
             f" Equal wall time: the budget is what {s['budget_steps']} backprop steps take at their median "
             f"({budget['wall']:.0f} s here), and each optimizer gets that budget / its own median step time in "
             f"steps (counted, not clocked, so that other work on this shared 2-core machine, which slows single "
             f"runs for minutes, cannot favour either). {meta.get('date', '?')}, {meta['cpu']}, commit "
             f"{meta['commit']}.", "",
             "| | peak above model | held | rise | peak / forward's | predicted peak | median step | "
             "steps/s / forward's | steps in the budget | lr | validation loss | test loss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for kind, run in (("backprop", bp), ("mezo", mz), ("forward", None)):
        m = mem[kind]
        cols = [mb(m["steps_peak"]), mb(m["warm"]), mb(m["steps_over_warm"]),
                f"{m['steps_peak'] / fwd['steps_peak']:.2f}x",
                mb(m["predicted_peak"]) if "predicted_peak" in m else "-", f"{med[kind]:.3f} s",
                f"{med['forward'] / med[kind]:.2f}x"]
        if kind == "forward":
            cols += ["-", "-", f"{results['before']['val']:.4f}", f"{results['before']['test']:.4f} (pretrained)"]
        elif run is None:
            cols += [str(budget["steps"][kind]), "-", "-", "-"]
        else:
            cols += [str(run["steps"]), f"{run['lr']:g}", f"{run['val']:.4f}", f"{run['test']:.4f}"]
        name = {"backprop": "backprop (AdamW)", "mezo": "MeZO", "forward": "forward only"}[kind]
        lines.append(f"| {name} | " + " | ".join(cols) + " |")
    lines += ["", *_conclusions(results, bp, mz)]
    return "\n".join(lines)


def _threads_note(results: dict) -> str:
    check = results["timing"].get("forward_threads")
    if not check:
        return ""
    return (f" (other jobs shared the 2 cores: in turns, a forward pass took {check['2']:.2f} s with 2 threads "
            f"and {check['1']:.2f} s with 1)")


def _conclusions(results: dict, bp: dict | None, mz: dict | None) -> list[str]:
    mem, med, before = results["memory"], results["timing"]["median"], results["before"]["test"]
    fwd = mem["forward"]
    out = []
    mz_peak = mem["mezo"]["steps_peak"] / fwd["steps_peak"]
    bpm, mzm = mem["backprop"], mem["mezo"]
    out.append(f"- **Memory.** MeZO's step peaks at {mz_peak:.2f}x the forward floor (goal <= 1.1x: "
               f"**{'met' if mz_peak <= 1.1 else 'missed'}**), backprop's at {bpm['steps_peak'] / fwd['steps_peak']:.2f}x; "
               f"MeZO needs {bpm['steps_peak'] / mzm['steps_peak']:.1f}x less than backprop on the same scheme "
               f"({(bpm['steps_peak'] - mzm['steps_peak']) / 2**20:.0f} MB less): backprop holds "
               f"{bpm['warm'] / 2**20:.0f} MB between steps (AdamW's two moments of {bpm['trainable'] / 1e6:.2f} M "
               f"entries alone are {8 * bpm['trainable'] / 2**20:.0f} MB) and rises {bpm['steps_over_warm'] / 2**20:.0f} MB "
               f"in a step (what the sparse backward keeps, gradients); MeZO holds {mzm['warm'] / 2**20:.0f} MB and "
               f"rises {mzm['steps_over_warm'] / 2**20:.0f} MB. "
               + ("Both compiled steps peak below eager's forward, which materialises the full logits (batch x "
                  "tokens x vocabulary) that edgetune's fused head and loss never make, so that floor is loose here."
                  if max(bpm["steps_peak"], mzm["steps_peak"]) < fwd["steps_peak"] else ""))
    rate = med["forward"] / med["mezo"]
    out.append(f"- **Speed.** MeZO runs {rate:.2f}x forward-only's steps/s (goal >= 0.45x: "
               f"**{'met' if rate >= 0.45 else 'missed'}**) and {med['backprop'] / med['mezo']:.2f}x backprop's; "
               f"backprop runs {med['forward'] / med['backprop']:.2f}x forward's. A sparse backward through the "
               f"last {_blocks(results)} blocks costs "
               + ("less" if med["backprop"] < med["mezo"] else "more")
               + " than MeZO's second forward pass through all of them.")
    if bp and mz:
        gain_bp, gain_mz = before - bp["test"], before - mz["test"]
        share = gain_mz / gain_bp if gain_bp > 0 else float("nan")
        out.append(f"- **Quality after equal wall time.** Backprop ({bp['steps']} steps) reaches test loss "
                   f"{bp['test']:.4f} ({-gain_bp:+.4f} from the pretrained {before:.4f}); MeZO ({mz['steps']} steps, "
                   f"lr {mz['lr']:g}) {mz['test']:.4f} ({-gain_mz:+.4f}), {100 * share:.0f}% of backprop's gain. "
                   + ("MeZO is much worse at equal wall time: its advantage is memory, not speed of learning "
                      f"(one random direction a step estimates the gradient of {_trainable(results) / 1e6:.1f} M "
                      "entries, with high variance)."
                      if share < 0.5 else
                      "MeZO comes close to backprop at equal wall time." if share < 0.9 else
                      "MeZO matches backprop at equal wall time."))
        n = min(len(mz["losses"]), len(bp["losses"]))
        k = min(10, n)
        out.append(f"- Training loss on the same batches (both runs draw them in the same order), mean of steps "
                   f"1-{k}: backprop {_mean(bp['losses'][:k]):.4f}, MeZO {_mean(mz['losses'][:k]):.4f}; of steps "
                   f"{n - k + 1}-{n} (MeZO's last): backprop {_mean(bp['losses'][n - k:n]):.4f}, MeZO "
                   f"{_mean(mz['losses'][n - k:n]):.4f}. The runs' own training seconds (one run after another, so "
                   f"other work weighed on them differently): backprop {bp['training_seconds']:.0f} s, MeZO "
                   f"{mz['training_seconds']:.0f} s (budget {equal_wall_time(results)['wall']:.0f} s).")
        lrs = sorted((r for r in results["runs"].values() if r["kind"] == "mezo"), key=lambda r: r["lr"])
        out.append("- MeZO's rates tried, validation loss after their run of the same steps: "
                   + ", ".join(f"{r['lr']:g}: " + ("diverged" if r["val"] is None else f"{r['val']:.4f}") for r in lrs)
                   + f" (before training: {results['before']['val']:.4f}).")
        same = _lm_quality_run(results, bp)
        if same is not None:
            out.append(f"- Check: lm_quality's run of the same scheme, rate and {same['steps']} steps ended at test "
                       f"loss {same['test']:.4f}, this backprop run at {bp['test']:.4f}.")
        if len(lrs) > 1 and mz["lr"] == lrs[-1]["lr"]:
            out.append("- MeZO's best rate is the grid's highest: a higher one might do better.")
        elif len(lrs) > 1 and mz["lr"] == lrs[0]["lr"]:
            out.append("- MeZO's best rate is the grid's lowest: a lower one might do better.")
    return out


def _lm_quality_run(results: dict, bp: dict) -> dict | None:
    """lm_quality's run of this scheme at backprop's rate, where it holds one of as many steps."""
    from experiments import lm_quality

    s = results["meta"]["settings"]
    run = lm_quality.load().get("runs", {}).get(f"{s['scheme']}@{bp['lr']:g}")
    steps = lm_quality.load().get("meta", {}).get("settings", {}).get("steps")
    return None if run is None or steps != bp["steps"] else dict(run, steps=steps)


def _blocks(results: dict) -> str:
    scheme = results["meta"]["settings"]["scheme"]
    return scheme.split(":")[1] if ":" in scheme else "?"


def _trainable(results: dict) -> float:
    return results["memory"]["mezo"].get("trainable", 0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", choices=["backprop", "mezo"], help=argparse.SUPPRESS)
    p.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--memory", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--timing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--before", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--report", action="store_true", help="only print the section from mezo_vs_backprop.json")
    args = p.parse_args(argv)
    if args.one or args.memory or args.timing or args.before:
        import torch

        torch.set_num_threads(SETTINGS["threads"])
    if args.one:
        print(json.dumps(run_one(args.one, args.lr, args.steps, SETTINGS)))
    elif args.memory:
        print(json.dumps(measure_memory(args.memory, SETTINGS)))
    elif args.timing:
        print(json.dumps(time_in_turns(SETTINGS)))
    elif args.before:
        print(json.dumps(losses_before(SETTINGS)))
    else:
        results = load() if args.report else sweep(SETTINGS)
        print(section(results))


if __name__ == "__main__":
    main()
