"""Image data sets as LabeledData (uint8 [N, C, H, W] at a small stored size) and the
per-batch preprocessing (resize, normalise, light augmentation) that feeds a model."""
import gzip
import math
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from edgetune.data.core import LabeledData, stratified_split

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# -- Fashion-MNIST ---------------------------------------------------------------------------

def fashion_mnist_dirs() -> list[Path]:
    """Where Fashion-MNIST's idx files are looked for, in order."""
    dirs = [Path(os.environ["EDGETUNE_DATA"]) / "fashion-mnist"] if os.environ.get("EDGETUNE_DATA") else []
    return dirs + [Path(sys.prefix) / "share/datasets/fashion-mnist", Path("/usr/share/datasets/fashion-mnist")]


def load_fashion_mnist(split: str = "train") -> LabeledData:
    """Fashion-MNIST (60,000 train / 10,000 test greyscale 28x28 images, 10 classes)."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}")
    names = (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz")
    for d in fashion_mnist_dirs():
        if all((d / n).is_file() for n in names):
            images, labels = (read_idx(d / n) for n in names)
            return LabeledData(images.unsqueeze(1), labels.long(), list(FASHION_MNIST_CLASSES))
    dirs = fashion_mnist_dirs()
    raise FileNotFoundError(
        f"Fashion-MNIST ({names[0]}, {names[1]}) not found in: {', '.join(map(str, dirs)) or '(nowhere)'}. "
        f"Get it with `scripts/fetch-fashion-mnist.sh {dirs[0] if dirs else '<dir>'}` (no root needed) "
        f"or `apt-get install dataset-fashion-mnist`.")


def read_idx(path: Path) -> torch.Tensor:
    """One gzipped idx file (the MNIST format: big-endian header, then uint8 data)."""
    raw = gzip.open(path).read()
    magic = int.from_bytes(raw[:4], "big")
    ndim, dtype_code = magic & 0xFF, (magic >> 8) & 0xFF
    if magic >> 16 != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise ValueError(f"{path}: not a uint8 idx file (magic {magic:#010x})")
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    body = raw[4 + 4 * ndim:]
    if len(body) != math.prod(dims):
        raise ValueError(f"{path}: header says {dims} but holds {len(body)} bytes (truncated?)")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).view(dims)


# -- scikit-learn's digits -------------------------------------------------------------------

def load_digits() -> LabeledData:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes): the fallback data set that
    needs no download. Pixel values 0..16 are scaled to uint8 0..255."""
    from sklearn.datasets import load_digits as sk_digits  # imported here: sklearn is slow to import

    digits = sk_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)
    items = (images * (255 / 16)).round().to(torch.uint8).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    return LabeledData(items, labels, [str(d) for d in range(10)])


def load_digits_images(size: int = 32, channels: int = 3, seed: int = 0,
                       test_fraction: float = 0.2):
    """scikit-learn's digits as ready-made float tensors (for the demo and benchmarks).

    Returns (x_train, y_train, x_test, y_test): x float32 [N, channels, size, size], normalised
    with the training split's mean/std; y int64 [N]. The split is stratified per class and
    fixed by `seed`, so every run sees the same images."""
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # [N, 1, 8, 8]
    y = torch.tensor(digits.target, dtype=torch.int64)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.expand(-1, channels, -1, -1).contiguous()
    train, test = stratified_split(y, round(len(y) * test_fraction), seed)
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


# -- a folder of images, one sub-folder per class --------------------------------------------

def load_image_folder(path: str | os.PathLike, split: str = "train", size: int = 256, strict: bool = False,
                      log: Callable[[str], None] = print) -> LabeledData:
    """Images laid out as root/<class>/<image>, or split as root/train/<class>/<image> plus
    root/val/<class>/... or root/test/<class>/... .

    With the split layout, `split` picks the folder ("test" and "val" each fall back to the
    other); class names and their order always come from train/. With the flat layout the
    whole folder is returned whatever `split` says (hold out part of it with .split()).
    Every image is converted to RGB, scaled so its shorter side is `size` and centre-cropped
    to size x size, so that all stack into one uint8 tensor [N, 3, size, size]
    (3 * size**2 bytes each: keep `size` near the model's input size).

    A file in a class folder that is not an image (notes.txt) or cannot be decoded (truncated,
    empty, corrupt) is skipped, and one line through `log` counts them and names the first;
    with strict=True the first such file is an error instead. Operating-system bookkeeping
    (hidden files such as .DS_Store and ._name.png, Thumbs.db, desktop.ini) is ignored silently."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    train_dir, split_dir = _split_dirs(root, split)
    classes = _class_dirs(train_dir)
    unknown = sorted(set(_class_dirs(split_dir)) - set(classes))
    if unknown:
        raise ValueError(f"{split_dir} has classes that {train_dir} lacks: {unknown}")
    found = [(f, i) for i, c in enumerate(classes) for f in _class_files(split_dir / c)]
    files, strays = _image_suffixed(found, strict)
    items, labels, unreadable = _read_images(files, size, strict)
    skipped = sorted(strays + unreadable)  # in file order, so that "first" is the first one listed
    if not labels:
        which = "" if split_dir == root else f" (the {split!r} split)"
        skipped_too = f", only {len(skipped)} skipped file(s) {_first_skipped(skipped)}" if skipped else ""
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the class folders of {split_dir}{which}"
                         f"{skipped_too}: add images to them")
    if skipped:
        log(f"skipped {len(skipped)} unreadable or non-image file(s) in {split_dir} {_first_skipped(skipped)}; "
            "use --strict to stop on them")
    return LabeledData(items, torch.tensor(labels, dtype=torch.int64), classes)


def _first_skipped(skipped: list[tuple[Path, str]]) -> str:
    first, reason = skipped[0]
    return f"(first: {first}: {reason})"


def _split_dirs(root: Path, split: str) -> tuple[Path, Path]:
    """(folder that names the classes, folder to read) for the flat or the split layout."""
    if not (root / "train").is_dir() or not _class_dirs(root / "train", must=False):
        return root, root
    wanted = {"train": ["train"], "test": ["test", "val"], "val": ["val", "test"]}.get(split)
    if wanted is None:
        raise ValueError(f"split must be 'train', 'val' or 'test', not {split!r}")
    for name in wanted:
        if (root / name).is_dir():
            return root / "train", root / name
    raise FileNotFoundError(f"{root} has train/ but no {' or '.join(w + '/' for w in wanted)} for split {split!r}")


def _class_dirs(folder: Path, must: bool = True) -> list[str]:
    names = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if must and not names:
        raise ValueError(f"{folder} has no class sub-folders: expected {folder}/<class name>/<image files>")
    return names


# Files that operating systems leave beside a user's images: never data, so ignored even with
# strict=True (hidden names also cover macOS's .DS_Store and "._name.png" metadata files).
SYSTEM_FILES = {"thumbs.db", "desktop.ini"}


def _class_files(folder: Path) -> list[Path]:
    """The files of one class folder, sorted, without operating-system bookkeeping."""
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.iterdir()
                  if f.is_file() and not f.name.startswith(".") and f.name.lower() not in SYSTEM_FILES)


def _image_suffixed(found: list[tuple[Path, int]], strict: bool) -> tuple[list[tuple[Path, int]], list]:
    """(files with an image suffix, [(file, reason)] of the rest): sorted out by name, so that
    strict mode stops on a stray file before decoding anything."""
    images, skipped = [], []
    for f, label in found:
        if f.suffix.lower() in IMAGE_SUFFIXES:
            images.append((f, label))
            continue
        reason = f"not an image file (suffix {f.suffix or 'none'!r})"
        if strict:
            raise ValueError(f"{f}: {reason}; images end in {', '.join(sorted(IMAGE_SUFFIXES))}: move it out of "
                             "the class folder, or leave out --strict to skip it")
        skipped.append((f, reason))
    return images, skipped


def _read_images(files: list[tuple[Path, int]], size: int, strict: bool) -> tuple[torch.Tensor, list[int], list]:
    """(uint8 images [N, 3, size, size], their labels, [(file, reason)] of those that failed to
    decode): each file decoded once, into a tensor allocated up front and cut to the images
    read. With strict=True the first failure is an error."""
    items = torch.empty(len(files), 3, size, size, dtype=torch.uint8)
    labels, unreadable = [], []
    for f, label in files:
        try:
            items[len(labels)] = _read_image(f, size)
        except _UnreadableImage as e:
            if strict:
                raise ValueError(f"cannot read image {f}: {e}; remove or replace the file, or leave out --strict "
                                 "to skip it") from e
            unreadable.append((f, str(e)))
            continue
        labels.append(label)
    return items[:len(labels)], labels, unreadable


class _UnreadableImage(Exception):
    """A file with an image suffix that PIL cannot decode; the message says why."""


def _read_image(file: Path, size: int) -> torch.Tensor:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(file) as img:
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, still >= size
            img = ImageOps.fit(img.convert("RGB"), (size, size), Image.Resampling.BILINEAR)
    except UnidentifiedImageError as e:  # PIL's own message repeats the path
        reason = "empty file (0 bytes)" if file.stat().st_size == 0 else "not a known image format"
        raise _UnreadableImage(reason) from e
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise _UnreadableImage(str(e) or type(e).__name__) from e
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)


# -- arrays in a .npz file -------------------------------------------------------------------

def load_numpy(path: str | os.PathLike) -> LabeledData:
    """A .npz with `x` images (N,H,W | N,H,W,C | N,C,H,W; C = 1 or 3; uint8 0..255 or float in
    [0, 1]), `y` integer labels (N,) and optionally `classes` (K names; "0".."K-1" if absent)."""
    with _open_npz(path) as z:
        missing = {"x", "y"} - set(z.files)
        if missing:
            raise ValueError(f"{path}: needs arrays 'x' and 'y', lacks {sorted(missing)} (has {z.files})")
        x, y = _images_nchw(path, _tensor(path, "x", z["x"])), _tensor(path, "y", z["y"])
        classes = [str(c) for c in z["classes"]] if "classes" in z.files else None
    if len(x) == 0:
        raise ValueError(f"{path}: holds no images (x and y are empty)")
    if y.dim() != 1 or len(y) != len(x) or y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"{path}: y must be {len(x)} integer labels (shape ({len(x)},)), got {y.dtype} {tuple(y.shape)}")
    if len(y) and y.min() < 0:
        raise ValueError(f"{path}: labels must be >= 0, found {int(y.min())}")
    if not classes and int(y.max()) >= len(y):  # named before range(y.max()) builds class names for a typo
        raise ValueError(f"{path}: label {int(y.max())} at index {int(y.argmax())}, but {len(y)} items cannot fill "
                         f"{int(y.max()) + 1} classes; labels must number the classes 0..K-1 (or add `classes`)")
    classes = classes or [str(i) for i in range(int(y.max()) + 1)]
    if len(y) and int(y.max()) >= len(classes):
        raise ValueError(f"{path}: label {int(y.max())} but only {len(classes)} class names")
    return LabeledData(x, y.long(), classes)


def _tensor(path, name: str, array):
    """The array as a tensor, or what it holds and what the file needs (torch takes numbers only:
    class names as strings go in `classes`, with y their indices)."""
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{path}: '{name}' holds {array.dtype} values; it must hold numbers "
                         + ("(y: integer labels 0..K-1, with the class names in an array 'classes')" if name == "y"
                            else "(uint8 0..255 or float in [0, 1])"))
    return torch.from_numpy(array)


def _open_npz(path):
    import zipfile

    import numpy as np

    try:
        z = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .npz file ({e}); save one with numpy.savez(path, x=..., y=...)") from e
    if not isinstance(z, np.lib.npyio.NpzFile):  # a plain .npy renamed: one array, no names
        raise ValueError(f"{path}: holds one bare array, not named arrays; save with numpy.savez(path, x=..., y=...)")
    return z


def _images_nchw(path, x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 3:
        x = x.unsqueeze(1)
    elif x.dim() == 4 and x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"{path}: x must be (N,H,W), (N,H,W,C) or (N,C,H,W) with C = 1 or 3, got {tuple(x.shape)}")
    if x.is_floating_point():
        if len(x) and (x.min() < 0 or x.max() > 1):
            raise ValueError(f"{path}: float images must lie in [0, 1], found [{x.min():.3g}, {x.max():.3g}]")
        return x.float().contiguous()
    if x.dtype == torch.bool or (len(x) and (x.min() < 0 or x.max() > 255)):
        raise ValueError(f"{path}: integer images must lie in 0..255, got {x.dtype}")
    return x.to(torch.uint8).contiguous()


# -- per-batch preprocessing -----------------------------------------------------------------

class ImagePreprocess:
    """Stored images -> model input: float32 [B, 3, size, size], normalised by mean/std.

    uint8 batches are scaled by 1/255 (float batches are taken as already in [0, 1]); grey
    images are repeated to 3 channels; a non-square batch is centre-cropped to a square; the
    resize is bilinear with antialiasing, so downsampling does not alias. augment=True adds a
    light random-resized crop (area 80-100%, aspect 3/4..4/3) and a horizontal flip with
    probability 1/2, drawn from a generator seeded by `seed`: the same seed gives the same
    sequence of batches. All of it is vectorised over the batch."""

    def __init__(self, size: int, mean: Sequence[float] | float = IMAGENET_MEAN,
                 std: Sequence[float] | float = IMAGENET_STD, augment: bool = False, seed: int = 0):
        self.size, self.augment = size, augment
        self.mean = torch.tensor(mean, dtype=torch.float32).expand(3).reshape(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).expand(3).reshape(1, 3, 1, 1)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images [B, C, H, W] with C = 1 or 3, got {list(images.shape)}")
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        x = self._resize(_center_square(x))
        if self.augment:
            x = self._random_crop_flip(x)
        # Normalising broadcasts grey to 3 channels, after the resize: a third of the work.
        return ((x - self.mean) / self.std).contiguous()

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == self.size:
            return x
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                             align_corners=False, antialias=x.shape[-1] > self.size)

    def _random_crop_flip(self, x: torch.Tensor) -> torch.Tensor:
        """One affine grid per image: zoom into a random box (at most 1/0.8 = 1.25x per side,
        so plain bilinear sampling is enough) and mirror half of the images."""
        b, g = len(x), self.generator
        area = 0.8 + 0.2 * torch.rand(b, generator=g)
        log_ratio = (torch.rand(b, generator=g) * 2 - 1) * math.log(4 / 3)
        w = (area * log_ratio.exp()).sqrt().clamp(max=1)
        h = (area / log_ratio.exp()).sqrt().clamp(max=1)
        cx = (torch.rand(b, generator=g) * 2 - 1) * (1 - w)  # box centre, box stays inside
        cy = (torch.rand(b, generator=g) * 2 - 1) * (1 - h)
        flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _center_square(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    s = min(h, w)
    return x[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
