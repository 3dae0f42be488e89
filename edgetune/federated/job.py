"""`edgetune federate`'s parts: a federated Task from an edgetune job, its partitions, the plot.

    parts = partition(job.train.labels, 4, "dirichlet:0.5", seed=0, min_size=16)
    task = job_task(job, parts, scheme, optimizer, local_steps=10, batch_size=16)

No Flower here (the apps import it): `partition` splits label arrays (iid, or by a Dirichlet
draw of each class's shares over the clients, as Flower Datasets' DirichletPartitioner does,
without its `datasets` dependency), seeded.
"""
from __future__ import annotations

import copy

import numpy as np
import torch


def partition(labels, num_clients: int, spec: str = "iid", seed: int = 0, min_size: int = 1,
              max_tries: int = 100) -> list[np.ndarray]:
    """Index arrays of `num_clients` disjoint partitions covering every example. "iid": a seeded
    shuffle cut into near-equal parts. "dirichlet:ALPHA": each class's examples go to the clients
    in shares drawn from Dirichlet(ALPHA) (small ALPHA: a few classes a client), redrawn until
    each client holds at least `min_size` examples."""
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    n = len(labels)
    if num_clients < 1:
        raise ValueError(f"--clients must be at least 1, got {num_clients}")
    if n < num_clients * min_size:
        raise ValueError(f"{n} training examples cannot give {num_clients} clients {min_size} each "
                         "(the batch size): fewer clients, a smaller --batch, or more data")
    rng = np.random.default_rng(seed)
    if spec == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(n), num_clients)]
    kind, _, value = spec.partition(":")
    try:
        alpha = float(value) if kind == "dirichlet" else None
    except ValueError:
        alpha = None
    if alpha is None or not alpha > 0:
        raise ValueError(f"--partition takes iid or dirichlet:ALPHA with ALPHA > 0 (e.g. dirichlet:0.5), got {spec!r}")
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients))[:-1] * len(members)).astype(int)
            for i, chunk in enumerate(np.split(members, cuts)):
                parts[i].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"dirichlet:{alpha} left a client with fewer than {min_size} examples in {max_tries} draws: "
                     "a larger ALPHA, fewer clients or a smaller --batch")


class _Copy:
    """The same weights on every call: a copy of the built model (picklable into Ray's actors)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __call__(self) -> torch.nn.Module:
        return copy.deepcopy(self.model)


class _Rows:
    """partition p of n: its rows of a split, prepared (as for evaluation) when a node asks. The
    task carries the stored items (uint8 images, texts) into every node, not the prepared
    tensors of every partition: those are 10-100x larger (float32 at the model's size), and a
    Simulation Engine actor held all of them (about 4.8 GB each in experiments.federated_vision)."""

    def __init__(self, data, prepare, parts: list[np.ndarray]) -> None:
        self.data, self.prepare, self.parts = data, prepare, parts

    def __call__(self, p: int, n: int):
        if n != len(self.parts):
            raise ValueError(f"the data were split for {len(self.parts)} clients, not {n}")
        return prepared(self.prepare, self.data.subset(torch.from_numpy(np.array(self.parts[p], dtype=np.int64))))


class _Whole:
    """The whole split, prepared when the server asks (the nodes never do)."""

    def __init__(self, data, prepare) -> None:
        self.data, self.prepare = data, prepare

    def __call__(self):
        return prepared(self.prepare, self.data)


def prepared(prepare, data) -> tuple[tuple, tuple]:
    """(inputs, (labels,)) of `data`, prepared as for evaluation (no augmentation)."""
    inputs = prepare(data.items, False)
    return tuple(t.contiguous() for t in inputs), (data.labels.clone(),)


def job_task(job, parts: list[np.ndarray], scheme, optimizer, *, local_steps: int, batch_size: int, seed: int = 0):
    """A Task training `job.model` under `scheme` on the job's training split cut into `parts`,
    evaluated centrally on its held-out split."""
    from edgetune.federated.client import Task

    return Task(model=_Copy(job.model), loss=job.loss_fn, train_data=_Rows(job.train, job.prepare, parts),
                central_test_data=_Whole(job.val, job.prepare), scheme=scheme, optimizer=optimizer,
                local_steps=local_steps, batch_size=batch_size, seed=seed)


def round_bytes(entry: dict) -> tuple[int, int]:
    """(bytes down, bytes up) a round moved, summed over its clients' train messages."""
    return (sum(int(c["bytes-down"]) for c in entry["clients"]), sum(int(c["bytes-up"]) for c in entry["clients"]))


def plot(history, path: str, title: str = "") -> None:
    """A PNG: held-out accuracy (or loss) against rounds and against cumulative bytes moved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgetune.files import atomic_write

    rounds = [r for r in history.rounds if r.get("central")]
    key = "eval-accuracy" if rounds and "eval-accuracy" in rounds[0]["central"] else "eval-loss"
    scale, label = (100, "held-out accuracy (%)") if key == "eval-accuracy" else (1, "held-out loss")
    values = [scale * r["central"][key] for r in rounds]
    total, cumulative = 0, []
    for r in history.rounds:
        total += sum(round_bytes(r))
        if r.get("central"):
            cumulative.append(total)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot([r["round"] for r in rounds], values, "o-")
    left.set(xlabel="round", ylabel=label, title="per round")
    right.plot(cumulative, values, "o-")
    right.set(xlabel="bytes moved (all clients, up + down)", ylabel=label, title="per byte")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
