"""FedKSeed on Flower: federated zeroth-order (MeZO) fine-tuning where only seeds' scalars travel.

    task = Task(..., optimizer=et.MeZO(lr=1e-3, eps=1e-3))       # no weight decay: replay has none
    server = run_simulation(task, num_clients=4, num_rounds=20, k=1024)
    server.history.rounds[1]["clients"]    # bytes-down 8,192 (K float64), bytes-up 12 a local step

Qin et al., "Federated Full-Parameter Tuning of Billion-Sized Language Models with
Communication Cost under 18 Kilobytes" (ICML 2024). A pool of K seeds is fixed once, derived
on every node from one shared number (`pool(k, pool_seed)`). Each node runs its local MeZO
steps with seeds drawn from the pool (`MeZO(seed=mix(task seed, partition, round), seeds=pool)`,
so nodes and rounds draw differently) and replies with its steps' (seed index, projected
gradient / directions) pairs: int32 indices and float64 gradients, 12 bytes a pair, plus its
example count. The server sums them per seed, weighted by examples as FedKSeed does, and
adds lr times that to the global coefficients c (K floats). The global model is a function
of c alone: theta = theta_0 - sum_k c_k z(seed_k) (Trainer.replay; z depends on (seed,
parameter, entry) only, so every machine regenerates it).

How a node gets the global model: each train and evaluate message carries c, the running
sum (K float64: 8 KB at K = 1024), never a tensor. The node restores its built model's
trained entries (kept once per process) and replays the seeds whose c_k is non-zero. So a
node holds no state between messages (a Simulation Engine actor serves many nodes, a
deployed SuperNode may start a fresh process each message), a node that missed rounds is
current after one message, and the bytes a round moves do not depend on the model's size:
K x 8 down, 12 x local steps x directions up. The price is compute: a message replays up to
K directions over the trained entries (no forward pass).

The server holds the model too: after each round it replays c into its Trainer (`app.trainer`)
and evaluates it on `task.central_test_data`. A reply whose pairs are malformed (an index
outside the pool, a non-finite gradient, index and gradient arrays of different lengths or
more pairs than the round's steps) is refused whole (FedKSeedError, in the round's
`refused`) and changes nothing.
"""
from __future__ import annotations

import os
import zlib
from typing import Iterable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from edgetune.federated import slices
from edgetune.federated.client import Task, evaluate, evaluation_reply, mix, node_for, partition_of
from edgetune.federated.records import arrays_of, payload_bytes, wire_bytes
from edgetune.federated.server import CountingFedAvg, History, server_trainer
from edgetune.federated.slices import SliceError

COEFFICIENTS = "coefficients"  # the down record: the global per-seed sums, float64 [K]
INDEX, GRAD = "index", "grad"   # the up record: int32 [n] pool indices, float64 [n] gradients


class FedKSeedError(SliceError):
    """A FedKSeed message that does not fit the pool or the round: nothing was changed."""


def pool(k: int, pool_seed: int = 0) -> tuple[int, ...]:
    """K distinct 32-bit seeds, a function of (k, pool_seed) alone: every node derives the same."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"FedKSeed needs a pool of at least 1 seed, got k={k!r}")
    out, seen, i = [], set(), 0
    while len(out) < k:
        s = mix(pool_seed, i, 0x4B5EED)
        i += 1
        if s not in seen:
            seen.add(s)
            out.append(s)
    return tuple(out)


def layout_digest(layout: Mapping[str, slices.Slice], initial: Mapping[str, np.ndarray] | None = None) -> int:
    """A 32-bit digest of what trains (names, shapes, dtypes, chosen channels) and, given
    `initial`, of its initial values: a node whose model, weights or scheme differ from the
    server's refuses the message instead of drifting (only c travels, never theta_0)."""
    text = repr([(n, s.shape, str(s.dtype), s.axis, s.channels) for n, s in layout.items()])
    digest = zlib.crc32(text.encode())
    for name in layout if initial is not None else ():
        digest = zlib.crc32(np.ascontiguousarray(initial[name]).tobytes(), digest)
    return digest


def check_mezo(task: Task) -> None:
    from edgetune.compiler.optim import MeZO

    opt = task.optimizer
    if not isinstance(opt, MeZO):
        raise ValueError(f"FedKSeed trains with MeZO (et.MeZO(lr, eps)); the task's optimizer is "
                         f"{type(opt).__name__}")
    if opt.weight_decay:
        raise ValueError("FedKSeed replays updates as seeds and scalars, which carry no weight decay: "
                         f"use MeZO(weight_decay=0), got {opt.weight_decay}")


class Model:
    """A trainer's model as a function of the global coefficients: theta_0 - sum c_k z(seed_k)."""

    def __init__(self, trainer, seeds: tuple[int, ...], initial: Mapping[str, np.ndarray] | None = None) -> None:
        self.trainer, self.seeds = trainer, seeds
        self.layout = slices.layout(trainer)
        self.initial = initial if initial is not None else {
            n: t.numpy() for n, t in slices.read(trainer, self.layout).items()}
        self.digest = layout_digest(self.layout, self.initial)
        self.coefficients = np.zeros(len(seeds))

    def set(self, coefficients: np.ndarray) -> None:
        """The trainer's trained entries := theta_0 replayed with `coefficients` (checked first)."""
        c = check_coefficients(coefficients, len(self.seeds))
        slices.write(self.trainer, self.initial, self.layout, "the initial slices")
        pairs = [(self.seeds[k], float(c[k])) for k in np.flatnonzero(c)]
        if pairs:
            self.trainer.replay(pairs, lr=1.0)
        self.coefficients = c.copy()


def check_coefficients(c, k: int, what: str = "the global coefficients") -> np.ndarray:
    if not isinstance(c, np.ndarray) or c.dtype != np.float64 or c.shape != (k,):
        shape = getattr(c, "shape", None)
        raise FedKSeedError(f"{what} refused: expected float64 [{k}], got {getattr(c, 'dtype', type(c).__name__)} "
                            f"{shape}")
    if not np.isfinite(c).all():
        raise FedKSeedError(f"{what} refused: NaN or infinite values")
    return c


def check_reply(arrays: Mapping[str, np.ndarray], k: int, max_pairs: int, what: str = "reply") -> tuple[np.ndarray, np.ndarray]:
    """(indices, gradients) of a node's reply, or FedKSeedError naming every problem."""
    problems = []
    if set(arrays) != {INDEX, GRAD}:
        raise FedKSeedError(f"{what} refused, nothing was changed: expected arrays {INDEX!r} and {GRAD!r}, "
                            f"got {sorted(arrays)}")
    index, grad = arrays[INDEX], arrays[GRAD]
    if index.ndim != 1 or index.dtype.kind not in "iu":
        problems.append(f"{INDEX!r} must be a 1-D integer array, got {index.dtype} {index.shape}")
    if grad.ndim != 1 or grad.dtype != np.float64:
        problems.append(f"{GRAD!r} must be a 1-D float64 array, got {grad.dtype} {grad.shape}")
    if not problems:
        if len(index) != len(grad):
            problems.append(f"{len(index)} seed indices but {len(grad)} gradients")
        if len(index) > max_pairs:
            problems.append(f"{len(index)} pairs, more than the round's {max_pairs} (local steps x directions)")
        bad = index[(index < 0) | (index >= k)]
        if len(bad):
            problems.append(f"seed index {int(bad[0])} outside the pool of {k} ({len(bad)} such)")
        if not np.isfinite(grad).all():
            problems.append(f"{int((~np.isfinite(grad)).sum())} NaN or infinite gradients")
    if problems:
        raise FedKSeedError(f"{what} refused, nothing was changed: " + "; ".join(problems))
    return index.astype(np.int64), grad


# -- the node ------------------------------------------------------------------------------

def _node_model(task: Task, partition: int, num_partitions: int, seeds: tuple[int, ...]) -> tuple:
    node = node_for(task, partition, num_partitions)
    model = getattr(node, "fedkseed", None)
    if model is None or model.seeds != seeds:
        node.fedkseed = model = Model(node.trainer, seeds, {n: t.numpy() for n, t in node.initial.items()})
    node.trainer.optimizer.seeds = seeds
    return node, model


def _received(msg: Message, k: int, digest: int, model: Model) -> tuple[ArrayRecord, ConfigRecord]:
    config = msg.content.get("config", ConfigRecord())
    if int(config.get("layout-digest", -1)) != digest:
        raise FedKSeedError("the server trains other tensors, channels or initial values than this node (the models "
                            "were not built from the same weights, or the schemes differ); nothing was changed")
    records = list(msg.content.array_records.values())
    if len(records) != 1 or COEFFICIENTS not in records[0] or len(records[0]) != 1:
        raise FedKSeedError(f"expected one ArrayRecord holding {COEFFICIENTS!r} alone")
    model.set(arrays_of(records[0], "the server's coefficients")[COEFFICIENTS])
    return records[0], config


def client_app(task: Task) -> ClientApp:
    """A ClientApp running FedKSeed's client: replay the global coefficients, train local MeZO
    steps with seeds from the pool, reply with (index, gradient) pairs."""
    check_mezo(task)
    app = ClientApp()

    def setup(msg: Message, context: Context):
        partition, num_partitions = partition_of(context)
        config = msg.content.get("config", ConfigRecord())
        seeds = pool(int(config["pool-size"]), int(config["pool-seed"]))
        node, model = _node_model(task, partition, num_partitions, seeds)
        record, config = _received(msg, len(seeds), model.digest, model)
        return partition, num_partitions, node, model, record, config

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        partition, num_partitions, node, model, record, config = setup(msg, context)
        t = node.trainer
        t.steps = 0  # MeZO keeps no state; the buffers a train-mode step writes start afresh
        with torch.no_grad():
            for name, b in t.model.named_buffers():
                if name in node.buffers:
                    b.copy_(node.buffers[name])
        metrics = node.train(partition, num_partitions, int(config.get("server-round", 0)),
                             int(config.get("local-steps", task.local_steps)), config.get("lr"))
        where = {s: i for i, s in enumerate(model.seeds)}
        d = t.optimizer.directions
        reply = ArrayRecord({INDEX: Array(np.array([where[s] for s, _ in node.pairs], dtype=np.int32)),
                             GRAD: Array(np.array([g / d for _, g in node.pairs], dtype=np.float64))})
        metrics.update({"bytes-received": payload_bytes(record), "bytes-sent": payload_bytes(reply),
                        "partition-id": partition})
        return Message(RecordDict({"arrays": reply, "metrics": MetricRecord(metrics)}), reply_to=msg)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        partition, num_partitions, node, model, record, _ = setup(msg, context)
        return evaluation_reply(task, node, partition, num_partitions, record, msg)

    return app


# -- the server ----------------------------------------------------------------------------

class FedKSeed(CountingFedAvg):
    """Flower's FedAvg sampling and metrics, with FedKSeed's arrays: down, the global
    coefficients; up, (index, gradient) pairs, checked and summed per seed by examples."""

    def __init__(self, model: Model, history: History, lr: float, max_pairs: int, **kw) -> None:
        super().__init__(history, **kw)
        self.model, self.lr, self.max_pairs = model, float(lr), int(max_pairs)
        self.last_aggregate: np.ndarray | None = None  # the last round's example-weighted per-seed sums

    def check(self, msg: Message) -> tuple[np.ndarray, np.ndarray, dict, ArrayRecord]:
        node = msg.metadata.src_node_id
        records = list(msg.content.array_records.values())
        if len(records) != 1:
            raise FedKSeedError(f"reply of node {node} refused: expected one ArrayRecord, got {len(records)}")
        index, grad = check_reply(arrays_of(records[0], f"reply of node {node}"), len(self.model.seeds),
                                  self.max_pairs, f"reply of node {node}")
        metrics = list(msg.content.metric_records.values())
        n = float(metrics[0].get("num-examples", 0)) if len(metrics) == 1 else 0
        if not n > 0 or not np.isfinite(n):
            raise FedKSeedError(f"reply of node {node} refused: no positive num-examples")
        return index, grad, dict(metrics[0]), records[0]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        entry = self.history.round(server_round)
        accepted = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                entry["refused"].append({"node": node, "reason": f"error reply: {msg.error.reason}"})
                continue
            try:
                index, grad, metrics, record = self.check(msg)
            except SliceError as err:
                self._log(f"round {server_round}: {err}")
                entry["refused"].append({"node": node, "reason": str(err)})
                continue
            accepted.append((msg, index, grad))
            down, wire_down = self._down.get(node, (0, 0))
            entry["clients"].append({"node": node, **metrics, "bytes-down": down, "wire-down": wire_down,
                                     "bytes-up": payload_bytes(record), "wire-up": wire_bytes(record),
                                     "pairs": len(index)})
        if not accepted:
            entry["train"] = None
            return None, None
        weights = np.array([float(next(iter(m.content.metric_records.values()))["num-examples"])
                            for m, _, _ in accepted])
        weights /= weights.sum()
        aggregate = np.zeros(len(self.model.seeds))
        for w, (_, index, grad) in zip(weights, accepted):
            np.add.at(aggregate, index, w * grad)
        self.last_aggregate = aggregate
        coefficients = self.model.coefficients + self.lr * aggregate
        self.model.set(coefficients)
        metrics = self.train_metrics_aggr_fn([m.content for m, _, _ in accepted], self.weighted_by_key)
        entry["train"] = dict(metrics)
        return ArrayRecord({COEFFICIENTS: Array(coefficients)}), metrics



def server_app(task: Task, num_rounds: int = 3, *, k: int = 1024, pool_seed: int = 0, fraction_train: float = 1.0,
               fraction_evaluate: float = 1.0, min_nodes: int = 2, lr: float | None = None,
               local_steps: int | None = None, timeout: float = 3600,
               history_path: str | os.PathLike | None = None, on_round=None) -> ServerApp:
    """A ServerApp running FedKSeed over `task` (a MeZO task) with a pool of `k` seeds derived
    from `pool_seed`. After the run: `app.history`, `app.result`, `app.strategy` (its
    `model.coefficients`, `last_aggregate`) and `app.trainer`, the server's Trainer holding
    the global model (theta_0 replayed with the final coefficients). `on_round(round, history)`
    is called after each round's central evaluation (round 0's too)."""
    check_mezo(task)
    seeds = pool(k, pool_seed)
    app = ServerApp()
    app.history, app.result, app.trainer, app.strategy = History(), None, None, None

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        history = app.history = History()
        central, trainer = server_trainer(task)
        app.trainer = trainer
        trainer.optimizer.seeds = seeds
        model = Model(trainer, seeds)
        steps = int(local_steps if local_steps is not None else task.local_steps)
        rate = float(lr if lr is not None else trainer.lr)
        history.tensors = list(model.layout)
        history.slice_bytes = sum(s.nbytes for s in model.layout.values())
        history.model_bytes = slices.model_bytes(trainer.model)
        history.trained_entries = sum(s.entries for s in model.layout.values())
        history.model_entries = sum(t.numel() for t in trainer.model.state_dict().values())
        history.strategy = {"name": "fedkseed", "k": k, "pool-seed": pool_seed, "lr": rate, "local-steps": steps}

        config = ConfigRecord({"pool-size": k, "pool-seed": pool_seed, "layout-digest": model.digest})
        train_config = ConfigRecord({**dict(config), "lr": rate, "local-steps": steps})

        def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            c = arrays_of(arrays, "the global record")[COEFFICIENTS]
            if not np.array_equal(c, model.coefficients):
                model.set(c)
            metrics = evaluate(trainer, task.loss, central) if central is not None else None
            history.round(server_round)["central"] = metrics
            if on_round is not None:  # a progress line: the round's bytes and central metrics are in
                on_round(server_round, history)
            return MetricRecord(metrics) if metrics is not None else None

        strategy = app.strategy = FedKSeed(
            model, history, rate, steps * trainer.optimizer.directions, fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate, min_train_nodes=min_nodes,
            min_evaluate_nodes=min_nodes if fraction_evaluate else 0, min_available_nodes=min_nodes)
        rounds = int(context.run_config.get("num-server-rounds", num_rounds))
        initial = ArrayRecord({COEFFICIENTS: Array(np.zeros(k))})
        app.result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, timeout=timeout,
                                    train_config=train_config, evaluate_config=ConfigRecord(dict(config)),
                                    evaluate_fn=central_evaluate)
        if history_path is not None:
            history.save(history_path)

    return app


def run_simulation(task: Task, num_clients: int, num_rounds: int = 3, *, cpus_per_client: float = 1,
                   backend_config: dict | None = None, **server_options) -> ServerApp:
    """FedKSeed on `num_clients` virtual nodes with Flower's Simulation Engine (as
    edgetune.federated.run_simulation); `server_options` (k, pool_seed, lr, ...) go to server_app."""
    from flwr.simulation import run_simulation as flwr_run_simulation

    server_options.setdefault("min_nodes", num_clients)
    server = server_app(task, num_rounds, **server_options)
    config = backend_config or {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0}}
    flwr_run_simulation(server_app=server, client_app=client_app(task), num_supernodes=num_clients,
                        backend_config=config)
    return server
