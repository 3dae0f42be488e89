"""Federated sparse fine-tuning on Flower against centralized training and against Flower's own
whole-model FedAvg: ImageNet MobileNetV2 -> Fashion-MNIST (issue 14, experiment a).

    python -m experiments.federated_vision            # the three runs (finished ones are kept), then RESULTS.md
    python -m experiments.federated_vision --report   # only rewrite RESULTS.md

The three runs see the same data (the training subset cut into 10 clients by a Dirichlet(0.5)
draw over the labels; the held-out split kept by the server), the same batch and the same
number of examples in all (rounds x clients x local steps x batch, about 3 passes):
- `federated-sparse`: edgetune's ClientApp/ServerApp (edgetune.federated) on Flower's
  Simulation Engine, the `mbv2-99kb` scheme plus the new head; only its trained slices travel.
- `centralized-sparse`: one edgetune Trainer, the same scheme, rate and batch, on the whole
  training subset for the same number of steps in all, scored after each round's worth.
- `federated-whole`: Flower's quickstart pattern: a ClientApp that loads the received
  state_dict into a PyTorch model, trains all of it eagerly with torch.optim.SGD and sends its
  whole state_dict back; a ServerApp running Flower's own FedAvg strategy.
- `federated-sparse-14x4`: the first run's examples in 14 rounds of 4 local steps (less drift
  of each client's model from the others' between averages, more messages).
- `federated-sparse-avgm`: the first run with server momentum 0.5 (Flower's FedAvgM over the
  slices, server rate 1).
Learning rates are the ones experiments.finetune_table tuned for these schemes centrally
(mbv2-99kb: 0.01, full: 0.001), not re-tuned here. Each run is a fresh process; results go
to experiments/results/federated_vision.json and the section into RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

from edgetune.files import write_json
from experiments.children import load_json, run_child

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_JSON = os.path.join(ROOT, "experiments", "results", "federated_vision.json")
SETTINGS = dict(model="mobilenetv2-imagenet", data="fashion-mnist", size=96, train_limit=6000, test_limit=3000,
                clients=10, partition="dirichlet:0.5", rounds=8, local_steps=7, batch=32, scheme="mbv2-99kb",
                lr_sparse=0.01, lr_whole=0.001, momentum=0.9, seed=0)
RUNS = ("federated-sparse", "centralized-sparse", "federated-whole", "federated-sparse-14x4", "federated-sparse-avgm")
# Runs with other settings than SETTINGS, the same examples in all: more rounds of fewer local
# steps; server momentum (FedAvgM, Hsu et al. 2019, a remedy for label skew) over the slices.
VARIANTS = {"federated-sparse-14x4": dict(rounds=14, local_steps=4),
            "federated-sparse-avgm": dict(server_momentum=0.5)}


# -- the shared setup ------------------------------------------------------------------------

def setup(s: dict):
    """(job, partitions, edgetune Task) the same in every run."""
    import torch

    import edgetune as et
    from edgetune.apps.jobs import build_job
    from edgetune.compiler.optim import by_name
    from edgetune.federated import job as fjob

    torch.manual_seed(s["seed"])
    job = build_job(s["model"], s["data"], size=s["size"], train_limit=s["train_limit"], val_limit=s["test_limit"],
                    seed=s["seed"], augment=False)
    parts = fjob.partition(job.train.labels, s["clients"], s["partition"], seed=s["seed"], min_size=s["batch"])
    scheme = et.schemes.with_head(et.schemes.parse(s["scheme"]), job.head)
    task = fjob.job_task(job, parts, scheme, by_name("sgd", s["lr_sparse"]), local_steps=s["local_steps"],
                         batch_size=s["batch"], seed=s["seed"])
    return job, parts, task


def total_steps(s: dict) -> int:
    """Steps of one batch all clients take in all: what the centralized run takes."""
    return s["rounds"] * s["clients"] * s["local_steps"]


# -- the runs --------------------------------------------------------------------------------

def run_federated_sparse(s: dict) -> dict:
    from flwr.serverapp.strategy import FedAvgM

    from edgetune.federated.job import round_bytes
    from edgetune.federated.server import run_simulation

    _, parts, task = setup(s)
    start = time.perf_counter()
    momentum = {"strategy": FedAvgM, "strategy_options": {"server_momentum": s["server_momentum"]}} \
        if s.get("server_momentum") else {}
    server = run_simulation(task, s["clients"], s["rounds"], fraction_evaluate=0.0, **momentum)
    seconds = time.perf_counter() - start
    h = server.history
    if len(h.rounds) <= s["rounds"]:
        raise RuntimeError(f"the simulation ended after {len(h.rounds) - 1} of {s['rounds']} rounds")
    for r in h.rounds[1:]:
        _check_round(r["round"], len(r["clients"]), s, r["refused"])
    rounds = []
    for r in h.rounds:
        down, up = round_bytes(r)
        clients = max(1, len(r["clients"]))
        rounds.append({"round": r["round"], "accuracy": r["central"]["eval-accuracy"],
                       "loss": r["central"]["eval-loss"], "down_per_client": down // clients,
                       "up_per_client": up // clients, "refused": len(r["refused"])})
    return {"rounds": rounds, "seconds": seconds, "trained_entries": h.trained_entries,
            "model_entries": h.model_entries, "slice_bytes": h.slice_bytes, "model_bytes": h.model_bytes,
            "partition_sizes": [len(p) for p in parts]}


def _check_round(r: int, replies: int, s: dict, why=()) -> None:
    """A round some client's reply missed (a Ray worker killed for memory, say) is no result."""
    if replies != s["clients"]:
        raise RuntimeError(f"round {r} averaged {replies} of {s['clients']} clients' replies: {list(why)[:2]}")


def run_centralized_sparse(s: dict) -> dict:
    from edgetune.federated.client import batches, evaluate

    _, _, task = setup(s)
    data, test = (task.train_data.inputs, (task.train_data.labels,)), task.central_test_data()
    trainer = task.compile(data)
    start = time.perf_counter()
    rounds = [{"round": 0, **_scores(evaluate(trainer, task.loss, test))}]
    per_round = s["clients"] * s["local_steps"]  # one round's examples, in steps of one batch
    for step, batch in enumerate(batches(data, s["batch"], total_steps(s), s["seed"]), 1):
        trainer.step(*batch)
        if step % per_round == 0:
            rounds.append({"round": step // per_round, **_scores(evaluate(trainer, task.loss, test))})
    return {"rounds": rounds, "seconds": time.perf_counter() - start, "steps": total_steps(s),
            "trained_entries": trainer.report().trainable_params}


def _scores(metrics: dict) -> dict:
    return {"accuracy": metrics["eval-accuracy"], "loss": metrics["eval-loss"]}


def run_federated_whole(s: dict) -> dict:
    """Flower's quickstart pattern: whole state_dicts both ways, Flower's FedAvg, eager PyTorch."""
    from flwr.simulation import run_simulation

    _, parts, task = setup(s)
    client, server = whole_model_apps(task, s)
    start = time.perf_counter()
    run_simulation(server_app=server, client_app=client, num_supernodes=s["clients"],
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    if len(server.rounds) <= s["rounds"]:
        raise RuntimeError(f"the simulation ended after {len(server.rounds) - 1} of {s['rounds']} rounds")
    return {"rounds": server.rounds, "seconds": time.perf_counter() - start,
            "trained_entries": server.trained_entries, "partition_sizes": [len(p) for p in parts]}


def whole_model_apps(task, s: dict):
    """(ClientApp, ServerApp) as Flower's PyTorch quickstart writes them, on this task's model,
    data and sampling: the client trains the whole model in train mode and returns its
    state_dict; the server runs flwr's FedAvg and evaluates each round's global model."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    from edgetune.federated.client import batches, evaluate_model, mix, partition_of
    from edgetune.federated.records import payload_bytes

    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        partition, num_partitions = partition_of(context)
        model = task.model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        data = task.train_data(partition, num_partitions)
        n = len(data[1][0])
        optimizer = torch.optim.SGD(model.parameters(), lr=float(msg.content["config"]["lr"]), momentum=s["momentum"])
        seed, losses = mix(s["seed"], partition, int(msg.content["config"]["server-round"])), []
        model.train()
        for x, y in batches(data, s["batch"], s["local_steps"], seed):  # the edgetune node's batches
            optimizer.zero_grad()
            loss = task.loss(model(*x), *y)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        reply = ArrayRecord(model.state_dict())
        metrics = MetricRecord({"train-loss": sum(losses) / len(losses), "num-examples": n,
                                "bytes-received": payload_bytes(msg.content["arrays"]),
                                "bytes-sent": payload_bytes(reply)})
        return Message(RecordDict({"arrays": reply, "metrics": metrics}), reply_to=msg)

    server = ServerApp()
    server.rounds, server.trained_entries = [], 0

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        model = task.model()
        server.trained_entries = sum(p.numel() for p in model.parameters())
        test = task.central_test_data()
        sent: dict[int, int] = {}

        class CountingFedAvg(FedAvg):  # the bytes each round's replies carried up, for the table
            def aggregate_train(self, server_round, replies):
                replies = list(replies)
                sent[server_round] = [int(next(iter(m.content.metric_records.values()))["bytes-sent"])
                                      for m in replies if not m.has_error()]
                _check_round(server_round, len(sent[server_round]), s,
                             [m.error.reason for m in replies if m.has_error()])
                return super().aggregate_train(server_round, replies)

        def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            metrics = evaluate_model(model, task.loss, test)
            up = sent.get(server_round, [])
            server.rounds.append({"round": server_round, **_scores(metrics),
                                  "down_per_client": payload_bytes(arrays) if server_round else 0,
                                  "up_per_client": sum(up) // max(1, len(up)), "refused": 0})
            return MetricRecord(metrics)

        strategy = CountingFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=s["clients"],
                                  min_available_nodes=s["clients"])
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=s["rounds"],
                       train_config=ConfigRecord({"lr": s["lr_whole"]}), evaluate_fn=central_evaluate)

    return client, server


RUNNERS = {"federated-sparse": run_federated_sparse, "centralized-sparse": run_centralized_sparse,
           "federated-whole": run_federated_whole, "federated-sparse-14x4": run_federated_sparse,
           "federated-sparse-avgm": run_federated_sparse}


def settings_of(name: str, settings: dict) -> dict:
    return {**settings, **VARIANTS.get(name, {})}


# -- the sweep and the report ----------------------------------------------------------------

def sweep(settings: dict) -> dict:
    results = load()
    if results.get("meta", {}).get("settings") not in (None, settings):
        results = {}  # other settings: the old runs do not compare
    results.setdefault("meta", {}).update(settings=settings, cpu=platform.processor() or platform.machine())
    runs = results.setdefault("runs", {})
    for name in RUNS:
        if name in runs:
            continue
        print(f"[federated_vision] {name} ...", flush=True)
        runs[name] = run_child("experiments.federated_vision", ["--one", name])
        results["meta"]["date"] = datetime.date.today().isoformat()
        write_json(RESULTS_JSON, results)
    return results


def load() -> dict:
    return load_json(RESULTS_JSON)


def section(results: dict) -> str:
    s, runs = results["meta"]["settings"], results["runs"]
    lines = ["## ImageNet MobileNetV2 -> Fashion-MNIST, federated: sparse FedAvg on Flower against centralized "
             "and whole-model FedAvg (issue 14)", "",
             f"`python -m experiments.federated_vision` — {s['train_limit']} training images cut into {s['clients']} "
             f"clients ({s['partition']} over the labels), {s['test_limit']} held-out images scored by the server, "
             f"{s['size']}x{s['size']} px, {s['rounds']} rounds of {s['local_steps']} local steps of batch "
             f"{s['batch']} on every client ({total_steps(s) * s['batch']:,} examples in all, "
             f"{total_steps(s) * s['batch'] / s['train_limit']:.1f} passes); the centralized run takes the same "
             f"{total_steps(s)} steps on the whole subset and is scored after each round's worth. SGD with "
             f"momentum {s['momentum']}: {s['lr_sparse']:g} for `{s['scheme']}`, {s['lr_whole']:g} for the whole "
             f"model (experiments.finetune_table's tuned rates); {results['meta'].get('date', '?')}, "
             f"{results['meta']['cpu']}. Bytes = tensor entries x itemsize, per client, each way. Wall times are "
             f"each run's own, on a machine other experiments shared: not a speed comparison.", "",
             "| run | rounds x local steps | trained entries | accuracy per round (0 = before training) | final | "
             "bytes down / up per client per round | bytes per client, whole run | wall time |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for name in RUNS:
        r, v = runs.get(name), settings_of(name, s)
        if r is None:
            lines.append(f"| {name} | | not run | | | | | |")
            continue
        curve = " ".join(f"{100 * x['accuracy']:.1f}" for x in r["rounds"])
        shape = (f"{v['rounds']} x {v['local_steps']}" + (f", server momentum {v['server_momentum']:g}"
                                                          if v.get("server_momentum") else "")
                 if name.startswith("federated")
                 else f"{total_steps(v)} steps, scored every {v['clients'] * v['local_steps']}")
        last, total = r["rounds"][-1], sum(x.get("down_per_client", 0) + x.get("up_per_client", 0) for x in r["rounds"])
        moved = (f"{last['down_per_client'] / 2**20:.2f} MB / {last['up_per_client'] / 2**20:.2f} MB"
                 if "down_per_client" in last else "none (one machine)")
        lines.append(f"| {name} | {shape} | {r['trained_entries']:,} | {curve} | {100 * last['accuracy']:.2f}% | "
                     f"{moved} | {f'{total / 2**20:.1f} MB' if total else '-'} | {r['seconds']:.0f} s |")
    lines += ["", *verdicts(runs)]
    return "\n".join(lines)


def verdicts(runs: dict) -> list[str]:
    fed, central, whole = runs.get("federated-sparse"), runs.get("centralized-sparse"), runs.get("federated-whole")
    out = []
    for name in (n for n in RUNS if n.startswith("federated-sparse") and n in runs and central):
        gap = 100 * (central["rounds"][-1]["accuracy"] - runs[name]["rounds"][-1]["accuracy"])
        out.append(f"- Goal (federated sparse within 2 points of centralized with the same scheme), `{name}`: "
                   f"{gap:+.2f} points behind — {'met' if gap <= 2 else 'missed'}.")
    if fed and whole:
        ratio = _round_bytes(whole) / _round_bytes(fed)
        out.append(f"- Goal (at least 4x fewer bytes per round than whole-model FedAvg): {ratio:.1f}x fewer — "
                   f"{'met' if ratio >= 4 else 'missed'}. Accuracy against whole-model FedAvg after "
                   f"{len(fed['rounds']) - 1} rounds: {100 * fed['rounds'][-1]['accuracy']:.2f}% against "
                   f"{100 * whole['rounds'][-1]['accuracy']:.2f}%.")
    return out


def _round_bytes(run: dict) -> int:
    last = run["rounds"][-1]
    return last["down_per_client"] + last["up_per_client"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", choices=RUNS, help=argparse.SUPPRESS)
    p.add_argument("--report", action="store_true", help="only rewrite RESULTS.md from federated_vision.json")
    args = p.parse_args(argv)
    if args.one:
        result = RUNNERS[args.one](settings_of(args.one, SETTINGS))
        print(json.dumps(result), flush=True)
        return
    results = load() if args.report else sweep(SETTINGS)
    from experiments import report

    report.main()
    print(section(results))


if __name__ == "__main__":
    main()
