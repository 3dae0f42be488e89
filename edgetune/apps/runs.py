"""Runs that survive a kill: a run folder with its settings, a checkpoint every N steps and at
each evaluation, and `--resume RUN_DIR` to go on from the last one.

    RUN_DIR/run.json                      the command and its settings (what --resume starts from)
    RUN_DIR/checkpoint/state.safetensors  trainer state without the frozen weights, the random
                                          generators' states and the history so far
    RUN_DIR/model.safetensors, ...        the run's results, written when it ends

A checkpoint is one file written atomically, so a kill leaves the previous checkpoint or the
new one. The position in the data is the number of steps in the history: data order and
augmentation are drawn from seeded generators, so the loop replays the order and skips the
batches already trained on. A resumed run on the same machine and thread count ends with
bitwise the weights of an uninterrupted one.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
from dataclasses import asdict
from typing import Callable

import torch

from edgetune.files import write_json

RUN_FILE = "run.json"
CHECKPOINT = os.path.join("checkpoint", "state.safetensors")
# Options that say how to show a run, not what it computes: --resume may change them.
_PRESENTATION = {"resume", "no_progress", "checkpoint_every", "out"}


# -- the run folder and its settings ---------------------------------------------------------

def resume_settings(args: argparse.Namespace, defaults: argparse.Namespace) -> bool:
    """With --resume, take the run's settings from its folder into `args` (an option given with
    a value other than the run's is an error) and make the folder `args.out`. Returns whether
    this is a resumed run; a new one records its settings with `record_settings`."""
    if not args.resume:
        if args.out and os.path.exists(os.path.join(args.out, RUN_FILE)):
            raise ValueError(f"{args.out} holds a run already (its {RUN_FILE}): go on with it with --resume "
                             f"{args.out}, or give another --out")
        return False
    if args.out and os.path.abspath(args.out) != os.path.abspath(args.resume):
        raise ValueError(f"--resume {args.resume} goes on writing into that run's folder: drop --out {args.out}")
    saved = _read_run_file(args.resume, args.command)
    clashes = [f"--{k.replace('_', '-')} {getattr(args, k)!r} (the run has {saved[k]!r})"
               for k in saved if k not in _PRESENTATION and hasattr(args, k)
               and getattr(args, k) != getattr(defaults, k, None) and getattr(args, k) != saved[k]]
    if clashes:
        raise ValueError(f"--resume continues {args.resume} with its own settings, but {', '.join(clashes)} "
                         "was given: drop those options, or start a new run")
    for key, value in saved.items():
        if key not in _PRESENTATION:
            setattr(args, key, value)
    args.out = args.resume
    return True


def record_settings(args: argparse.Namespace, settings: argparse.Namespace) -> None:
    """A new run's folder gets its command and `settings` (the arguments as given), once the
    run has compiled: a command that fails on its input leaves no folder behind."""
    write_json(os.path.join(args.out, RUN_FILE), {"command": args.command, "settings": _settings(settings)})


def _settings(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("func", "command") and not callable(v)}


def _read_run_file(folder: str, command: str) -> dict:
    path = os.path.join(folder, RUN_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume {folder}: no {RUN_FILE} there; give the folder of a run that "
                                f"`edgetune {command}` started (its --out)")
    try:
        with open(path) as f:
            run = json.load(f)
        settings = run["settings"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--resume {folder}: {path} is not a run file ({err}); start a new run") from None
    if run.get("command") != command:
        raise ValueError(f"--resume {folder}: that run was started by `edgetune {run.get('command')}`, "
                         f"not `edgetune {command}`; resume it with that command")
    return settings


# -- checkpoints -----------------------------------------------------------------------------

class Checkpoints:
    """Saves and restores the state of a training loop in `folder`/checkpoint: the trainer's
    trained tensors and optimizer state, `generators` (torch's default one is always
    included) and the history. `every` steps (0: only at evaluations and the end)."""

    def __init__(self, folder: str, trainer, every: int, generators: dict[str, torch.Generator] | None = None):
        if every < 0:
            raise ValueError(f"--checkpoint-every must be 0 (only at evaluations) or a number of steps, got {every}")
        self.path = os.path.join(folder, CHECKPOINT)
        self._lock = _lock_run(folder)
        self.trainer, self.every = trainer, every
        self.generators = {"torch": torch.default_generator, **(generators or {})}
        self.frozen_digest = frozen_digest(trainer)
        _remove_partial_writes(os.path.dirname(self.path))

    def due(self, steps: int) -> bool:
        return self.every > 0 and steps % self.every == 0

    def save(self, history) -> None:
        from edgetune.compiler.checkpoint import save_checkpoint

        state = self.trainer.state_dict(frozen=False)
        state["rng"] = {name: g.get_state() for name, g in self.generators.items()}
        state["run"] = {"history": asdict(history), "frozen_digest": self.frozen_digest}
        save_checkpoint(state, self.path)

    def restore(self, history_type: Callable[..., object]):
        """The history of the last checkpoint, with the trainer and generators as they were
        then; None where the run has no checkpoint yet (it starts over)."""
        from edgetune.compiler.checkpoint import load_checkpoint

        if not os.path.exists(self.path):
            return None
        state = load_checkpoint(self.path, self.trainer.device)
        run = state.get("run")
        if run is None or state.get("frozen", True):
            raise ValueError(f"{self.path} is a trainer checkpoint, not a run's; start a new run")
        if run["frozen_digest"] != self.frozen_digest:
            raise ValueError(f"the frozen weights differ from those {self.path} was trained on (another model "
                             "file or version?): resume with the same model, or start a new run")
        if set(state["rng"]) != set(self.generators):
            raise ValueError(f"{self.path} holds random states {sorted(state['rng'])}, this run has "
                             f"{sorted(self.generators)}: resume with the same command and settings")
        self.trainer.load_state_dict(state)  # checks names and shapes before changing anything
        for name, g in self.generators.items():
            g.set_state(state["rng"][name])
        return history_type(**run["history"])


def frozen_digest(trainer) -> str:
    """A hash of every weight the run does not train (int8 ones included): a resume must start
    from the same frozen weights, which the checkpoint does not store."""
    from edgetune.compiler.checkpoint import tensor_digest

    written = trainer.written_names()
    tensors = {k: v for k, v in trainer.model.state_dict().items() if k not in written and k not in trainer.int8}
    for name, (values, scales) in trainer.int8.items():
        tensors[name], tensors[name + ":scales"] = values, scales
    return tensor_digest(tensors)


def _lock_run(folder: str):
    """An open file holding an exclusive lock on the run folder while this process lives (the
    system drops it when the process ends, killed or not): two processes writing one run's
    checkpoints would interleave them."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        return None
    os.makedirs(folder, exist_ok=True)
    lock = open(os.path.join(folder, ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise ValueError(f"another edgetune process is training the run in {folder}: wait for it to end or "
                         "stop it, then resume") from None
    return lock


def _remove_partial_writes(folder: str) -> None:
    """A kill while writing leaves atomic_write's temporary file: never read, only in the way."""
    for tmp in glob.glob(os.path.join(folder, ".edgetune-*.tmp")):
        os.unlink(tmp)
