"""A Trainer's checkpoint as one safetensors file: no pickle, so loading a file someone handed
you runs no code of theirs.

The trainer's state dict ({"step", "lr", "frozen", "model", "optimizer", "adapters"}) is
stored flat: tensors under "model/<name>", "optimizer/<parameter>:<state>", "adapters/<name>";
the step, the learning rate and whether frozen weights are included in the file's metadata.
A resumable run adds its own: random-generator states as tensors under "rng/<name>", and its
progress as JSON text under the metadata key "run" (edgetune.apps.runs). Tensors that share memory in the model (a tied
embedding and LM head) are stored once, the other names listed in the metadata as aliases.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from edgetune.files import atomic_write

FORMAT = "edgetune-checkpoint"
VERSION = "1"
SECTIONS = ("model", "optimizer", "adapters", "rng")


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write `state` atomically: a crash leaves the old file or the new, never half of one."""
    from safetensors.torch import save_file

    tensors, aliases = {}, {}
    first_of: dict[tuple, str] = {}  # (storage, offset, shape, stride) -> the name it was stored under
    storages = set()
    for section in SECTIONS:
        for name, t in state.get(section, {}).items():
            key, t = f"{section}/{name}", t.detach()
            storage = t.untyped_storage().data_ptr()
            where = (storage, t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            if where in first_of:
                aliases[key] = first_of[where]
                continue
            first_of[where] = key
            # Another part of a storage already stored (safetensors refuses shared memory): a copy.
            tensors[key] = t.clone() if storage in storages else t.contiguous()
            storages.add(storage)
    metadata = {"format": FORMAT, "version": VERSION, "step": str(int(state["step"])), "lr": repr(float(state["lr"])),
                "frozen": json.dumps(bool(state.get("frozen", True))), "aliases": json.dumps(aliases)}
    if "run" in state:
        metadata["run"] = json.dumps(state["run"])
    atomic_write(os.fspath(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_checkpoint(path: str | os.PathLike, device: torch.device) -> dict[str, Any]:
    """The state dict saved in `path`, its tensors on `device`."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file {path}")
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            _check_format(path, metadata)
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"{path} is not an edgetune checkpoint ({err}). Checkpoints are safetensors files "
                         "written by Trainer.save; one written by torch.save loads with "
                         "trainer.load_state_dict(torch.load(path, weights_only=True))") from None
    for alias, stored in json.loads(metadata.get("aliases", "{}")).items():
        tensors[alias] = tensors[stored]
    state: dict[str, Any] = {section: {} for section in SECTIONS}
    for key, t in tensors.items():
        section, _, name = key.partition("/")
        state[section][name] = t
    state.update(step=int(metadata["step"]), lr=float(metadata["lr"]), frozen=json.loads(metadata.get("frozen", "true")))
    if "run" in metadata:
        state["run"] = json.loads(metadata["run"])
    return state


def _check_format(path: str, metadata: dict[str, str]) -> None:
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is a safetensors file but not an edgetune checkpoint (no {FORMAT!r} in its "
                         "metadata): load model weights with load_state_dict, or give a file Trainer.save wrote")
    if metadata.get("version") != VERSION:
        raise ValueError(f"{path} is an edgetune checkpoint of version {metadata.get('version')!r}; this edgetune "
                         f"reads version {VERSION}")
