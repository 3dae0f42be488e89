"""Small data sets that need no download, for demos and end-to-end tests."""
from typing import Iterator

import torch
import torch.nn.functional as F


def load_digits_images(size: int = 32, channels: int = 3, seed: int = 0,
                       test_fraction: float = 0.2):
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes) as image tensors.

    Returns (x_train, y_train, x_test, y_test): x float32 [N, channels, size, size], normalised
    with the training split's mean/std; y int64 [N]. The split is stratified per class and
    fixed by `seed`, so every run sees the same images."""
    from sklearn.datasets import load_digits  # imported here: only the demo and tests need it

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # [N, 1, 8, 8]
    y = torch.tensor(digits.target, dtype=torch.int64)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.expand(-1, channels, -1, -1).contiguous()
    train, test = _stratified_split(y, test_fraction, seed)
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


def _stratified_split(y: torch.Tensor, test_fraction: float, seed: int):
    """Hold out the same fraction of every class, then shuffle so classes interleave."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in y.unique():
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = round(len(idx) * test_fraction)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train, test = torch.cat(train), torch.cat(test)
    train = train[torch.randperm(len(train), generator=g)]
    return train, test[torch.randperm(len(test), generator=g)]


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = True,
            seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x, y) batches of exactly `batch_size` (the remainder is dropped): a compiled
    step has fixed shapes, so a short last batch would be rejected."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g) if shuffle else torch.arange(len(x))
    for i in range(0, len(x) - batch_size + 1, batch_size):
        idx = order[i:i + batch_size]
        yield x[idx], y[idx]
