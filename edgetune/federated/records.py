"""A Trainer's trained tensors <-> a Flower ArrayRecord (edgetune.federated.slices says which).

    record = to_record(trainer)          # exactly the trained entries, nothing frozen
    load_record(trainer, record)         # strict: missing, extra, misshaped, mistyped or
                                         # non-finite tensors are refused before any write
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from edgetune.federated import slices
from edgetune.federated.slices import Slice, SliceError


def to_record(trainer, layout: Mapping[str, Slice] | None = None) -> ArrayRecord:
    """An ArrayRecord of `trainer`'s trained tensors: whole trained parameters and LoRA
    adapters, the chosen channels alone of a partially trained weight."""
    layout = slices.layout(trainer) if layout is None else layout
    for s in layout.values():
        slices.numpy_dtype(s.dtype)  # refuses bfloat16 and the like with a clear message
    return ArrayRecord({name: Array(t.numpy()) for name, t in slices.read(trainer, layout).items()})


def arrays_of(record: ArrayRecord, what: str = "received record") -> dict[str, np.ndarray]:
    """{name: ndarray} of a record; a tensor that is not a numpy-serialized array is refused by name."""
    if not isinstance(record, ArrayRecord):
        raise SliceError(f"{what} refused: expected a Flower ArrayRecord, got {type(record).__name__}")
    out = {}
    for name, a in record.items():
        try:
            out[name] = a.numpy()
        except Exception as err:  # another serialization type, or bytes np.load cannot read
            raise SliceError(f"{what} refused, nothing was changed: {name!r} cannot be read as an array "
                             f"({type(err).__name__}: {err})") from None
    return out


def load_record(trainer, record: ArrayRecord, layout: Mapping[str, Slice] | None = None,
                channels: Mapping[str, list[int]] | None = None, what: str = "received record") -> None:
    """Write a received record into `trainer`'s trained tensors (frozen entries untouched).
    Refused with a SliceError naming the tensors, and the trainer unchanged, unless it holds
    exactly this trainer's trained tensors with their shapes and dtypes and finite values.
    `channels` ({name: chosen channels} from the sender, edgetune.federated.client sends
    them in the message's config) must then match this trainer's choice too."""
    layout = slices.layout(trainer) if layout is None else layout
    if channels is not None:
        slices.check_channels(layout, channels)
    slices.write(trainer, arrays_of(record, what), layout, what)


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of the tensors' entries (entries x itemsize), without Flower's per-array framing."""
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in record.values())


def wire_bytes(record: ArrayRecord) -> int:
    """Flower's own count (ArrayRecord.count_bytes): the serialized arrays with their .npy
    headers, and the keys."""
    return int(record.count_bytes())
