"""FedKSeed-MeZO against FedAvg of LoRA adapters, federated on Flower: SmolLM2-135M-Instruct on
ShareGPT partitions, held-out loss and bytes per round (issue 14, RESULTS experiment (b)).

    python -m experiments.federated_lm              # the tuning and federated runs (finished ones are kept)
    python -m experiments.federated_lm --report     # only print the section from the results

lm_quality's data and split: the English two-turn ShareGPT subset up to 1,024 characters, 128
tokens, 100 test and 50 validation conversations; the rest of the training conversations cut
into CLIENTS equal iid parts (a seeded shuffle) as fixed [n, 128] (ids, mask) and labels. The
test split stays with the server, which scores the global model after every round (round 0:
the pretrained model); the clients evaluate nothing.

- `fedkseed`: edgetune.federated.fedkseed (Qin et al., ICML 2024): MeZO (one +-1 direction a
  step, eps 1e-3, constant rate) on `lm-sparse:6`, seeds drawn from a pool of K=1024; down,
  the K global coefficients (float64); up, one (int32 index, float64 gradient) pair a step.
- `lora`: edgetune.federated.server's FedAvg over LoRA adapters (r=8 on q_proj and v_proj of
  every block, alpha 16: PEFT's usual setting, and FlowerTune's approach of averaging adapters),
  AdamW (no weight decay, state fresh each round, constant rate); adapters travel both ways.

Both see the same clients, rounds, local steps and batch. Each method's rate is the one of its
grid with the lowest validation loss after a short centralized run (TUNE_STEPS steps of the
same batch on all the training conversations, constant rate); the MeZO grid is widened once by
a decade where its best is an edge. The test split is never used to choose anything.

Each run is a fresh process (experiments.children.run_child); results go to
experiments/results/federated_lm.json after each one (an interrupted sweep resumes) and a plot
to experiments/results/federated_lm.png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import time

from edgetune.files import write_json
from experiments.children import load_json, run_child

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_JSON = os.path.join(ROOT, "experiments", "results", "federated_lm.json")
PLOT = os.path.join(ROOT, "experiments", "results", "federated_lm.png")
TITLE = "## SmolLM2-135M-Instruct -> ShareGPT, federated: FedKSeed-MeZO vs FedAvg of LoRA adapters (issue 14)"
METHODS = ("fedkseed", "lora")
NAMES = {"fedkseed": "FedKSeed-MeZO", "lora": "FedAvg of LoRA adapters"}
GOAL_BYTES = 18 * 1024  # FedKSeed's title: "communication cost under 18 kilobytes"

# threads=1: two other jobs share this 2-core machine, and two intra-op threads per process spin at
# their barriers against them (experiments.mezo_vs_backprop measured a forward 6.5x slower so);
# cpus_per_client (Ray's CPUs per client): FedKSeed ran two single-threaded clients at once, each actor
# loading the model once; LoRA's run that way lost both actors to Ray's memory monitor in round 2 (the
# node at 95% memory with other jobs' runs: kept under "failed"), so LoRA runs one client at a time.
# Sizes: a MeZO step (two forwards of 4 x 128 tokens) took ~2.4 s here, a LoRA step ~3.5 s, the
# server's evaluation of 100 conversations ~45 s, replaying 1,024 seeds into lm-sparse:6's 3 M
# entries ~5 s (once per message): 6 rounds x 4 clients x 10 steps fit the hour this sweep had.
# MeZO's paper tunes 1e-7..1e-5 over a whole model's weights; lm-sparse:6 perturbs ~3 M entries,
# 1/45 of SmolLM2's, so the grid reaches higher. LoRA: around lm_quality's best (3e-3 over 150
# centralized AdamW steps with a cosine schedule).
SETTINGS = dict(model="smollm2-135m", data="sharegpt", max_chars=1024, seq_len=128, batch=4, test=100, val=50,
                seed=0, clients=4, partition="iid", rounds=6, local_steps=10, k=1024, pool_seed=0,
                mezo_scheme="lm-sparse:6", mezo_eps=1e-3, mezo_lrs=[1e-5, 1e-4, 1e-3],
                lora_scheme="lora:8:q_proj,v_proj,alpha=16", lora_lrs=[1e-3, 3e-3], tune_steps=40,
                threads=1, cpus_per_client={"fedkseed": 1, "lora": 2})


# -- the shared setup ------------------------------------------------------------------------

def split(settings: dict):
    """(tokenizer-bearing LM, train, val, test): lm_quality's split, the same in every run."""
    from experiments.lm_quality import split as lm_quality_split

    return lm_quality_split(settings)


class Builder:
    """The pretrained LM, loaded afresh on each call (every node and the server hold the same
    weights); `threads` intra-op threads in the process that builds it (a Ray actor too)."""

    def __init__(self, name: str, seq_len: int, threads: int | None = None) -> None:
        self.name, self.seq_len, self.threads = name, seq_len, threads

    def __call__(self):
        import torch

        from edgetune.apps.lm import load_lm

        if self.threads:
            torch.set_num_threads(self.threads)
        return load_lm(self.name, seq_len=self.seq_len).model


class Partitions:
    """Client p of n: its rows of the training conversations, ((ids, mask), (labels,))."""

    def __init__(self, data, parts) -> None:
        self.ids, self.mask, self.labels = data.input_ids, data.attention_mask, data.labels
        self.parts = [list(map(int, p)) for p in parts]

    def __call__(self, p: int, n: int):
        import torch

        if n != len(self.parts):
            raise ValueError(f"the conversations were cut for {len(self.parts)} clients, not {n}")
        index = torch.tensor(self.parts[p], dtype=torch.int64)
        return (self.ids[index], self.mask[index]), (self.labels[index],)


class Whole:
    """A whole split as ((ids, mask), (labels,))."""

    def __init__(self, data) -> None:
        self.ids, self.mask, self.labels = data.input_ids, data.attention_mask, data.labels

    def __call__(self):
        return (self.ids, self.mask), (self.labels,)


def lm_loss(outputs, labels, rows: int = 8):
    """causal_lm_loss (the mean over learned tokens), computed `rows` examples at a time where a
    batch has more: the server scores 100 conversations in one forward, and the flattened copy
    and log-softmax of all their logits at once would add 5 GB on a machine shared with others.
    A training batch of `rows` or fewer is causal_lm_loss itself."""
    import torch.nn.functional as F

    from edgetune.data.chat import IGNORE
    from edgetune.models.hf import causal_lm_loss

    logits = outputs.logits if hasattr(outputs, "logits") else outputs
    if logits.shape[0] <= rows:
        return causal_lm_loss(logits, labels)
    total, count = 0.0, 0
    for i in range(0, logits.shape[0], rows):
        target = labels[i:i + rows, 1:]
        total = total + F.cross_entropy(logits[i:i + rows, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                                        ignore_index=IGNORE, reduction="sum")
        count += int((target != IGNORE).sum())
    return total / count


def optimizer(method: str, lr: float, settings: dict):
    import edgetune as et

    if method == "fedkseed":
        return et.MeZO(lr=lr, eps=settings["mezo_eps"], seed=settings["seed"])
    return et.AdamW(lr=lr, weight_decay=0.0)


def make_task(method: str, lr: float, settings: dict, data=None):
    """(Task, partitions, val, test) for `method` at rate `lr`; `data`: split(settings), if loaded."""
    import edgetune as et
    from edgetune.federated.client import Task
    from edgetune.federated.job import partition

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: {', '.join(METHODS)}")
    _, train, val, test = data if data is not None else split(settings)
    parts = partition(list(range(len(train))), settings["clients"], settings["partition"], seed=settings["seed"],
                      min_size=settings["batch"])
    scheme = settings["mezo_scheme"] if method == "fedkseed" else settings["lora_scheme"]
    task = Task(model=Builder(settings["model"], settings["seq_len"], settings.get("threads")), loss=lm_loss,
                train_data=Partitions(train, parts), central_test_data=Whole(test),
                scheme=et.schemes.from_string(scheme), optimizer=optimizer(method, lr, settings),
                local_steps=settings["local_steps"], batch_size=settings["batch"], seed=settings["seed"])
    return task, parts, val, test


# -- the runs (each in its own process) ------------------------------------------------------

def run_before(settings: dict) -> dict:
    """The pretrained model's validation and test loss (the server's evaluation)."""
    from edgetune.federated.client import evaluate

    task, _, val, test = make_task("lora", settings["lora_lrs"][0], settings)
    trainer = task.compile(Whole(val)())
    return {"val": evaluate(trainer, task.loss, Whole(val)())["eval-loss"],
            "test": evaluate(trainer, task.loss, Whole(test)())["eval-loss"]}


def run_tune(method: str, lr: float, settings: dict) -> dict:
    """TUNE_STEPS centralized steps at a constant rate on all the training conversations, scored
    on the validation split: how each method's rate is chosen."""
    from edgetune.federated.client import batches, evaluate

    task, parts, val, _ = make_task(method, lr, settings)
    train = task.train_data
    data = ((train.ids, train.mask), (train.labels,))
    trainer = task.compile(data)
    losses, start = [], time.perf_counter()
    for batch in batches(data, settings["batch"], settings["tune_steps"], settings["seed"]):
        losses.append(trainer.step(*batch))
    seconds = time.perf_counter() - start
    score = evaluate(trainer, task.loss, Whole(val)())["eval-loss"]
    return {"method": method, "lr": lr, "steps": settings["tune_steps"], "val": score,
            "diverged": not (math.isfinite(score) and all(math.isfinite(x) for x in losses)),
            "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]), "seconds": seconds}


def run_federated(method: str, lr: float, settings: dict) -> dict:
    """`rounds` rounds on Flower's Simulation Engine: the server's test loss, each client's bytes
    and the wall time after every round."""
    from edgetune.federated import fedkseed, server

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    task, parts, _, _ = make_task(method, lr, settings)
    marks: dict[int, float] = {}
    start = time.perf_counter()

    def on_round(r: int, history) -> None:
        marks[r] = time.perf_counter() - start
        loss = history.rounds[r]["central"]["eval-loss"]
        print(f"[federated_lm] {method} round {r}: test loss {loss:.4f} at {marks[r]:.0f} s", flush=True)

    common = dict(cpus_per_client=settings["cpus_per_client"][method], fraction_evaluate=0.0, on_round=on_round)
    if method == "fedkseed":
        app = fedkseed.run_simulation(task, settings["clients"], settings["rounds"], k=settings["k"],
                                      pool_seed=settings["pool_seed"], **common)
    else:
        app = server.run_simulation(task, settings["clients"], settings["rounds"], **common)
    seconds = time.perf_counter() - start
    h = app.history
    if len(h.rounds) <= settings["rounds"]:
        raise RuntimeError(f"the simulation ended after {len(h.rounds) - 1} of {settings['rounds']} rounds")
    rounds = []
    for r in h.rounds:
        clients = r["clients"]
        rounds.append({"round": r["round"], "test": r["central"]["eval-loss"],
                       "train_loss": (r.get("train") or {}).get("train-loss"),
                       "down": [int(c["bytes-down"]) for c in clients], "up": [int(c["bytes-up"]) for c in clients],
                       "refused": len(r["refused"]), "seconds": marks.get(r["round"])})
    out = {"method": method, "lr": lr, "rounds": rounds, "seconds": seconds, "trained_entries": h.trained_entries,
           "model_entries": h.model_entries, "slice_bytes": h.slice_bytes, "model_bytes": h.model_bytes,
           "partition_sizes": [len(p) for p in parts]}
    if method == "fedkseed":  # what a message costs a node before its steps: replaying the coefficients
        model = app.strategy.model
        c = model.coefficients.copy()
        tick = time.perf_counter()
        model.set(c)
        out.update(replay_seconds=time.perf_counter() - tick, replayed_seeds=int((c != 0).sum()),
                   directions=task.optimizer.directions)
    return out


# -- the sweep -------------------------------------------------------------------------------

def sweep(settings: dict) -> dict:
    results = load()
    if results.get("meta", {}).get("settings") not in (None, settings):
        results = {}  # other settings: the old runs do not compare
    results.setdefault("meta", {}).update(settings=settings, cpu=platform.processor() or platform.machine())
    if "before" not in results:
        print("[federated_lm] pretrained ...", flush=True)
        results["before"] = _child(["--before"])
        _save(results)
    tune = results.setdefault("tune", {})
    for lr in settings["mezo_lrs"]:
        _tune(results, "fedkseed", lr)
    tried = sorted(r["lr"] for r in tune.values() if r["method"] == "fedkseed")
    best = best_lr(results, "fedkseed")
    if best in (tried[0], tried[-1]) and len(tried) == len(settings["mezo_lrs"]):  # widen once, past the edge
        _tune(results, "fedkseed", float(f"{best * (10 if best == tried[-1] else 0.1):.2g}"))
    for lr in settings["lora_lrs"]:
        _tune(results, "lora", lr)
    fed = results.setdefault("federated", {})
    for method in METHODS:
        if method not in fed:
            lr = best_lr(results, method)
            print(f"[federated_lm] federated {method} at lr {lr:g} ...", flush=True)
            run = _child(["--federated", method, "--lr", str(lr)])
            if any(r["refused"] for r in run["rounds"]):  # a client's reply failed: not a valid run
                print(f"[federated_lm] {method}: replies failed in some rounds; kept under 'failed', run again",
                      flush=True)
                results.setdefault("failed", []).append(run)
            else:
                fed[method] = run
                results["meta"]["date"] = datetime.date.today().isoformat()
            _save(results)
    plot(results, PLOT)
    return results


def _tune(results: dict, method: str, lr: float) -> None:
    key = f"{method}@{lr:g}"
    if key not in results["tune"]:
        print(f"[federated_lm] tune {key} ...", flush=True)
        results["tune"][key] = _child(["--tune", method, "--lr", str(lr)])
        _save(results)


def best_lr(results: dict, method: str) -> float:
    """The rate of `method`'s tuning run with the lowest validation loss (diverged runs never)."""
    runs = [r for r in results["tune"].values() if r["method"] == method and not r["diverged"]]
    if not runs:
        raise RuntimeError(f"every tuning run of {method} diverged: lower its rates")
    return min(runs, key=lambda r: r["val"])["lr"]


def _child(args: list[str]):
    return run_child("experiments.federated_lm", args)


def load() -> dict:
    return load_json(RESULTS_JSON)


def _save(results: dict) -> None:
    write_json(RESULTS_JSON, results)


# -- the report ------------------------------------------------------------------------------

def per_client(run: dict, key: str) -> int | None:
    """Bytes one client moved one way in a round (the largest, over every trained round)."""
    values = [b for r in run["rounds"][1:] for b in r[key]]
    return max(values) if values else None


def fedkseed_formula(settings: dict, directions: int = 1) -> tuple[int, int]:
    """(down, up) bytes per client per round by FedKSeed's arithmetic, with no model term: K
    float64 coefficients down, an int32 index and a float64 gradient a local step's direction up."""
    return 8 * settings["k"], 12 * settings["local_steps"] * directions


def section(results: dict) -> str:
    s, fed, before = results["meta"]["settings"], results.get("federated", {}), results.get("before", {})
    lines = [TITLE, "",
             f"`python -m experiments.federated_lm` — SmolLM2-135M-Instruct on lm_quality's ShareGPT split (up to "
             f"{s['max_chars']:,} characters, {s['seq_len']} tokens, {s['test']} test and {s['val']} validation "
             f"conversations), the training conversations cut into {s['clients']} {s['partition']} clients; "
             f"{s['rounds']} rounds of {s['local_steps']} local steps of batch {s['batch']} on every client; the "
             f"server scores the global model on the test split after each round (round 0: pretrained). "
             f"FedKSeed-MeZO: `{s['mezo_scheme']}`, K={s['k']} seeds, eps {s['mezo_eps']:g}; FedAvg: "
             f"`{s['lora_scheme']}`, AdamW. Each rate chosen on the validation split by a {s['tune_steps']}-step "
             f"centralized run ({_tried(results)}). Bytes = tensor entries x itemsize, per client per round, each "
             f"way; {results['meta'].get('date', '?')}, {results['meta']['cpu']}, one intra-op thread a process, "
             f"{_at_once(s)}, on a 2-core machine shared with other jobs.", ""]
    if before:
        lines += [f"Pretrained: test loss {before['test']:.4f}, validation loss {before['val']:.4f}.", ""]
    runs = [m for m in METHODS if m in fed]
    if runs:
        rounds = max(len(fed[m]["rounds"]) for m in runs)
        lines += ["| round | " + " | ".join(f"{NAMES[m]} test loss | s since start" for m in runs) + " |",
                  "|---:|" + "---:|---:|" * len(runs)]
        for r in range(rounds):
            cells = []
            for m in runs:
                x = fed[m]["rounds"][r] if r < len(fed[m]["rounds"]) else None
                cells += [f"{x['test']:.4f}" if x else "-",
                          f"{x['seconds']:.0f}" if x and x.get("seconds") is not None else "-"]
            lines.append(f"| {r} | " + " | ".join(cells) + " |")
        lines += ["", "| method | lr | trained entries | bytes down / up per client per round | wall time |",
                  "|---|---:|---:|---:|---:|"]
        for m in runs:
            run = fed[m]
            lines.append(f"| {NAMES[m]} | {run['lr']:g} | {run['trained_entries']:,} | "
                         f"{_bytes(per_client(run, 'down'))} / {_bytes(per_client(run, 'up'))} | {run['seconds']:.0f} s |")
        lines.append("")
        if "fedkseed" in fed and "replay_seconds" in fed["fedkseed"]:
            k = fed["fedkseed"]
            lines += [f"A FedKSeed message costs the node a replay of the global coefficients into its "
                      f"{k['trained_entries']:,} trained entries before its steps: {k['replay_seconds']:.1f} s for "
                      f"the {k['replayed_seeds']} seeds of the pool in use after the last round "
                      f"({1000 * k['replay_seconds'] / max(1, k['replayed_seeds']):.0f} ms a seed, so up to "
                      f"{k['replay_seconds'] / max(1, k['replayed_seeds']) * s['k']:.0f} s once all {s['k']} are; "
                      f"the server pays the same once a round). Times are wall-clock since the run began, "
                      f"round 0 the server's load, compile and first evaluation, round 1 also each Ray "
                      f"actor's.", ""]
    for bad in results.get("failed", []):
        lines += [f"Not in the tables: an earlier {NAMES[bad['method']]} run whose clients failed: "
                  f"{bad.get('failure', 'replies failed')}. It is kept in the results file under `failed`.", ""]
    lines += verdicts(results)
    return "\n".join(lines)


def _at_once(s: dict) -> str:
    cpus = s["cpus_per_client"]
    return ", ".join(f"{NAMES[m]} {2 // cpus[m]} client{'s' if 2 // cpus[m] > 1 else ''} at once" for m in METHODS)


def _tried(results: dict) -> str:
    parts = []
    for m in METHODS:
        runs = sorted((r for r in results.get("tune", {}).values() if r["method"] == m), key=lambda r: r["lr"])
        if runs:
            best = best_lr(results, m)
            text = ", ".join(f"{r['lr']:g}" + (" diverged" if r["diverged"] else f": {r['val']:.4f}")
                             + (" (chosen)" if r["lr"] == best else "") for r in runs)
            parts.append(f"{NAMES[m]} {text}")
    return "; ".join(parts) if parts else "not run"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n:,} B" if n < 10 * 1024 else f"{n / 1024:,.1f} KB" if n < 2**20 else f"{n / 2**20:.2f} MB"


def verdicts(results: dict) -> list[str]:
    """The issue's goals for FedKSeed, met or missed from the recorded numbers."""
    s, run = results["meta"]["settings"], results.get("federated", {}).get("fedkseed")
    if run is None:
        return ["- Goals (FedKSeed under 18 KB per client per round, independent of the model size; held-out "
                "loss below the pretrained model's): not measured."]
    down, up = per_client(run, "down"), per_client(run, "up")
    want = fedkseed_formula(s, run.get("directions", 1))
    total = down + up
    exact = all(d == want[0] for r in run["rounds"][1:] for d in r["down"]) and \
        all(u == want[1] for r in run["rounds"][1:] for u in r["up"])
    out = [f"- Goal (FedKSeed under 18 KB = {GOAL_BYTES:,} B per client per round): {total:,} B "
           f"({down:,} down + {up:,} up) — {'met' if total < GOAL_BYTES else 'missed'}.",
           f"- Goal (independent of the model size): every client in every round moved exactly 8 x K + 12 x local "
           f"steps = {want[0]:,} + {want[1]:,} B, a formula with no model term, while its "
           f"{run['trained_entries']:,} trained entries would be {run['slice_bytes'] / 2**20:.1f} MB as slices — "
           f"{'met' if exact else 'missed (the bytes differ from the formula)'}."]
    first, last = run["rounds"][0]["test"], run["rounds"][-1]["test"]
    below = last < first
    out.append(f"- Goal (FedKSeed's held-out loss below the pretrained model's): {last:.4f} after "
               f"{len(run['rounds']) - 1} rounds against {first:.4f} pretrained ({last - first:+.5f}) — "
               f"{'met' if below else 'missed'}.")
    lora = results["federated"].get("lora")
    if lora:
        l_last = lora["rounds"][-1]["test"]
        ratio = (per_client(lora, "down") + per_client(lora, "up")) / total
        out.append(f"- Against FedAvg of LoRA adapters (no goal set): its test loss {l_last:.4f} "
                   f"({l_last - lora['rounds'][0]['test']:+.4f} from pretrained) at "
                   f"{_bytes(per_client(lora, 'down') + per_client(lora, 'up'))} per client per round, "
                   f"{ratio:,.0f}x FedKSeed's bytes.")
    return out


def plot(results: dict, path: str) -> None:
    """Test loss against rounds and against cumulative bytes (all clients, both ways)."""
    fed = results.get("federated", {})
    if not fed:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgetune.files import atomic_write

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for m in METHODS:
        if m not in fed:
            continue
        rounds = fed[m]["rounds"]
        losses = [r["test"] for r in rounds]
        total, cumulative = 0, []
        for r in rounds:
            total += sum(r["down"]) + sum(r["up"])
            cumulative.append(max(total, 1))
        left.plot([r["round"] for r in rounds], losses, "o-", label=NAMES[m])
        right.plot(cumulative[1:], losses[1:], "o-", label=NAMES[m])
    if results.get("before"):
        for ax in (left, right):
            ax.axhline(results["before"]["test"], color="grey", ls="--", lw=1, label="pretrained")
    left.set(xlabel="round", ylabel="test loss", title="per round")
    right.set(xlabel="bytes moved (all clients, up + down)", ylabel="test loss", title="per byte", xscale="log")
    left.legend()
    fig.suptitle("SmolLM2-135M-Instruct, ShareGPT, federated")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tune", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--federated", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    p.add_argument("--report", action="store_true", help="only print the section from federated_lm.json")
    args = p.parse_args(argv)
    if args.before or args.tune or args.federated:
        import torch

        torch.set_num_threads(SETTINGS["threads"])
        if args.before:
            out = run_before(SETTINGS)
        elif args.tune:
            out = run_tune(args.tune, args.lr, SETTINGS)
        else:
            out = run_federated(args.federated, args.lr, SETTINGS)
        print(json.dumps(out), flush=True)
        return
    # Large tensors freed go back to the system at once (glibc's threshold would grow and keep them in the
    # heap): the children and their Ray actors inherit it. Ray's memory monitor kills its own actors when the
    # node (shared with other jobs' runs) reaches 95% of its memory.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    results = load() if args.report else sweep(SETTINGS)
    print(section(results))


if __name__ == "__main__":
    main()
