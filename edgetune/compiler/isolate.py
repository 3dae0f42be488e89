"""Compile in a forked child process, so the training process stays lean.

torch.export loads tens of MB of modules and caches that a training step never needs (about
50 MB for MobileNetV2 here). Forking shares the model copy-on-write; the child traces and
compiles, sends back the finished graph (plain data, pickled) and exits, taking that memory
with it. Where forking is not safe -- no fork() on this platform, a CUDA model (CUDA does not
survive a fork), other Python threads alive (a Flower server or Ray actor: a thread that
holds a lock at the fork, an import's module lock say, leaves the child waiting on it forever),
or EDGETUNE_COMPILE_IN_PROCESS=1 -- the same function runs in-process.
"""
from __future__ import annotations

import gc
import os
import pickle
import sys
import threading
import traceback
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def fork_is_safe() -> bool:
    """This platform forks, and this process runs no other Python thread (once tqdm's idle
    monitor is stopped)."""
    if not hasattr(os, "fork"):
        return False
    _stop_tqdm_monitors()
    return threading.active_count() == 1


def _stop_tqdm_monitors() -> None:
    """Any tqdm progress bar, torch.fx's silent ones in an in-process compile included, starts
    a monitor thread that wakes every 10 s and takes tqdm's lock for a moment: forked then,
    the child would wait on that lock forever. tqdm starts a new one with its next bar."""
    if "tqdm" not in sys.modules:
        return
    from tqdm._monitor import TMonitor

    for thread in threading.enumerate():
        if isinstance(thread, TMonitor):
            thread.exit()  # wakes it and joins it


def can_fork(device: torch.device) -> bool:
    return (fork_is_safe() and device.type == "cpu"
            and os.environ.get("EDGETUNE_COMPILE_IN_PROCESS", "0") in ("", "0"))


def run_isolated(fn: Callable[[], T], device: torch.device) -> T:
    """fn() -- in a forked child when that is safe; its exceptions are re-raised here."""
    return in_child(fn) if can_fork(device) else fn()


_warmed = False  # this process (or the one it was forked from) has exported once


def warm_forked_compiles(model: torch.nn.Module, loss_fn: Callable, inputs: tuple, targets: tuple) -> None:
    """Export `model` in this process, once (later calls return at once), so that the compiles
    forked from it afterwards start warm: torch.export builds its tables and caches on its first
    trace, and each forked child would build them again. Measured on the search's contribution
    runs: a forked compile about 3x faster for the small ResNet, 1.6x for MiniLM. It costs this
    process about 100 MB (the export's modules and caches), so only a process that compiles many
    steps calls it: a search's contribution runs, at the first one that is not cached.
    (`finetune --scheme auto` then trains in a process that holds them; where those MB matter,
    search with `edgetune search` and train the scheme file.) Where compiles run in-process
    anyway, the first one warms them."""
    global _warmed
    if _warmed or not can_fork(next((p.device for p in model.parameters()), torch.device("cpu"))):
        return
    from edgetune.compiler.frontend.torch import export

    export(model, loss_fn, inputs, targets)
    _warmed = True


def in_child(fn: Callable[[], T]) -> T:
    """fn() in a forked child (always; the caller checked that forking is safe); its result
    comes back pickled, its exceptions are re-raised here."""
    sys.stdout.flush()
    sys.stderr.flush()
    read, write = os.pipe()
    # Everything alive now is frozen out of the child's garbage collector: a collection there
    # would run the finalizers of the parent's garbage (say, an onnxruntime session in a
    # traceback's reference cycle), and a finalizer that joins the parent's threads, which do
    # not exist in the child, never returns.
    gc.freeze()
    pid = os.fork()
    if pid == 0:
        _child(fn, read, write)
    gc.unfreeze()
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        raise RuntimeError(f"the forked process died (wait status {status}); for a compile, run with "
                           "EDGETUNE_COMPILE_IN_PROCESS=1 to see why")
    ok, value = pickle.loads(data)
    if not ok:
        raise value
    return value


def _child(fn: Callable, read: int, write: int) -> None:
    os.close(read)
    torch.set_num_threads(1)  # the parent's thread pool does not exist here; stay single-threaded
    try:
        payload = pickle.dumps((True, fn()))
    except BaseException as err:  # noqa: BLE001 -- every failure goes back to the parent
        payload = _pickled_error(err)
    with os.fdopen(write, "wb") as f:
        f.write(payload)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _pickled_error(err: BaseException) -> bytes:
    """The child's exception as the parent will raise it: itself where it pickles back with its
    type and message (some, torch's tracing errors among them, come back with an empty
    message), else a RuntimeError that starts with its type and message."""
    try:
        payload = pickle.dumps((False, err))
        back = pickle.loads(payload)[1]
        if type(back) is type(err) and str(back) == str(err):
            return payload
    except Exception:  # noqa: BLE001 -- an exception that does not pickle is described instead
        pass
    described = RuntimeError(f"{type(err).__name__}: {err}")
    described.add_note("in the forked compile:\n" + "".join(traceback.format_exception(err)).rstrip())
    return pickle.dumps((False, described))
