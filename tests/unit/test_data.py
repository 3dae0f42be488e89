"""edgetune.data: loaders on real data slices, stratified splits, batches, preprocessing."""
import numpy as np
import pytest
import torch
from PIL import Image

from edgetune.data import (FASHION_MNIST_CLASSES, ImagePreprocess, LabeledData, load_data, load_digits,
                           load_fashion_mnist, load_image_folder, load_numpy, load_rotten_tomatoes,
                           load_text_csv)


@pytest.fixture(scope="module")
def fashion_test():
    try:
        return load_fashion_mnist("test")
    except FileNotFoundError as e:
        pytest.skip(f"Fashion-MNIST not installed (make unpacks it into .venv/share/datasets): {e}")


def toy(n_per_class=(30, 10), seed=0) -> LabeledData:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    items = torch.arange(len(labels), dtype=torch.uint8).reshape(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    return LabeledData(items.contiguous(), labels, [f"c{i}" for i in range(len(n_per_class))])


# -- built-in data sets ----------------------------------------------------------------------

def test_fashion_mnist_test_split(fashion_test):
    d = fashion_test
    assert d.items.shape == (10000, 1, 28, 28) and d.items.dtype == torch.uint8
    assert d.labels.dtype == torch.int64 and d.labels.bincount().tolist() == [1000] * 10
    assert d.classes == FASHION_MNIST_CLASSES and d.classes[9] == "Ankle boot"
    assert 60 < d.items.float().mean() < 90  # mostly dark background, as Fashion-MNIST is


def test_fashion_mnist_missing_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr("edgetune.data.images.fashion_mnist_dirs", lambda: [tmp_path])
    with pytest.raises(FileNotFoundError, match="fetch-fashion-mnist.sh.*apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test")
    with pytest.raises(ValueError, match="'train' and 'test'"):
        load_fashion_mnist("validation")


def test_rotten_tomatoes_counts():
    d = load_rotten_tomatoes()
    assert len(d) == 12808 and d.labels.bincount().tolist() == [5405, 7403]
    assert d.classes == ["rotten", "fresh"] and isinstance(d.items[0], str)
    assert 80 < sum(map(len, d.items)) / len(d) < 140  # critic snippets of ~110 characters


def test_digits_as_uint8_images():
    d = load_digits()
    assert d.items.shape == (1797, 1, 8, 8) and d.items.dtype == torch.uint8
    assert d.items.max() == 255 and d.classes == [str(i) for i in range(10)]


# -- splits, subsets, batches ----------------------------------------------------------------

def test_split_is_stratified_exact_and_deterministic():
    d = toy((30, 10))
    rest, held = d.split(0.25, seed=3)
    assert held.labels.bincount().tolist() == [8, 2] and rest.labels.bincount().tolist() == [22, 8]
    # Disjoint and complete: items are unique ids.
    ids = torch.cat([rest.items[:, 0, 0, 0], held.items[:, 0, 0, 0]]).sort().values
    assert torch.equal(ids, torch.arange(40, dtype=torch.uint8))
    again = d.split(0.25, seed=3)[1]
    assert torch.equal(again.items, held.items) and not torch.equal(d.split(0.25, seed=4)[1].items, held.items)


def test_split_on_real_data_keeps_proportions():
    rest, held = load_rotten_tomatoes().split(0.1, seed=0)
    assert len(held) == 1281 and held.labels.bincount().tolist() == [541, 740]  # 540.6 : 740.4
    assert len(rest) + len(held) == 12808 and isinstance(held.items, list)


def test_take_is_stratified_with_exact_size(fashion_test):
    small = fashion_test.take(250, seed=1)
    assert len(small) == 250 and small.items.shape == (250, 1, 28, 28)
    assert sorted(small.labels.bincount().tolist()) == [25] * 10
    assert torch.equal(fashion_test.take(250, seed=1).labels, small.labels)
    with pytest.raises(ValueError, match="0 < n <= 10000"):
        fashion_test.take(10001)


def test_batches_drop_last_and_keep_it_for_evaluation():
    d = toy((7, 3))
    train = list(d.batches(4, shuffle=True, seed=1))
    assert len(train) == 2 and all(x.shape == (4, 1, 2, 2) and y.shape == (4,) for x, y in train)
    seen = torch.cat([x[:, 0, 0, 0] for x, _ in train])
    assert len(set(seen.tolist())) == 8
    assert torch.equal(seen, torch.cat([x[:, 0, 0, 0] for x, _ in d.batches(4, seed=1)]))
    evaluation = list(d.batches(4, shuffle=False, drop_last=False))
    assert [len(y) for _, y in evaluation] == [4, 4, 2]
    assert torch.cat([y for _, y in evaluation]).tolist() == d.labels.tolist()


def test_text_batches_are_lists_of_strings():
    d = LabeledData(["a", "b", "c"], torch.tensor([0, 1, 0]), ["x", "y"])
    (items, labels), = d.batches(2, shuffle=False)
    assert items == ["a", "b"] and labels.tolist() == [0, 1]


def test_labeled_data_rejects_mismatches():
    with pytest.raises(ValueError, match="3 items but 2 labels"):
        LabeledData(["a", "b", "c"], torch.tensor([0, 1]), ["x", "y"])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        LabeledData(["a"], torch.tensor([2]), ["x", "y"])


# -- image folders ---------------------------------------------------------------------------

def write_png(path, color, size=(40, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_image_folder_flat_round_trip(tmp_path):
    write_png(tmp_path / "cat" / "a.png", (255, 0, 0))
    write_png(tmp_path / "cat" / "b.PNG", (250, 0, 0))
    write_png(tmp_path / "dog" / "c.jpg", (0, 0, 255))
    write_png(tmp_path / "dog" / "grey.png", 128, mode="L")
    (tmp_path / "dog" / "notes.txt").write_text("not an image: skipped")
    d = load_image_folder(tmp_path, size=16)
    assert d.classes == ["cat", "dog"] and d.labels.tolist() == [0, 0, 1, 1]
    assert d.items.shape == (4, 3, 16, 16) and d.items.dtype == torch.uint8
    assert d.items[0, :, 8, 8].tolist() == [255, 0, 0]
    assert d.items[3].unique().tolist() == [128]  # greyscale converted to RGB
    assert abs(int(d.items[2, 2, 8, 8]) - 255) < 4  # JPEG, nearly pure blue
    assert torch.equal(load_data(str(tmp_path), split="test").labels, d.labels)  # flat: split ignored


def test_image_folder_train_val_layout(tmp_path):
    for split in ("train", "val"):
        for cls, color in (("ant", 10), ("bee", 200)):
            write_png(tmp_path / split / cls / f"{split}.png", (color,) * 3)
    write_png(tmp_path / "train" / "bee" / "more.png", (200,) * 3)
    train = load_image_folder(tmp_path, "train", size=8)
    val = load_data(str(tmp_path), split="test")  # test falls back to val/
    assert train.labels.tolist() == [0, 1, 1] and val.labels.tolist() == [0, 1]
    assert val.classes == ["ant", "bee"] and val.items.shape == (2, 3, 256, 256)


def test_image_folder_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "nope")
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_image_folder(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path)
    write_png(tmp_path / "empty_class" / "ok.png", (1, 2, 3))
    (tmp_path / "empty_class" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        load_image_folder(tmp_path, strict=True)


def test_image_folder_val_with_unknown_class(tmp_path):
    write_png(tmp_path / "train" / "a" / "x.png", (0, 0, 0))
    write_png(tmp_path / "val" / "zebra" / "x.png", (0, 0, 0))
    with pytest.raises(ValueError, match=r"classes that .*train lacks: \['zebra'\]"):
        load_image_folder(tmp_path, "val")


# -- .npz and .csv files ---------------------------------------------------------------------

def test_npz_layouts(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (6, 5, 7, 3), dtype=np.uint8)
    np.savez(tmp_path / "nhwc.npz", x=x, y=np.array([0, 1, 2, 0, 1, 2]), classes=np.array(["a", "b", "c"]))
    d = load_data(str(tmp_path / "nhwc.npz"))
    assert d.items.shape == (6, 3, 5, 7) and d.classes == ["a", "b", "c"]
    assert torch.equal(d.items[2, :, 1, 4], torch.from_numpy(x[2, 1, 4]))
    np.savez(tmp_path / "grey.npz", x=np.zeros((4, 9, 9), np.float32), y=np.array([0, 3, 1, 1]))
    grey = load_numpy(tmp_path / "grey.npz")
    assert grey.items.shape == (4, 1, 9, 9) and grey.items.dtype == torch.float32
    assert grey.classes == ["0", "1", "2", "3"]


@pytest.mark.parametrize("arrays, message", [
    (dict(x=np.zeros((4, 8, 8), np.uint8)), r"needs arrays 'x' and 'y', lacks \['y'\]"),
    (dict(x=np.zeros((4, 8, 8, 5), np.uint8), y=np.zeros(4, int)), r"C = 1 or 3, got \(4, 8, 8, 5\)"),
    (dict(x=np.zeros((4, 8, 8), np.uint8), y=np.zeros(3, int)), r"4 integer labels .*got .*\(3,\)"),
    (dict(x=np.zeros((4, 8, 8), np.uint8), y=np.zeros(4)), r"integer labels .*float64"),
    (dict(x=np.full((4, 8, 8), 2.0), y=np.zeros(4, int)), r"float images must lie in \[0, 1\]"),
    (dict(x=np.full((4, 8, 8), 300), y=np.zeros(4, int)), r"0\.\.255"),
    (dict(x=np.zeros((2, 8, 8), np.uint8), y=np.array([0, 2]), classes=np.array(["a", "b"])),
     "label 2 but only 2 class names"),
    (dict(x=np.zeros((2, 8, 8), np.uint8), y=np.array(["cat", "dog"])),
     r"'y' holds <U3 values; it must hold numbers \(y: integer labels 0..K-1, with the class names in an array"),
])
def test_npz_validation(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        load_numpy(tmp_path / "bad.npz")


def test_text_csv(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text('review,sentiment\n"great, really",pos\nawful,neg\nfine,pos\n')
    d = load_text_csv(path, "review", "sentiment")
    assert d.items == ["great, really", "awful", "fine"] and d.classes == ["neg", "pos"]
    assert d.labels.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match=r"no column\(s\) \['text', 'label'\]"):
        load_data(str(path))
    with_mark = tmp_path / "excel.csv"  # Excel's "CSV UTF-8" starts with a byte-order mark
    with_mark.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert load_text_csv(with_mark, "review", "sentiment").items == d.items


def test_load_data_dispatch_and_unknown():
    assert len(load_data("digits")) == 1797 and len(load_data("Rotten_Tomatoes").classes) == 2
    with pytest.raises(ValueError, match="unknown data 'cifar10' .*accepted: fashion-mnist, digits"):
        load_data("cifar10")


# -- preprocessing ---------------------------------------------------------------------------

def test_preprocess_shape_dtype_and_normalisation():
    grey = torch.full((5, 1, 28, 28), 255, dtype=torch.uint8)
    out = ImagePreprocess(32, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))(grey)
    assert out.shape == (5, 3, 32, 32) and out.dtype == torch.float32
    assert torch.allclose(out[:, 0], torch.ones(1)) and torch.allclose(out[:, 1], torch.full((1,), 3.0))
    floats = ImagePreprocess(8, 0.5, 0.5)(torch.zeros(2, 3, 8, 8))  # floats are already in [0, 1]
    assert torch.allclose(floats, -torch.ones(1))


def test_preprocess_downsamples_without_aliasing():
    checker = ((torch.arange(64)[:, None] + torch.arange(64)) % 2 * 255).to(torch.uint8)
    out = ImagePreprocess(16, 0.0, 1.0)(checker.expand(1, 3, 64, 64))
    assert torch.allclose(out, torch.full_like(out, 0.5), atol=0.02)  # averaged, not sampled


def test_preprocess_non_square_is_center_cropped():
    x = torch.zeros(1, 3, 10, 20, dtype=torch.uint8)
    x[..., 5:15] = 255  # the central 10x10 square
    assert torch.allclose(ImagePreprocess(10, 0.0, 1.0)(x), torch.ones(1))


def test_augmentation_is_seeded_and_light(fashion_test):
    x = fashion_test.items[:64]
    a, b = ImagePreprocess(28, 0.5, 0.5, augment=True, seed=7), ImagePreprocess(28, 0.5, 0.5, augment=True, seed=7)
    first = a(x)
    assert torch.equal(first, b(x)) and torch.equal(a(x), b(x))  # same seed, same sequence
    assert not torch.equal(first, a(x))  # a new draw each batch
    plain = ImagePreprocess(28, 0.5, 0.5)(x)
    assert first.shape == plain.shape == (64, 3, 28, 28)
    assert (first.mean() - plain.mean()).abs() < 0.1  # a crop and a flip, not a new image


def test_augmentation_flips_about_half():
    ramp = torch.arange(32, dtype=torch.uint8).mul(8).expand(200, 1, 32, 32)  # brighter to the right
    out = ImagePreprocess(32, 0.0, 1.0, augment=True, seed=0)(ramp)[:, 0, 16]
    rising = (out[:, -1] > out[:, 0]).float().mean()
    assert 0.35 < rising < 0.65
    steps = out.diff(dim=1)  # every row still a ramp, one way or the other: crops do not shuffle
    assert ((steps >= -1e-5).all(dim=1) | (steps <= 1e-5).all(dim=1)).all()


def test_split_keeps_an_item_on_each_side_of_a_tiny_data_set():
    two = LabeledData(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"])
    rest, held = two.split(0.2)  # round(0.4) would hold out nothing
    assert len(rest) == len(held) == 1
    rest, held = two.split(0.9)  # round(1.8) would leave nothing to train on
    assert len(rest) == len(held) == 1
    with pytest.raises(ValueError, match="cannot split 1 item"):
        two.subset(torch.tensor([0])).split(0.5)


def test_a_missing_file_is_named_before_its_reader_runs(tmp_path):
    for name in ("gone.npz", "gone.csv"):
        with pytest.raises(ValueError, match=f"unknown data '.*{name}' \\(no such file or folder\\)"):
            load_data(str(tmp_path / name))


def test_hidden_files_in_a_class_folder_are_skipped(tmp_path):
    write_png(tmp_path / "a" / "x.png", (1, 2, 3))
    write_png(tmp_path / "b" / "y.png", (4, 5, 6))
    (tmp_path / "a" / "._x.png").write_bytes(b"AppleDouble metadata")
    assert len(load_image_folder(tmp_path, size=8)) == 2
