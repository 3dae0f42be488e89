"""Resumable runs (edgetune.apps.runs): a run killed with SIGKILL at random points, and in the
middle of writing a checkpoint, then resumed until it ends, ends with bitwise the weights and
losses of an uninterrupted run; no kill leaves a checkpoint that does not load."""
import json
import os
import random
import signal
import time
import traceback

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import edgetune as et
from edgetune.apps.finetune import ImageTask, finetune, save_weights
from edgetune.apps.runs import CHECKPOINT, Checkpoints
from edgetune.compiler.checkpoint import load_checkpoint
from edgetune.data import LabeledData
from tests.unit.nets import ConvNet

EPOCHS, BATCH = 3, 4  # 36 training items: 9 steps an epoch, 27 in all
STEPS = 27
CRASH_TEST_SECONDS = 12  # the kill loop runs this long, and until MIN_KILLS kills
MIN_KILLS = 15


def _job():
    """A train-mode conv net (its BatchNorm statistics change), AdamW, augmented images."""
    torch.manual_seed(0)
    model = ConvNet().train()
    g = torch.Generator().manual_seed(1)
    data = LabeledData(torch.randint(0, 256, (48, 3, 12, 12), dtype=torch.uint8, generator=g),
                       torch.arange(48) % 4, list("abcd"))
    train, val = data.split(0.25)
    task = ImageTask(10, 0.5, 0.5, augment=True)
    example = task(train.items[:BATCH], True), (train.labels[:BATCH],)
    trainer = et.compile(model, F.cross_entropy, *example, scheme={"pw.weight": 0.5, "*.bias": "full", "head.*": "full"},
                         optimizer=et.AdamW(lr=0.01))
    return model, trainer, train, val, task


def _run(job, folder: str, every: int = 1) -> None:
    """The whole run (or the rest of it, from the folder's checkpoint), then its weights."""
    model, trainer, train, val, task = job
    checkpoints = Checkpoints(folder, trainer, every, task.generators)
    history = finetune(trainer, train, val, task, epochs=EPOCHS, batch_size=BATCH, lr=0.01, progress=False,
                       log=lambda line: None, checkpoints=checkpoints)
    save_weights(model, os.path.join(folder, "model.safetensors"))
    history.save(os.path.join(folder, "history.json"))


def _kill_while_saving(nth: int) -> None:
    """In the child: the nth checkpoint write stops half-way through its file, with SIGKILL."""
    real, calls = safetensors.torch.save_file, [0]

    def save_file(tensors, filename, metadata=None):
        calls[0] += 1
        real(tensors, filename, metadata=metadata)
        if calls[0] == nth:
            os.truncate(filename, os.path.getsize(filename) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    safetensors.torch.save_file = save_file


def _child(job, folder: str, kill_in_save: int | None = None) -> int:
    """A process that runs `job` in `folder`; returns its pid. It is forked from a process that
    built and compiled the job but never trained it: each child starts as a fresh process
    that rebuilt the same job would (the CLI test below restarts for real)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if kill_in_save:
                _kill_while_saving(kill_in_save)
            _run(job, folder)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def _kill_after_step(pid: int, folder: str, step: int, delay: float) -> int:
    """SIGKILL the child `delay` seconds after its checkpoint holds `step` steps (or when it
    ends, whichever is first); returns its exit status."""
    while _steps_in_checkpoint(folder) < step:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.002)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def _steps_in_checkpoint(folder: str) -> int:
    """Steps the folder's checkpoint holds (0: none yet); a checkpoint that does not load fails."""
    path = os.path.join(folder, CHECKPOINT)
    if not os.path.exists(path):
        return 0
    return len(load_checkpoint(path, torch.device("cpu"))["run"]["history"]["losses"])


def _result(folder: str):
    return (safetensors.torch.load_file(os.path.join(folder, "model.safetensors")),
            json.load(open(os.path.join(folder, "history.json")))["losses"])


@pytest.fixture(scope="module")
def job():
    """Built and compiled once, never trained here: every run happens in a forked child.
    Forked children that run OpenMP regions of a parent's thread pool hang, so the module
    runs on one thread, which has no pool (what it tests is resuming, not threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("EDGETUNE_MEASURE_SCRATCH", "0")  # the plan does not change the numbers
        yield _job()
    torch.set_num_threads(threads)


def test_a_run_killed_anywhere_resumes_to_the_same_weights(tmp_path, job):
    reference = str(tmp_path / "reference")
    assert os.waitpid(_child(job, reference), 0)[1] == 0
    want_weights, want_losses = _result(reference)
    assert len(want_losses) == STEPS

    rng, kills, killed_after, runs = random.Random(0), 0, set(), 0
    deadline = time.monotonic() + CRASH_TEST_SECONDS
    while time.monotonic() < deadline or kills < MIN_KILLS:
        folder, runs = str(tmp_path / f"run{runs}"), runs + 1
        for _ in range(rng.randint(1, 4)):  # a few kills, then the run is let finish
            done = _steps_in_checkpoint(folder)
            if done == STEPS:
                break
            if rng.random() < 0.4:  # in the middle of writing one of the next checkpoints
                status = os.waitpid(_child(job, folder, kill_in_save=rng.randint(1, 8)), 0)[1]
            else:  # during a step, an evaluation or a save, a little after a random step
                status = _kill_after_step(_child(job, folder), folder, rng.randint(done + 1, STEPS),
                                          rng.uniform(0, 0.02))
            if os.WIFSIGNALED(status):
                kills += 1
                killed_after.add(_steps_in_checkpoint(folder))  # it loads, or the test fails here
        assert os.waitpid(_child(job, folder), 0)[1] == 0
        weights, losses = _result(folder)
        assert losses == want_losses, f"run {runs}: the losses differ from the uninterrupted run's"
        assert weights.keys() == want_weights.keys()
        assert all(torch.equal(weights[k], want_weights[k]) for k in weights), f"run {runs}: weights differ"
    assert len(killed_after) >= 10, f"kills landed after too few distinct steps: {sorted(killed_after)}"

    assert os.waitpid(_child(job, reference), 0)[1] == 0  # a finished run resumes to nothing more
    assert _result(reference)[1] == want_losses


def test_resuming_from_other_frozen_weights_is_refused(tmp_path, job):
    folder = str(tmp_path / "run")
    assert os.waitpid(_child(job, folder), 0)[1] == 0
    model, trainer, train, val, task = job
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.stem.weight.add_(1)  # frozen under the scheme: not in the checkpoint
    try:
        with pytest.raises(ValueError, match="frozen weights differ"):
            Checkpoints(folder, trainer, 1, task.generators).restore(dict)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if k != "stem.weight")
    finally:
        model.load_state_dict(before)


def test_two_processes_cannot_train_one_run(tmp_path, job):
    model, trainer, train, val, task = job
    first = Checkpoints(str(tmp_path), trainer, 1, task.generators)
    with pytest.raises(ValueError, match="another edgetune process is training the run"):
        Checkpoints(str(tmp_path), trainer, 1, task.generators)
    del first  # its lock goes with it
    Checkpoints(str(tmp_path), trainer, 1, task.generators)


def test_a_checkpoint_read_while_the_next_is_written_is_one_or_the_other(tmp_path, job):
    """safetensors opens a file more than once; a load racing a save must still see one whole file."""
    from edgetune.compiler.checkpoint import save_checkpoint

    path = str(tmp_path / "state.safetensors")

    def state(i: int) -> dict:
        return {"step": i, "lr": 0.1, "model": {"w": torch.full((4096,), float(i))}, "optimizer": {}, "adapters": {}}

    save_checkpoint(state(0), path)
    writer = os.fork()
    if writer == 0:
        for i in range(1, 400):
            save_checkpoint(state(i), path)
        os._exit(0)
    reads = 0
    while not os.waitpid(writer, os.WNOHANG)[0]:
        loaded = load_checkpoint(path, torch.device("cpu"))  # a torn read fails its digest here
        assert torch.all(loaded["model"]["w"] == loaded["step"])
        reads += 1
    assert reads > 10
