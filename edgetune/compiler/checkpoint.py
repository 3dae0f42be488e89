"""A Trainer's checkpoint as one safetensors file: no pickle, so loading a file someone handed
you runs no code of theirs.

The trainer's state dict ({"step", "lr", "frozen", "model", "optimizer", "adapters"}) is
stored flat: tensors under "model/<name>", "optimizer/<parameter>:<state>", "adapters/<name>";
the step, the learning rate and whether frozen weights are included in the file's metadata.
A resumable run adds its own: random-generator states as tensors under "rng/<name>", and its
progress as JSON text under the metadata key "run" (edgetune.apps.runs). Tensors that share memory in the model (a tied
embedding and LM head) are stored once, the other names listed in the metadata as aliases.
A digest of every stored tensor (name, dtype, shape, bytes) in the metadata lets a load tell a
damaged file from a good one: safetensors checks the layout, not the data.
"""
from __future__ import annotations

import contextlib
import hashlib
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
                "frozen": json.dumps(bool(state.get("frozen", True))), "aliases": json.dumps(aliases),
                "digest": tensor_digest(tensors)}
    if "run" in state:
        metadata["run"] = json.dumps(state["run"])
    atomic_write(os.fspath(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_checkpoint(path: str | os.PathLike, device: torch.device) -> dict[str, Any]:
    """The state dict saved in `path`, its tensors on `device`; a ValueError naming the file
    where it is not a whole, undamaged edgetune checkpoint."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file {path}")
    for _ in range(5):
        # safetensors opens the path more than once: a writer that replaced the file meanwhile
        # (a run saving its next checkpoint) would hand us one file's header with the other's
        # data. Where the OS can name the file we opened (Linux's /proc/self/fd), every open
        # reads that one file; elsewhere, read again until the file stayed the same throughout.
        with _pinned(path) as pinned:
            before = _identity(pinned)
            try:
                with safe_open(pinned, framework="pt", device=str(device)) as f:
                    metadata = f.metadata() or {}
                    _check_format(path, metadata)
                    tensors = {key: f.get_tensor(key) for key in f.keys()}
            except SafetensorError as err:
                raise ValueError(_unreadable(path, err)) from None
            if _identity(pinned) == before:
                break
    if "digest" in metadata and metadata["digest"] != tensor_digest(tensors):
        raise _damaged(path, "its tensors do not match the digest written with them")
    try:
        return _state(tensors, metadata)
    except (KeyError, ValueError, TypeError) as err:
        raise _damaged(path, f"{type(err).__name__}: {err}") from None


def _state(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Any]:
    for alias, stored in json.loads(metadata.get("aliases", "{}")).items():
        tensors[alias] = tensors[stored]
    state: dict[str, Any] = {section: {} for section in SECTIONS}
    for key, t in tensors.items():
        section, _, name = key.partition("/")
        if section not in state:
            raise ValueError(f"unknown section {section!r} in tensor {key!r}")
        state[section][name] = t
    state.update(step=int(metadata["step"]), lr=float(metadata["lr"]), frozen=json.loads(metadata.get("frozen", "true")))
    if "run" in metadata:
        state["run"] = json.loads(metadata["run"])
    return state


@contextlib.contextmanager
def _pinned(path: str):
    """A path that names, until the block ends, the file `path` names now, whatever replaces it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        by_fd = f"/proc/self/fd/{fd}"
        yield by_fd if os.path.exists(by_fd) else path
    finally:
        os.close(fd)


def _identity(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A hash of every tensor's name, dtype, shape and bytes."""
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _unreadable(path: str, err: Exception) -> str:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic.startswith(b"PK"):  # a zip archive: what torch.save writes
        return (f"{path} was written by torch.save, not Trainer.save; it loads with "
                "trainer.load_state_dict(torch.load(path, weights_only=True))")
    return (f"{path} is damaged or cut short, or not a checkpoint at all ({err}): load an earlier checkpoint, "
            "or give a file Trainer.save wrote")


def _damaged(path: str, why: str) -> ValueError:
    return ValueError(f"{path} is a damaged edgetune checkpoint ({why}): load an earlier checkpoint")


def _check_format(path: str, metadata: dict[str, str]) -> None:
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is a safetensors file but not an edgetune checkpoint (no {FORMAT!r} in its "
                         "metadata): load model weights with load_state_dict, or give a file Trainer.save wrote")
    if metadata.get("version") != VERSION:
        raise ValueError(f"{path} is an edgetune checkpoint of version {metadata.get('version')!r}; this edgetune "
                         f"reads version {VERSION}")
