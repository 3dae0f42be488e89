"""Labelled data for fine-tuning: built-in data sets and users' own folders and files, all as
LabeledData (images kept small as uint8, or texts), plus the per-batch image preprocessing.
No torchvision: images are read with PIL and resized with torch."""
from pathlib import Path

from edgetune.data.core import LabeledData, batches, stratified_split
from edgetune.data.images import (FASHION_MNIST_CLASSES, ImagePreprocess, load_digits, load_digits_images,
                                  load_fashion_mnist, load_image_folder, load_numpy)
from edgetune.data.text import load_rotten_tomatoes, load_text_csv

__all__ = ["LabeledData", "ImagePreprocess", "load_data", "load_fashion_mnist", "load_digits",
           "load_image_folder", "load_numpy", "load_rotten_tomatoes", "load_text_csv",
           "load_digits_images", "batches", "stratified_split", "FASHION_MNIST_CLASSES"]

NAMED = {"fashion-mnist": load_fashion_mnist, "digits": load_digits, "rotten-tomatoes": load_rotten_tomatoes}
ACCEPTED = ("fashion-mnist, digits, rotten-tomatoes, a folder of images (root/<class>/*.png|jpg|..., "
            "or root/train/<class>/... with root/val/ or root/test/), a .npz file (arrays x, y[, classes]) "
            "or a .csv file (columns text, label)")


def load_data(spec: str, split: str = "train", strict: bool = False,
              classes: list[str] | None = None) -> LabeledData:
    """The data set that `spec` names.

    `split` ("train" or "test"; "val" for folders) is honoured where the source has its own
    splits: Fashion-MNIST and an image folder with train/ and val/ or test/. Every other
    source (digits, rotten-tomatoes, a flat folder, .npz, .csv) is returned whole whatever
    `split` says; hold part of it out with LabeledData.split(). `strict` (image folders) stops
    on an unreadable or non-image file instead of skipping it. `classes` (a .csv) are the class
    names its labels must be among: the training data's, when `spec` is held-out data."""
    name = spec.strip().lower().replace("_", "-")
    if name in NAMED:
        return load_fashion_mnist(split) if name == "fashion-mnist" else NAMED[name]()
    path = Path(spec).expanduser()
    if not path.exists():  # checked first: a missing .npz or .csv must not reach numpy's or open's own error
        raise ValueError(f"unknown data {spec!r} (no such file or folder); accepted: {ACCEPTED}")
    if path.is_dir():
        return load_image_folder(path, split=split, strict=strict)
    if path.suffix.lower() == ".npz":
        return load_numpy(path)
    if path.suffix.lower() == ".csv":
        return load_text_csv(path, classes=classes)
    raise ValueError(f"unknown data {spec!r}; accepted: {ACCEPTED}")
