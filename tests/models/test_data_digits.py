import torch

from edgetune.data import batches, load_digits_images


def test_digits_shapes_classes_and_normalisation():
    x_train, y_train, x_test, y_test = load_digits_images(size=32, channels=3)
    assert x_train.shape == (1438, 3, 32, 32) and x_test.shape == (359, 3, 32, 32)
    assert y_train.dtype == torch.int64 and y_train.shape == (1438,) and y_test.shape == (359,)
    assert set(y_train.tolist()) == set(y_test.tolist()) == set(range(10))
    assert abs(x_train.mean().item()) < 1e-4 and abs(x_train.std().item() - 1) < 1e-4
    # Stratified: each class holds out 20% of its ~180 images.
    assert y_test.bincount().min() >= 35


def test_digits_is_deterministic_and_sized():
    a = load_digits_images(size=16, channels=1, seed=3)
    b = load_digits_images(size=16, channels=1, seed=3)
    assert a[0].shape == (1438, 1, 16, 16)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_batches_are_full_and_fixed_shape():
    x, y = torch.arange(10.0).reshape(10, 1), torch.arange(10)
    got = list(batches(x, y, batch_size=4, shuffle=False))
    assert [b[1].tolist() for b in got] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    shuffled = list(batches(x, y, batch_size=4, shuffle=True, seed=1))
    assert len(shuffled) == 2 and all(b[0].shape == (4, 1) for b in shuffled)
    labels = torch.cat([b[1] for b in shuffled])
    assert len(set(labels.tolist())) == 8  # distinct samples, no repeats
    again = torch.cat([b[1] for b in batches(x, y, batch_size=4, shuffle=True, seed=1)])
    assert torch.equal(labels, again)
