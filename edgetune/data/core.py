"""LabeledData: one labelled data set (images or texts), its stratified splits and batches."""
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass
class LabeledData:
    """A labelled data set held in memory.

    items: a uint8 (or float in [0, 1]) image tensor [N, C, H, W], C = 1 or 3, at its stored size
    (resizing and normalising happen per batch, in ImagePreprocess), or a list of N texts.
    labels: int64 [N], each an index into `classes`."""
    items: torch.Tensor | list[str]
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self):
        if len(self.items) != len(self.labels):
            raise ValueError(f"{len(self.items)} items but {len(self.labels)} labels")
        if isinstance(self.items, torch.Tensor) and (self.items.dim() != 4 or self.items.shape[1] not in (1, 3)):
            raise ValueError(f"images must be [N, C, H, W] with C = 1 or 3, got {list(self.items.shape)}")
        if len(self.labels) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < len(self.classes):
            raise ValueError(f"labels must lie in [0, {len(self.classes)}) (one per class name)")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: torch.Tensor) -> "LabeledData":
        items = [self.items[i] for i in idx.tolist()] if isinstance(self.items, list) else self.items[idx]
        return LabeledData(items, self.labels[idx], list(self.classes))

    def split(self, fraction: float, seed: int = 0) -> tuple["LabeledData", "LabeledData"]:
        """(rest, held_out): `fraction` of every class held out (e.g. for validation). Each
        side keeps at least one item, so that a small data set still splits (2 items at 0.2
        hold out 1, not round(0.4) = 0)."""
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        if len(self) < 2:
            raise ValueError(f"cannot split {len(self)} item(s) into two non-empty parts: add data")
        n_held = min(max(1, round(len(self) * fraction)), len(self) - 1)
        rest, held = stratified_split(self.labels, n_held, seed)
        return self.subset(rest), self.subset(held)

    def take(self, n: int, seed: int = 0) -> "LabeledData":
        """A stratified subset of exactly n items, for quick tests and experiments."""
        if not 0 < n <= len(self):
            raise ValueError(f"take(n) needs 0 < n <= {len(self)}, got {n}")
        if n == len(self):
            return self
        return self.subset(stratified_split(self.labels, n, seed)[1])

    def batches(self, batch_size: int, shuffle: bool = True, seed: int = 0,
                drop_last: bool = True) -> Iterator[tuple[torch.Tensor | list[str], torch.Tensor]]:
        """(items, labels) batches. drop_last=True (training) keeps every batch the same shape,
        which a compiled step needs; use drop_last=False to evaluate on every item."""
        for idx in batch_indices(len(self), batch_size, shuffle, seed, drop_last):
            yield self.subset(idx).items, self.labels[idx]


def stratified_split(labels: torch.Tensor, n_held: int, seed: int):
    """(rest, held_out) index tensors, each shuffled so classes interleave.

    Every class holds out its proportional share of the n_held items; the shares are rounded
    by largest remainder so that the total is exact, which is what take(n) relies on."""
    g = torch.Generator().manual_seed(seed)
    classes, counts = labels.unique(return_counts=True)
    quota = _largest_remainder(counts, n_held)
    rest, held = [], []
    for c, k in zip(classes.tolist(), quota.tolist()):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        held.append(idx[:k])
        rest.append(idx[k:])
    rest, held = torch.cat(rest), torch.cat(held)
    return rest[torch.randperm(len(rest), generator=g)], held[torch.randperm(len(held), generator=g)]


def _largest_remainder(counts: torch.Tensor, total: int) -> torch.Tensor:
    """Integer shares of `total` proportional to `counts` that sum to exactly `total`."""
    exact = counts.double() * total / counts.sum()
    share = exact.floor().long()
    # Ties go to the lower class index (stable sort), so the result is deterministic.
    order = torch.sort(exact - share, descending=True, stable=True).indices
    share[order[:total - int(share.sum())]] += 1
    return share


def batch_indices(n: int, batch_size: int, shuffle: bool = True, seed: int = 0,
                  drop_last: bool = True) -> Iterator[torch.Tensor]:
    """Index tensors for one pass over n items; the order is fixed by `seed`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    stop = n - batch_size + 1 if drop_last else n
    for i in range(0, max(stop, 0), batch_size):
        yield order[i:i + batch_size]


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = True,
            seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x, y) batches of exactly `batch_size` (the remainder is dropped): a compiled
    step has fixed shapes, so a short last batch would be rejected. (Tensor-pair form of
    LabeledData.batches, kept for the demo and benchmarks.)"""
    for idx in batch_indices(len(x), batch_size, shuffle, seed, drop_last=True):
        yield x[idx], y[idx]

