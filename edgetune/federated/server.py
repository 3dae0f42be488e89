"""A Flower ServerApp averaging only the trained slices (Flower's own message-based FedAvg).

    app = server_app(task, num_rounds=5)     # a flwr.serverapp.ServerApp; app.history after the run

The server compiles the task's Trainer once (it never steps it) to learn which tensors and
channels train, and holds the model's frozen rest there: it never sends it. The initial
record, each round's global record and every reply hold the trained slices alone. FedAvg
(flwr.serverapp.strategy.FedAvg) averages them weighted by each reply's num-examples; a
reply whose tensors do not match the slices (missing, extra, misshaped, mistyped or
non-finite) is left out of the average and recorded as refused. Any strategy built on FedAvg
works the same way (`server_app(..., strategy=FedAvgM, strategy_options=...)`): its
server-side update moves the slices alone. The global slices are loaded
into the server's Trainer after each round and evaluated on `task.central_test_data` when
the task has it; nodes evaluate them on their own test data too. `app.history` records each
round: per client the bytes down and up, examples and loss; the aggregated metrics.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from logging import WARNING
from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from edgetune.federated import slices
from edgetune.federated.client import CHANNELS, Task, client_app, evaluate
from edgetune.federated.records import arrays_of, load_record, payload_bytes, to_record, wire_bytes

SUMMED = ("bytes-received", "bytes-sent")  # per-client metrics the round's totals add up
IDENTITY = ("partition-id",)               # per-client labels, not averaged


@dataclass
class History:
    """What a federated run did. `rounds[r]`: {"round", "clients": [{"node", "partition-id",
    "num-examples", "train-loss", "bytes-down", "bytes-up", "wire-down", "wire-up"}, ...],
    "refused": [{"node", "reason"}], "train": FedAvg's aggregated train metrics,
    "evaluate-down": [{"node", "bytes-down"}] of the evaluate messages, "evaluate": the nodes'
    aggregated held-out metrics, "central": the server's own evaluation}. Round 0
    holds the central evaluation of the initial model. Bytes: tensor entries x itemsize
    ("wire-*": Flower's serialized count, with .npy headers and keys)."""

    slice_bytes: int = 0       # one copy of the trained slices
    model_bytes: int = 0       # the whole state_dict, what sending the model would cost
    trained_entries: int = 0
    model_entries: int = 0
    tensors: list[str] = field(default_factory=list)
    # FedKSeed's settings (k, pool-seed, lr, local-steps), or another strategy's name and options; {} for FedAvg
    strategy: dict = field(default_factory=dict)
    rounds: list[dict] = field(default_factory=list)

    def round(self, r: int) -> dict:
        while len(self.rounds) <= r:
            self.rounds.append({"round": len(self.rounds), "clients": [], "refused": [], "evaluate-down": []})
        return self.rounds[r]

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        from edgetune.files import write_json

        write_json(path, self.to_dict())


def aggregate_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Per-client metrics of a round: bytes summed, labels dropped, the weight summed, the rest
    averaged weighted by `weighted_by_key` (Flower's aggregate_metricrecords does so for all)."""
    metrics = [next(iter(r.metric_records.values())) for r in records]
    weights = [float(m[weighted_by_key]) for m in metrics]
    total = sum(weights) or 1.0
    out = MetricRecord()
    for key in metrics[0]:
        if key in IDENTITY:
            continue
        values = [m[key] for m in metrics]
        if key in SUMMED or key == weighted_by_key:
            out[key] = sum(values)
        else:
            out[key] = sum(float(v) * w for v, w in zip(values, weights)) / total
    return out


class Counting:
    """Over one of Flower's FedAvg-family strategies: records the bytes each train message
    carries down (`_down`, by node) and each evaluate message's in the History."""

    def __init__(self, history: History, **kw) -> None:
        kw.setdefault("train_metrics_aggr_fn", aggregate_metrics)
        kw.setdefault("evaluate_metrics_aggr_fn", aggregate_metrics)
        super().__init__(**kw)
        self.history = history
        self._down: dict[int, tuple[int, int]] = {}  # this round's train messages: node -> (bytes, wire bytes)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._down = {m.metadata.dst_node_id: (payload_bytes(arrays), wire_bytes(arrays)) for m in messages}
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self.history.round(server_round)["evaluate-down"] = [
            {"node": m.metadata.dst_node_id, "bytes-down": payload_bytes(arrays)} for m in messages]
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        metrics = super().aggregate_evaluate(server_round, replies)
        self.history.round(server_round)["evaluate"] = dict(metrics) if metrics is not None else None
        return metrics

    @staticmethod
    def _log(text: str) -> None:
        from flwr.supercore import log

        log(WARNING, "%s", text)


class CountingFedAvg(Counting, FedAvg):
    """Flower's FedAvg, counting bytes (FedKSeed builds on it)."""


class Sparse(Counting):
    """Over one of Flower's FedAvg-family strategies: each reply checked against the trained
    slices (a mismatch is refused and recorded), a History kept."""

    def __init__(self, layout: dict[str, slices.Slice], history: History, **kw) -> None:
        super().__init__(history, **kw)
        self.layout = layout
        # The last round's accepted replies, (node, metrics, {name: ndarray}), and its average.
        self.last_replies: list[tuple[int, dict, dict]] = []
        self.last_global: ArrayRecord | None = None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        entry = self.history.round(server_round)
        kept, self.last_replies = [], []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                entry["refused"].append({"node": node, "reason": f"error reply: {msg.error.reason}"})
                kept.append(msg)  # FedAvg logs and skips it
                continue
            records = list(msg.content.array_records.values())
            try:
                if len(records) != 1:
                    raise slices.SliceError(f"expected one ArrayRecord in the reply, got {len(records)}")
                arrays = arrays_of(records[0], "reply")
                slices.check(self.layout, arrays, f"reply of node {node}")
            except slices.SliceError as err:
                self._log(f"round {server_round}: {err}")
                entry["refused"].append({"node": node, "reason": str(err)})
                continue
            kept.append(msg)
            metrics = dict(next(iter(msg.content.metric_records.values())))
            self.last_replies.append((node, metrics, arrays))
            down, wire_down = self._down.get(node, (0, 0))
            entry["clients"].append({"node": node, **metrics, "bytes-down": down, "wire-down": wire_down,
                                     "bytes-up": payload_bytes(records[0]), "wire-up": wire_bytes(records[0])})
        arrays, metrics = super().aggregate_train(server_round, kept)
        entry["train"] = dict(metrics) if metrics is not None else None
        self.last_global = arrays
        return arrays, metrics


class SparseFedAvg(Sparse, FedAvg):
    """Flower's FedAvg over the trained slices."""


def sparse_strategy(base: type = FedAvg) -> type:
    """Flower's strategy class `base` over the trained slices: FedAvg or one built on it that
    averages the same records (FedAvgM's server momentum, FedAdam, FedYogi, FedAdagrad,
    FedTrimmedAvg, ...): its server-side update then moves the slices alone."""
    if not (isinstance(base, type) and issubclass(base, FedAvg)):
        raise TypeError(f"strategy must be Flower's FedAvg or a subclass of it (flwr.serverapp.strategy), got {base!r}")
    from flwr.serverapp.strategy import FedProx

    if issubclass(base, FedProx):
        raise ValueError("FedProx adds a proximal term to each client's loss, which edgetune's client does not: "
                         "use FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad or FedTrimmedAvg")
    return SparseFedAvg if base is FedAvg else type(f"Sparse{base.__name__}", (Sparse, base), {})


def server_trainer(task: Task):
    """(the central test data or None, the server's Trainer compiled on it, else on the
    whole training set's first batch shape): the server never steps it."""
    central = task.central_test_data() if task.central_test_data is not None else None
    return central, task.compile(central if central is not None else task.train_data(0, 1))


def server_app(task: Task, num_rounds: int = 3, *, fraction_train: float = 1.0, fraction_evaluate: float = 1.0,
               min_nodes: int = 2, lr: float | None = None, local_steps: int | None = None,
               timeout: float = 3600, history_path: str | os.PathLike | None = None,
               on_round=None, strategy: type = FedAvg, strategy_options: dict | None = None) -> ServerApp:
    """A ServerApp running FedAvg over `task`'s trained slices for `num_rounds` rounds
    (`num-server-rounds` in the run config overrides it). `lr` and `local_steps` go to the
    nodes in each train message (default: the task's). After the run, `app.history` (a
    History, also written to `history_path` if given), `app.result` (Flower's Result),
    `app.strategy` (the running strategy: its last round's replies) and `app.trainer`: the
    server's Trainer holding the final global slices and the frozen rest. `on_round(round,
    history)` is called after each round's central evaluation (round 0's too). `strategy`:
    Flower's FedAvg or a subclass (sparse_strategy), built with `strategy_options` besides the
    node counts, e.g. strategy=FedAvgM, strategy_options={"server_momentum": 0.9}."""
    strategy_class = sparse_strategy(strategy)
    app = ServerApp()
    app.history, app.result, app.trainer, app.strategy = History(), None, None, None

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        history = app.history = History()
        central, trainer = server_trainer(task)
        app.trainer = trainer
        layout = slices.layout(trainer)
        history.tensors = list(layout)
        history.slice_bytes = sum(s.nbytes for s in layout.values())
        history.model_bytes = slices.model_bytes(trainer.model)
        history.trained_entries = sum(s.entries for s in layout.values())
        history.model_entries = sum(t.numel() for t in trainer.model.state_dict().values())
        if strategy is not FedAvg:
            history.strategy = {"name": strategy.__name__.lower(), **(strategy_options or {})}

        config = ConfigRecord({CHANNELS + n: s.channels for n, s in layout.items() if s.index is not None})
        train_config = ConfigRecord(dict(config))
        if lr is not None:
            train_config["lr"] = float(lr)
        if local_steps is not None:
            train_config["local-steps"] = int(local_steps)

        def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            load_record(trainer, arrays, layout, what="the global record")
            metrics = evaluate(trainer, task.loss, central) if central is not None else None
            history.round(server_round)["central"] = metrics
            if on_round is not None:  # a progress line: the round's bytes and central metrics are in
                on_round(server_round, history)
            return MetricRecord(metrics) if metrics is not None else None

        running = app.strategy = strategy_class(
            layout, history, fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_nodes, min_evaluate_nodes=min_nodes if fraction_evaluate else 0,
            min_available_nodes=min_nodes, **(strategy_options or {}))
        rounds = int(context.run_config.get("num-server-rounds", num_rounds))
        app.result = running.start(grid=grid, initial_arrays=to_record(trainer, layout), num_rounds=rounds,
                                    timeout=timeout, train_config=train_config,
                                    evaluate_config=ConfigRecord(dict(config)), evaluate_fn=central_evaluate)
        if len(app.result.arrays):  # empty where no round had a reply to average
            load_record(trainer, app.result.arrays, layout, what="the final global record")
        if history_path is not None:
            history.save(history_path)

    return app


def run_simulation(task: Task, num_clients: int, num_rounds: int = 3, *, cpus_per_client: float = 1,
                   backend_config: dict | None = None, **server_options) -> ServerApp:
    """Run `task` on `num_clients` virtual nodes with Flower's Simulation Engine (Ray) in this
    process; returns the ServerApp (its .history, .result, .strategy, .trainer). `server_options`
    go to server_app (default min_nodes: all of them, every round). `cpus_per_client`: Ray's
    resources per virtual client, so Ray runs (cores / cpus_per_client) clients at once, each
    in its own process with its own compiled Trainer (Flower's default is 2)."""
    from flwr.simulation import run_simulation as flwr_run_simulation

    server_options.setdefault("min_nodes", num_clients)  # every virtual node, every round
    server = server_app(task, num_rounds, **server_options)
    config = backend_config or {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0}}
    flwr_run_simulation(server_app=server, client_app=client_app(task), num_supernodes=num_clients,
                        backend_config=config)
    return server

