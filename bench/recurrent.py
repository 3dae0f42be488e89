"""Recurrent text classifiers (nn.LSTM, nn.GRU, nn.RNN): edgetune's step against eager's, in turns.

    python -m bench.recurrent --kinds lstm,gru --schemes full,bias-only --batches 1,8 --threads 1
    python -m bench.recurrent --kinds lstm-proj,rnn ...   # nn.LSTM(proj_size=64), nn.RNN (tanh)
    python -m bench.recurrent --against 30a6fda ...   # also that commit's edgetune, side by side

The model: an embedding of 1000 tokens x 64, the recurrent layer (hidden 128, `--layers`),
and a linear head on the last token's output; 32 tokens a sequence, SGD with momentum.
Schemes: full, bias-only (every bias), head (the recurrent layer frozen: forward only through
it). Each engine runs in a process of its own, timed in turns (bench/interleave.py; one
thread: CPU time, more: wall time). `--memory` adds each engine's peak above the model and
batch (a fresh process, MALLOC_MMAP_THRESHOLD_=65536, VmHWM over 3 steps after one) and
edgetune's predicted peak.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

TOKENS, VOCAB, EMBED, HIDDEN, CLASSES = 32, 1000, 64, 128, 4
LR, MOMENTUM = 0.01, 0.9
SCHEMES = {"full": {"*": "full"}, "bias-only": {"*bias*": "full"}, "head": {"head.*": "full"}}
# kind -> (module, its options); lstm-proj: an LSTM whose output is projected to half its width
KINDS = {"lstm": (torch.nn.LSTM, {}), "gru": (torch.nn.GRU, {}), "lstm-proj": (torch.nn.LSTM, {"proj_size": HIDDEN // 2}),
         "rnn": (torch.nn.RNN, {})}


class Classifier(torch.nn.Module):
    def __init__(self, kind: str, layers: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, EMBED)
        rnn, extra = KINDS[kind]
        self.rnn = rnn(EMBED, HIDDEN, num_layers=layers, batch_first=True, **extra)
        self.head = torch.nn.Linear(extra.get("proj_size", HIDDEN), CLASSES)

    def forward(self, ids):
        out, _ = self.rnn(self.emb(ids))
        return self.head(out[:, -1])


def setup(kind: str, layers: int, scheme: str, batch: int, engine: str):
    """(step, facts) for one engine: the step returns the loss."""
    import edgetune as et
    from edgetune.apps.baseline import freeze_to

    torch.manual_seed(0)
    model = Classifier(kind, layers)
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, VOCAB, (batch, TOKENS), generator=g), torch.randint(0, CLASSES, (batch,), generator=g)
    if engine == "edgetune":
        trainer = et.compile(model, F.cross_entropy, (ids,), (labels,), scheme=SCHEMES[scheme],
                             optimizer=et.SGD(lr=LR, momentum=MOMENTUM))
        return (lambda: trainer.step((ids,), (labels,))), {"predicted_peak_bytes": trainer.report().predicted_peak_bytes}
    freeze_to(model, SCHEMES[scheme])  # requires_grad on what edgetune's scheme trains (no partial rules here)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=MOMENTUM)

    def step() -> float:
        loss = F.cross_entropy(model(ids), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step, {}


def serve(args) -> None:
    from bench.interleave import serve_steps

    torch.set_num_threads(args.threads)
    step, facts = setup(args.kind, args.layers, args.scheme, args.batch, args.engine)
    for _ in range(3):
        step()
    serve_steps(step, facts)


def peak(args) -> None:
    """One engine's peak above the model and batch over 3 steps after a first one."""
    from edgetune import procmem

    torch.set_num_threads(args.threads)
    step, facts = setup(args.kind, args.layers, args.scheme, args.batch, args.engine)
    step()
    procmem.release_free_heap()
    base = procmem.vm_rss_bytes()
    procmem.reset_hwm()
    for _ in range(3):
        step()
    print(json.dumps({"peak_bytes": procmem.vm_hwm_bytes() - base, **facts}))


def _command(checkout: Path, mode: str, kind: str, layers: int, scheme: str, batch: int, engine: str,
             threads: int) -> list[str]:
    """This file, run from `checkout`: its edgetune (and bench package) come first on the path,
    as `python -c` puts the working directory there (an older checkout need not have this file)."""
    run = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    return ["bash", "-c", 'cd "$0" && exec "$@"', str(checkout), sys.executable, "-c", run, str(Path(__file__).resolve()),
            f"--{mode}", "--kinds", kind, "--layers", str(layers), "--schemes", scheme, "--batches", str(batch),
            "--engine", engine, "--threads", str(threads)]


def compare(kinds, layers, schemes, batches, threads, steps, memory, against) -> list[dict]:
    from bench.against import remove_worktree, worktree
    from bench.interleave import ROOT, Server, time_in_turns

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        members = {"eager": ROOT, "edgetune": ROOT}
        if against:
            members[f"edgetune@{against}"] = worktree(against, Path(tmp) / "other")
        try:
            for kind in kinds:
                for scheme in schemes:
                    for batch in batches:
                        group = list(members.items())

                        def start(member, threads, env, timeout, kind=kind, scheme=scheme, batch=batch):
                            name, checkout = member
                            cmd = _command(checkout, "serve", kind, layers, scheme, batch, name.split("@")[0], threads)
                            return Server(cmd, env, timeout)

                        timed = time_in_turns(group, threads, steps, dict(os.environ), 600, start=start)
                        row = {"kind": kind, "layers": layers, "scheme": scheme, "batch": batch, "threads": threads}
                        for (name, checkout), result in zip(group, timed):
                            row[name] = {"median_s": result.get("cpu_median_s" if threads == 1 else "median_s"),
                                         "times_s": result.get("cpu_times_s" if threads == 1 else "times_s")}
                            if memory:
                                cmd = _command(checkout, "peak", kind, layers, scheme, batch, name.split("@")[0], threads)
                                out = subprocess.run(cmd, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
                                                     capture_output=True, text=True, check=True).stdout
                                row[name].update(json.loads(out.strip().splitlines()[-1]))
                        rows.append(row)
                        print(render([row], header=not rows[:-1]), flush=True)
        finally:
            if against:
                remove_worktree(Path(tmp) / "other")
    return rows


def render(rows: list[dict], header: bool = True) -> str:
    others = [k for k in rows[0] if k.startswith("edgetune@")]
    cols = ["kind", "scheme", "batch", "eager ms", "edgetune ms", "eager / edgetune"]
    for other in others:
        cols += [f"{other} ms", f"eager / {other}"]
    if "peak_bytes" in rows[0]["eager"]:
        cols += ["eager peak MB", "edgetune peak MB", "edgetune predicted MB"] + [f"{o} peak MB" for o in others]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] if header else []
    for r in rows:
        eager = r["eager"]["median_s"]
        cells = [r["kind"], r["scheme"], str(r["batch"]), f"{eager * 1e3:.2f}",
                 f"{r['edgetune']['median_s'] * 1e3:.2f}", f"{eager / r['edgetune']['median_s']:.2f}x"]
        for other in others:
            cells += [f"{r[other]['median_s'] * 1e3:.2f}", f"{eager / r[other]['median_s']:.2f}x"]
        if "peak_bytes" in r["eager"]:
            mb = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
            cells += [mb(r["eager"]["peak_bytes"]), mb(r["edgetune"]["peak_bytes"]),
                      mb(r["edgetune"]["predicted_peak_bytes"])] + [mb(r[o]["peak_bytes"]) for o in others]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default="lstm,gru", help=f"comma-separated, of {', '.join(KINDS)}")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--schemes", default="full,bias-only,head")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--memory", action="store_true", help="also each engine's peak (a process of its own each)")
    p.add_argument("--against", help="a commit whose edgetune also runs, side by side")
    p.add_argument("--json", help="write the rows, raw times included, here")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--peak", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve or args.peak:
        args.kind, args.scheme, args.batch = args.kinds, args.schemes, int(args.batches)
        return serve(args) if args.serve else peak(args)
    rows = compare(args.kinds.split(","), args.layers, args.schemes.split(","), [int(b) for b in args.batches.split(",")],
                   args.threads, args.steps, args.memory, args.against)
    summary = {name: statistics.median(r["eager"]["median_s"] / r[name]["median_s"] for r in rows)
               for name in rows[0] if name.startswith("edgetune")}
    print("median eager / engine over the rows: " + ", ".join(f"{k} {v:.2f}x" for k, v in summary.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
