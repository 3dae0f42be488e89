"""A Flower ClientApp whose local trainer is an edgetune Trainer (the Message API, flwr >= 1.2x).

    task = Task(model=build, loss=F.cross_entropy, train_data=partition, test_data=held_out,
                scheme={"*.bias": "full", "fc.weight": 0.25}, optimizer=et.SGD(lr=0.05),
                local_steps=20, batch_size=16)
    app = client_app(task)        # a flwr.clientapp.ClientApp

On a train message the node writes the received trained slices into its Trainer (checked in
full first: edgetune.federated.records.load_record), runs `local_steps` compiled steps on its
partition, and replies with its trained slices, the number of training examples and metrics
(train-loss, bytes-received, bytes-sent: the tensors' entries times their itemsize). On an
evaluate message it loads the slices and replies with the held-out loss (and accuracy, for a
classifier) on its partition's test data.

Each process holds one compiled Trainer per task, shared by every virtual node the process
serves (the Simulation Engine's actors run many nodes): a message's outcome depends on the
message alone, since the node starts each one from the received slices, a fresh optimizer
(zero state, step 0: FedAvg's local SGD as McMahan et al. define it), the model's initial
buffers, and batches drawn from a generator seeded by (task seed, partition, round). A MeZO
optimizer's seed is drawn the same way, so nodes and rounds perturb in different directions.
"""
from __future__ import annotations

import copy
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from edgetune.apps.peft import adapters_merged  # a node evaluates its model as trained: adapters folded in
from edgetune.federated import slices
from edgetune.federated.records import load_record, payload_bytes, to_record

Data = tuple[tuple, tuple]  # (inputs, targets): tuples of tensors whose first axis is the example
CHANNELS = "channels/"  # config keys "channels/<tensor>": the sender's chosen channels of that tensor


@dataclass
class Task:
    """What every node (and the server) builds: the same model, loss, scheme and optimizer.

    `model()` must build the same weights on every call and every node (pretrained, or seeded):
    the frozen part never travels, and the chosen channels are picked from those weights.
    `train_data(partition, num_partitions)` and `test_data(...)` return a node's (inputs,
    targets), tuples of tensors with the examples on the first axis; `central_test_data()`
    the server's held-out set (optional). `loss(model(*inputs), *targets)` is a batch mean.
    `optimizer` (et.SGD, et.AdamW, et.MeZO) is copied into each trainer; `compile_options`
    go to et.compile (backend, frozen_weights, ...). A round runs `local_steps` steps of
    `batch_size` examples on each sampled node (each partition needs at least `batch_size`)."""

    model: Callable[[], torch.nn.Module]
    loss: Callable
    train_data: Callable[[int, int], Data]
    test_data: Callable[[int, int], Data] | None = None
    central_test_data: Callable[[], Data] | None = None
    scheme: Any = None
    optimizer: Any = None
    local_steps: int = 10
    batch_size: int = 8
    seed: int = 0
    compile_options: dict = field(default_factory=dict)
    # Names this task in a process's cache of compiled trainers; travels with the task when
    # the Simulation Engine pickles the ClientApp into its actors.
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def compile(self, data: Data):
        """A Trainer for this task, compiled on the first batch of `data`."""
        import edgetune as et

        n = num_examples(data, "the data the trainer is compiled on")
        if n < self.batch_size:
            raise ValueError(f"the trainer is compiled on a batch of {self.batch_size} examples, but the data it is "
                             f"given hold {n}")
        inputs, targets = rows(data, range(self.batch_size))
        optimizer = copy.deepcopy(self.optimizer) if self.optimizer is not None else None
        return et.compile(self.model(), self.loss, inputs, targets, scheme=self.scheme, optimizer=optimizer,
                          **self.compile_options)


def num_examples(data: Data, what: str = "data") -> int:
    tensors = list(data[0]) + list(data[1])
    if not tensors:
        raise ValueError(f"{what}: no tensors")
    n = {int(t.shape[0]) for t in tensors}
    if len(n) != 1:
        raise ValueError(f"{what}: the inputs and targets hold different numbers of examples {sorted(n)}")
    return n.pop()


def rows(data: Data, index) -> Data:
    index = torch.as_tensor(list(index) if isinstance(index, range) else index, dtype=torch.int64)
    return tuple(t[index] for t in data[0]), tuple(t[index] for t in data[1])


def mix(*values: int) -> int:
    """A 32-bit seed from integers (splitmix-style), the same on every machine."""
    h = 0x9E3779B9
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFF)) * 0x85EBCA6B & 0xFFFFFFFF
        h ^= h >> 13
        h = h * 0xC2B2AE35 & 0xFFFFFFFF
        h ^= h >> 16
    return h


class Node:
    """A process's compiled Trainer for one task, and the partitions it has loaded lately."""

    def __init__(self, task: Task, data: Data, max_partitions: int = 4) -> None:
        self.task = task
        self.trainer = task.compile(data)
        self.layout = slices.layout(self.trainer)
        self.initial = slices.read(self.trainer, self.layout)  # the built model's trained entries (FedKSeed)
        self.pairs: list[tuple[int, float]] = []  # the last train()'s applied MeZO (seed, gradient) pairs
        self.lr = self.trainer.lr  # the task optimizer's, where a message sets none
        # Buffers a train-mode step writes (BatchNorm statistics) start each message afresh.
        self.buffers = {n: b.detach().clone() for n, b in self.trainer.model.named_buffers()} \
            if self.trainer.model.training else {}
        self._data: OrderedDict[tuple, Data] = OrderedDict()
        self.max_partitions = max_partitions

    def data(self, kind: str, partition: int, num_partitions: int) -> Data:
        key = (kind, partition, num_partitions)
        if key not in self._data:
            source = self.task.train_data if kind == "train" else self.task.test_data
            if source is None:
                raise ValueError(f"the task has no {kind}_data, so this node cannot {kind}")
            self._data[key] = source(partition, num_partitions)
            while len(self._data) > self.max_partitions:
                self._data.popitem(last=False)
        self._data.move_to_end(key)
        return self._data[key]

    def start(self, record, config: ConfigRecord) -> None:
        """The trainer as the message says: the received slices (checked first), fresh
        optimizer state, step 0, the initial buffers."""
        channels = {k[len(CHANNELS):]: list(v) for k, v in config.items() if k.startswith(CHANNELS)}
        load_record(self.trainer, record, self.layout, channels if channels else None, "the server's record")
        t = self.trainer
        for v in t.state.values():
            v.zero_()
        t.steps = 0
        with torch.no_grad():
            for name, b in t.model.named_buffers():
                if name in self.buffers:
                    b.copy_(self.buffers[name])

    def train(self, partition: int, num_partitions: int, server_round: int, steps: int, lr: float | None) -> dict:
        t, task = self.trainer, self.task
        data = self.data("train", partition, num_partitions)
        n = num_examples(data, f"partition {partition}'s training data")
        if n < task.batch_size:
            raise ValueError(f"partition {partition} holds {n} training examples, fewer than the batch size "
                             f"{task.batch_size}")
        t.lr = self.lr if lr is None else float(lr)
        seed = mix(task.seed, partition, server_round)
        if hasattr(t.optimizer, "seeds_for"):  # MeZO: each node and round its own directions
            t.optimizer.seed = seed
        losses, self.pairs = [], []
        for inputs, targets in batches(data, task.batch_size, steps, seed):
            losses.append(t.step(inputs, targets))
            if not t.last_step.skipped:
                self.pairs.extend(t.last_step.directions)
        return {"train-loss": sum(losses) / len(losses) if losses else float("nan"), "num-examples": n}


def batches(data: Data, batch_size: int, steps: int, seed: int) -> Iterator[Data]:
    """`steps` batches of `data`: passes over a shuffle seeded by `seed`, a new shuffle when
    the rest of a pass cannot fill a batch (no batch spans two passes)."""
    n = num_examples(data)
    g = torch.Generator().manual_seed(seed)
    order, at = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if at + batch_size > n:
            order, at = torch.randperm(n, generator=g), 0
        yield rows(data, order[at:at + batch_size])
        at += batch_size


_NODES: dict[str, Node] = {}  # task token -> this process's Node


def node_for(task: Task, partition: int, num_partitions: int) -> Node:
    node = _NODES.get(task.token)
    if node is None:
        node = _NODES[task.token] = Node(task, task.train_data(partition, num_partitions))
    return node


def partition_of(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node's config: the Simulation Engine sets them;
    a deployed SuperNode takes them from `--node-config "partition-id=0 num-partitions=2"`."""
    cfg = context.node_config
    if "partition-id" not in cfg or "num-partitions" not in cfg:
        raise ValueError("this node's config lacks partition-id and num-partitions "
                         "(flower-supernode --node-config \"partition-id=0 num-partitions=2\")")
    return int(cfg["partition-id"]), int(cfg["num-partitions"])


@torch.no_grad()
def evaluate(trainer, loss_fn: Callable, data: Data, batch_size: int = 256) -> dict[str, float]:
    """Mean loss (and accuracy, where the output is [N, classes] logits and the first target
    holds class ids) of the trainer's model in eval mode on `data`, as plain PyTorch sees the
    trained step: int8 weights dequantized, LoRA adapters folded in (and taken out again)."""
    with adapters_merged(trainer) as model:
        return evaluate_model(model, loss_fn, data, batch_size)


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, loss_fn: Callable, data: Data, batch_size: int = 256) -> dict[str, float]:
    """evaluate() for a plain PyTorch model: its mean loss (and accuracy) in eval mode."""
    n = num_examples(data)
    loss_sum, correct, classifier = 0.0, 0, True
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n, batch_size):
            inputs, targets = rows(data, range(start, min(n, start + batch_size)))
            out = model(*inputs)
            k = num_examples((inputs, targets))
            loss_sum += float(loss_fn(out, *targets)) * k
            y = targets[0] if targets else None
            if (classifier and isinstance(out, torch.Tensor) and out.dim() == 2 and y is not None
                    and y.dim() == 1 and not y.is_floating_point()):
                correct += int((out.argmax(-1) == y).sum())
            else:
                classifier = False
    finally:
        model.train(was_training)
    metrics = {"eval-loss": loss_sum / n}
    if classifier:
        metrics["eval-accuracy"] = correct / n
    return metrics


def client_app(task: Task) -> ClientApp:
    """A ClientApp training `task` on the node's partition with an edgetune Trainer."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        partition, num_partitions, node, record, config = _started(task, msg, context)
        metrics = node.train(partition, num_partitions, int(config.get("server-round", 0)),
                             int(config.get("local-steps", task.local_steps)), config.get("lr"))
        reply = to_record(node.trainer, node.layout)
        metrics.update({"bytes-received": payload_bytes(record), "bytes-sent": payload_bytes(reply),
                        "partition-id": partition})
        return Message(RecordDict({"arrays": reply, "metrics": MetricRecord(metrics)}), reply_to=msg)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        partition, num_partitions, node, record, _ = _started(task, msg, context)
        return evaluation_reply(task, node, partition, num_partitions, record, msg)

    return app


def _started(task: Task, msg: Message, context: Context):
    """(partition, partitions, node, received record, config): the node's trainer holding the
    received slices, ready for the message."""
    partition, num_partitions = partition_of(context)
    node = node_for(task, partition, num_partitions)
    record, config = msg.content["arrays"], msg.content.get("config", ConfigRecord())
    node.start(record, config)
    return partition, num_partitions, node, record, config


def evaluation_reply(task: Task, node, partition: int, num_partitions: int, record, msg: Message) -> Message:
    """The held-out metrics of the node's model on its partition's test data."""
    data = node.data("test", partition, num_partitions)
    metrics = evaluate(node.trainer, task.loss, data)
    metrics.update({"num-examples": num_examples(data), "bytes-received": payload_bytes(record),
                    "partition-id": partition})
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

