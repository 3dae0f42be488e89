"""`edgetune finetune` and `finetune-lm` with --resume: a run SIGKILLed in a real process after a
few steps, resumed by a new one, ends with bitwise the weights and losses of an uninterrupted
run; a resume that cannot continue the run says why before anything loads."""
import json
import os
import signal
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from edgetune.cli import main
from tests.unit.test_lm import write_chats

# A new process with this edgetune on the path, the same thread count as this one (so that
# its kernels compute bitwise the same), which SIGKILLs itself when STEPPER's step ("module:Class":
# the Trainer, or a schedule that steps like one) is about to run with KILL_AT steps done.
DRIVER = """
import importlib, os, signal, sys
import torch
module, name = os.environ["STEPPER"].split(":")
stepper = getattr(importlib.import_module(module), name)
torch.set_num_threads(int(os.environ["THREADS"]))
kill_at, step = int(os.environ["KILL_AT"]), stepper.step

def step_or_die(self, *args, **kwargs):
    if self.steps == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, *args, **kwargs)

stepper.step = step_or_die
from edgetune.cli import main
sys.exit(main(sys.argv[1:]))
"""
TRAINER = "edgetune.compiler.trainer:Trainer"


@pytest.fixture(autouse=True)
def quick_plan(monkeypatch):
    monkeypatch.setenv("EDGETUNE_MEASURE_SCRATCH", "0")  # a plan from estimates: same numbers, less time


def _killed_at(args: list[str], steps_done: int, stepper: str = TRAINER) -> int:
    env = dict(os.environ, KILL_AT=str(steps_done), STEPPER=stepper, THREADS=str(torch.get_num_threads()),
               PYTHONPATH=os.getcwd())
    return subprocess.run([sys.executable, "-c", DRIVER, *args], env=env, capture_output=True).returncode


def _same_tensors(a: str, b: str) -> bool:
    x, y = safetensors.torch.load_file(a), safetensors.torch.load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _losses(folder) -> list[float]:
    return json.loads((folder / "history.json").read_text())["losses"]


def test_finetune_killed_then_resumed_ends_as_if_never_stopped(tmp_path, capsys):
    run = ["finetune", "--model", "resnet", "--data", "digits", "--size", "16", "--batch", "8", "--train-limit", "48",
           "--val-limit", "16", "--epochs", "2", "--optimizer", "adamw", "--scheme", "full", "--no-progress",
           "--checkpoint-every", "1"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    assert _killed_at(run + ["--out", str(killed)], steps_done=8) == -signal.SIGKILL  # in epoch 2 of 6 steps each
    assert not (killed / "model.safetensors").exists() and (killed / "checkpoint").is_dir()
    assert main(["finetune", "--resume", str(killed), "--no-progress"]) == 0
    assert f"resuming {killed}" in capsys.readouterr().out
    assert main(run + ["--out", str(whole)]) == 0
    assert _losses(killed) == _losses(whole) and len(_losses(whole)) == 12
    assert _same_tensors(killed / "model.safetensors", whole / "model.safetensors")


def test_finetune_lm_killed_then_resumed_ends_as_if_never_stopped(tmp_path):
    run = ["finetune-lm", "--model", "tiny-llama", "--data", write_chats(tmp_path / "c.jsonl"), "--scheme", "lm-sparse:1",
           "--steps", "6", "--batch", "4", "--seq-len", "32", "--lr", "3e-3", "--val-count", "4", "--eval-every", "4",
           "--checkpoint-every", "2", "--no-progress"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    assert _killed_at(run + ["--out", str(killed)], steps_done=3) == -signal.SIGKILL  # checkpoint of step 2
    assert main(["finetune-lm", "--resume", str(killed)]) == 0
    assert main(run + ["--out", str(whole)]) == 0
    assert _losses(killed) == _losses(whole) and len(_losses(whole)) == 6
    assert _same_tensors(killed / "trained.safetensors", whole / "trained.safetensors")


def test_a_resume_that_cannot_continue_says_why(tmp_path, capsys):
    assert main(["finetune", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "no run.json there" in capsys.readouterr().err
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "run.json").write_text(json.dumps({"command": "finetune-lm", "settings": {"lr": 0.1}}))
    assert main(["finetune", "--resume", str(tmp_path / "lm")]) == 2
    assert "started by `edgetune finetune-lm`" in capsys.readouterr().err
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "run.json").write_text(json.dumps({"command": "finetune", "settings": {"lr": 0.1, "epochs": 3}}))
    assert main(["finetune", "--resume", str(tmp_path / "ft"), "--lr", "0.5"]) == 2
    assert "--lr 0.5 (the run has 0.1)" in capsys.readouterr().err
    assert main(["finetune", "--resume", str(tmp_path / "ft"), "--out", str(tmp_path / "else")]) == 2
    assert "drop --out" in capsys.readouterr().err
    assert main(["finetune", "--out", str(tmp_path / "ft")]) == 2  # a new run never lands on an old one
    assert "holds a run already" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "run.json").write_text("{")
    assert main(["finetune", "--resume", str(tmp_path / "bad")]) == 2
    assert "is not a run file" in capsys.readouterr().err
