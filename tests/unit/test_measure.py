import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import edgetune as et
from edgetune.apps.measure import measure_peak
from tests.unit.nets import ConvNet, batch

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="measures through Linux's /proc")
MB = 2 ** 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def peak(model, scheme, data):
    return measure_peak(model, F.cross_entropy, *data, scheme, et.SGD(lr=0.01, momentum=0.9), steps=2)


def test_full_backprop_measures_more_than_bias_only_and_at_least_its_tensors():
    model, data = ConvNet().eval(), batch(n=32, size=64)  # activations of a few MB, above the noise
    bias_only, full = peak(model, et.schemes.bias_only(), data), peak(model, et.schemes.full(), data)
    assert 0 < bias_only < full < 200 * MB
    # Whatever the kernels add on this CPU, the tensors the plan holds at once must all be there.
    trainer = et.compile(model, F.cross_entropy, *data, scheme=et.schemes.full(), optimizer=et.SGD(lr=0.01, momentum=0.9))
    tensors = max(live - scratch for live, scratch in zip(trainer.plan.live_bytes, trainer.plan.scratch_bytes))
    assert full >= tensors + trainer.plan.state_bytes


def test_the_callers_model_is_left_untouched():
    model, data = ConvNet().eval(), batch()
    before = copy.deepcopy(model.state_dict())
    peak(model, et.schemes.full(), data)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_errors_in_the_child_reach_the_caller():
    with pytest.raises(et.schemes.SchemeError, match="nothing.here"):
        peak(ConvNet().eval(), {"nothing.here": "full"}, batch())


def test_peak_of_any_step_counts_what_it_allocates_and_frees():
    from edgetune.apps.measure import peak_of

    def setup():
        return lambda: torch.ones(5 * MB).sum()  # 20 MB, freed at once

    assert 19 * MB < peak_of(ConvNet(), setup, steps=2) < 40 * MB


def test_a_fork_of_a_process_that_kept_freed_tensors_measures_each_one_once():
    # The torch backend makes glibc keep freed memory (procmem.keep_freed_memory); a fork of such
    # a process has free heap chunks larger than a step's tensor, and glibc serves from those
    # before it maps fresh pages. Without occupy_free_heap each step's 20 MB tensor landed in
    # another released chunk: 40 MB measured. Run in a fresh interpreter: this worker's heap is
    # whatever the tests before left it.
    script = """
import torch
from edgetune import procmem
from edgetune.apps.measure import peak_of
from tests.unit.nets import ConvNet
procmem.keep_freed_memory()
kept = [torch.ones(n * 2 ** 20) for n in (9, 7, 6, 5, 8)]  # touched, then freed: free chunks of 20-36 MB
del kept
print(max(peak_of(ConvNet(), lambda: (lambda: torch.ones(5 * 2 ** 20).sum()), steps=2) for _ in range(3)))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert 19 * MB < int(done.stdout.split()[-1]) < 22 * MB


def test_a_trained_heap_does_not_change_the_measurement():
    # A fork of a process that has trained inherits its fragmented heap; the fresh process
    # that measures does not, so training here first must not move the figure.
    model, data = ConvNet().eval(), batch(n=32, size=64)
    before = peak(model, et.schemes.full(), data)
    trainer = et.compile(model, F.cross_entropy, *data, scheme=et.schemes.full(), optimizer=et.SGD(lr=0.0))
    for _ in range(3):
        trainer.step(*data)
    del trainer
    assert abs(peak(model, et.schemes.full(), data) - before) < 0.15 * before


def test_a_job_that_does_not_pickle_is_measured_in_a_fork():
    model, data = ConvNet().eval(), batch(n=32, size=64)
    unpicklable_loss = lambda out, y: F.cross_entropy(out, y)  # noqa: E731
    measured = measure_peak(model, unpicklable_loss, *data, et.schemes.full(), et.SGD(lr=0.01), steps=2)
    assert 0.5 * peak(model, et.schemes.full(), data) < measured < 200 * MB


def test_the_pytorch_baseline_is_measured_the_same_way():
    from edgetune.apps.measure import measure_eager_peak

    model, data = ConvNet().eval(), batch(n=32, size=64)
    eager = measure_eager_peak(model, F.cross_entropy, *data, et.schemes.bias_only(), et.SGD(lr=0.01))
    assert peak(model, et.schemes.bias_only(), data) < eager < 200 * MB
