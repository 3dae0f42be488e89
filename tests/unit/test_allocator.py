"""The torch backend's page-fault watch: after the first steps, a step that page-faults a lot
makes glibc keep freed memory (edgetune.procmem.keep_freed_memory), and only where the
process has not chosen its allocator itself."""
import subprocess
import sys

import pytest
import torch.nn.functional as F

import edgetune as et
from edgetune.compiler.backends import torch as torch_backend
from tests.unit.nets import ConvNet, batch


@pytest.fixture
def faults(monkeypatch):
    """A fake fault counter, `per_call` more at each read, and a record of keep_freed_memory
    calls (this test process's allocator is left alone)."""
    state = {"count": 0, "per_call": 0, "kept": []}

    def read():
        state["count"] += state["per_call"]
        return state["count"]

    monkeypatch.setattr("edgetune.procmem.minor_faults", read)
    monkeypatch.setattr("edgetune.procmem.keep_freed_memory", lambda: state["kept"].append(True) or True)
    return state


@pytest.mark.parametrize("per_read, kept", [(3000, True), (10, False)])
def test_the_first_steps_decide_once(faults, per_read, kept):
    faults["per_call"] = per_read
    trainer = et.compile(ConvNet(), F.cross_entropy, *batch(), scheme={"*.bias": "full"}, optimizer=et.SGD(0.1))
    watch = trainer.compiled.watch
    for k in range(5):
        assert watch.deciding == (k < 1 + torch_backend.WATCHED_STEPS)
        trainer.step(*batch(seed=k))
    # one read before the watched steps and one after them: per_read faults over WATCHED_STEPS
    assert watch.faults_per_step == per_read / torch_backend.WATCHED_STEPS
    assert watch.kept_freed is kept and faults["kept"] == [True] * kept
    assert ("glibc keeps freed memory" in str(trainer.report())) is kept


def run_python(code: str, **env) -> str:
    import os

    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_only_where_the_process_has_not_chosen():
    keep = "from edgetune import procmem; print(procmem.keep_freed_memory())"
    assert run_python(keep) == "True"
    assert run_python(keep, MALLOC_MMAP_THRESHOLD_="65536") == "False"
    assert run_python(keep, MALLOC_TRIM_THRESHOLD_="131072") == "False"
    # a measurement pinned the threshold (edgetune.apps.measure, the compile child's scratch)
    assert run_python("from edgetune import procmem; procmem.set_mmap_threshold(65536); "
                      "print(procmem.keep_freed_memory())") == "False"
