"""What a Trainer trains, as named tensors: the only part of a model a federated round moves.

A trained tensor travels whole (a trained parameter, a LoRA adapter, an embedding table under
a 'touched' rows rule, whose rows change with every batch) or as its chosen channels only (a
ratio or rows rule: `index_select` along the slice's axis; the frozen channels never leave the
node). No Flower here: edgetune.federated.records puts these tensors into an ArrayRecord.

    layout = slices.layout(trainer)      # {name: Slice}, in the trainer's update order
    sent = slices.read(trainer)          # {name: tensor of exactly the trained entries}
    slices.write(trainer, received)      # checked in full first; refused without a change
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch


class SliceError(ValueError):
    """A received set of trained tensors that does not match this trainer's: nothing was written."""


@dataclass(frozen=True)
class Slice:
    """One trained tensor's travelling part: `name` (a parameter or LoRA adapter), the shape
    and dtype of what travels, and, for a partially trained weight, the `axis` and sorted
    `index` of its chosen channels (None: the tensor travels whole)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    axis: int | None = None
    index: torch.Tensor | None = None
    adapter: bool = False

    @property
    def entries(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.entries * torch.empty((), dtype=self.dtype).element_size()

    @property
    def channels(self) -> list[int] | None:
        return None if self.index is None else [int(i) for i in self.index.tolist()]


def held_tensors(trainer) -> dict[str, torch.Tensor]:
    """The tensors a step updates in place, by update name: model parameters and LoRA adapters."""
    return {**dict(trainer.model.named_parameters(remove_duplicate=False)), **trainer.adapters}


def layout(trainer) -> dict[str, Slice]:
    """{name: Slice} of every tensor `trainer` trains, in its update order."""
    held = held_tensors(trainer)
    out = {}
    for u in trainer.updates:
        t = held[u.name]
        part = u.part
        if part is None or part.touched:
            out[u.name] = Slice(u.name, tuple(t.shape), t.dtype, adapter=u.name in trainer.adapters)
            continue
        index = part.index.attrs["value"].detach().to("cpu", torch.int64)
        shape = list(t.shape)
        shape[part.axis] = int(index.numel())
        out[u.name] = Slice(u.name, tuple(shape), t.dtype, part.axis, index, adapter=u.name in trainer.adapters)
    return out


def read(trainer, layout_: Mapping[str, Slice] | None = None) -> dict[str, torch.Tensor]:
    """{name: a CPU copy of exactly the trained entries of that tensor}."""
    layout_ = layout(trainer) if layout_ is None else layout_
    held = held_tensors(trainer)
    out = {}
    with torch.no_grad():
        for name, s in layout_.items():
            t = held[name].detach()
            if s.index is not None:
                t = t.index_select(s.axis, s.index.to(t.device))
            out[name] = t.to("cpu").contiguous().clone()
    return out


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype a torch dtype travels as; bfloat16 and the like have none."""
    try:
        return torch.empty((), dtype=dtype).numpy().dtype
    except TypeError:
        raise SliceError(f"dtype {dtype} has no numpy equivalent, so it cannot travel in a Flower ArrayRecord "
                         "(compile the model in float32 or float64)") from None


def check(layout_: Mapping[str, Slice], arrays: Mapping[str, np.ndarray], what: str = "received tensors") -> None:
    """Raise SliceError unless `arrays` holds exactly the tensors of `layout_`, each with the
    slice's shape and dtype and only finite values. Names every offending tensor."""
    missing = [n for n in layout_ if n not in arrays]
    extra = [n for n in arrays if n not in layout_]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(map(repr, missing))}")
    if extra:
        problems.append(f"not trained here {', '.join(map(repr, extra))}")
    for name, s in layout_.items():
        if name not in arrays:
            continue
        a = arrays[name]
        want_dtype = numpy_dtype(s.dtype)
        if not isinstance(a, np.ndarray):
            problems.append(f"{name!r} is a {type(a).__name__}, not an array")
        elif tuple(a.shape) != s.shape:
            where = "" if s.index is None else f" ({len(s.index)} chosen channels on axis {s.axis})"
            problems.append(f"{name!r} has shape {tuple(a.shape)}, this trainer trains {s.shape}{where}")
        elif a.dtype != want_dtype:
            problems.append(f"{name!r} is {a.dtype}, this trainer trains {want_dtype}")
        elif a.dtype.kind in "fc" and not np.isfinite(a).all():
            problems.append(f"{name!r} holds NaN or infinite values")
    if problems:
        raise SliceError(f"{what} refused, nothing was changed: " + "; ".join(problems))


def write(trainer, arrays: Mapping[str, np.ndarray], layout_: Mapping[str, Slice] | None = None,
          what: str = "received tensors") -> None:
    """Put `arrays` into the trainer's tensors: the whole tensor, or its chosen channels (the
    frozen entries are not touched). Everything is checked first (check()); a refused set
    changes nothing."""
    layout_ = layout(trainer) if layout_ is None else layout_
    check(layout_, arrays, what)
    held = held_tensors(trainer)
    with torch.no_grad():
        for name, s in layout_.items():
            t = held[name]
            value = torch.from_numpy(np.array(arrays[name])).to(t.device)  # a copy: Flower's arrays may be read-only
            if s.index is None:
                t.copy_(value)
            else:
                t.index_copy_(s.axis, s.index.to(t.device), value)


def check_channels(layout_: Mapping[str, Slice], channels: Mapping[str, list[int]], what: str = "sender") -> None:
    """Raise SliceError unless the sender chose the same channels as this trainer for every
    partially trained tensor (equal shapes alone would let channel j land on channel i)."""
    ours = {n: s.channels for n, s in layout_.items() if s.index is not None}
    differ = sorted(n for n in ours.keys() | channels.keys() if ours.get(n) != (
        None if channels.get(n) is None else [int(i) for i in channels[n]]))
    if differ:
        raise SliceError(f"the {what} trains other channels than this trainer in {', '.join(map(repr, differ))} "
                         "(the models were not built from the same weights, or the schemes differ); "
                         "nothing was changed")


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the whole state_dict (parameters and buffers): what a round would move per
    client, each way, if it sent the model as Flower's quickstart does."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
