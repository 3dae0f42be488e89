"""Kernel scratch measured on this machine (edgetune.compiler.backends.scratch) and its use by the plan."""
import sys

import pytest
import torch

from edgetune.compiler.backends import scratch
from edgetune.compiler.ir.builder import Builder
from edgetune.compiler.ir.ops import OPS, register
from edgetune.compiler.memory import plan, scratch_bytes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="measures through Linux's /proc")
MB = 2 ** 20


def _sum_through_a_copy(x):
    return (x * 2).sum()  # x * 2: a temporary of x's size, freed before the kernel returns


@pytest.fixture(scope="module")
def copying_op():
    """An op whose kernel is known to allocate exactly one temporary the size of its operand."""
    name = "test_sum_through_a_copy"
    register(name, _sum_through_a_copy, shape=lambda x: ((), x.dtype), measure_scratch=True)
    yield name
    del OPS[name]


def _graph_of(op, shape):
    b = Builder()
    x = b.input("x", shape, torch.float32, kind="input", index=0)
    y = b.emit(op, x)
    return b.graph({"loss": y}), y


def test_a_kernels_temporary_is_measured_and_counted_by_the_plan(copying_op, monkeypatch):
    monkeypatch.setenv("EDGETUNE_MEASURE_SCRATCH", "1")
    graph, y = _graph_of(copying_op, (4 * MB,))  # 16 MB operand, 16 MB temporary
    assert plan(graph).live_bytes[graph.nodes.index(y)] == y.nbytes  # no estimate: nothing counted
    measured = scratch.measure_scratch(graph, torch.device("cpu"))
    # The temporary's 16 MB, not twice it nor nothing. The resident set can also take in a page
    # or two of anything else the child touches: under a loaded parallel suite 18.2 MB was seen.
    assert 15.5 * MB < measured[y] < 20 * MB
    assert plan(graph, measured).live_bytes[graph.nodes.index(y)] == y.nbytes + measured[y]


def test_each_call_is_measured_once_per_process(copying_op, monkeypatch):
    monkeypatch.setenv("EDGETUNE_MEASURE_SCRATCH", "1")
    first, y1 = _graph_of(copying_op, (MB,))
    measured = scratch.measure_scratch(first, torch.device("cpu"))
    # From here on a measurement would give -1 (the child runs this stand-in), a cached one not.
    monkeypatch.setattr(scratch, "_measure_in_this_process", lambda nodes: [-1] * len(nodes))
    again, y2 = _graph_of(copying_op, (MB,))
    assert scratch.measure_scratch(again, torch.device("cpu"))[y2] == measured[y1] > 0
    other, y3 = _graph_of(copying_op, (2 * MB,))
    assert scratch.measure_scratch(other, torch.device("cpu"))[y3] == -1  # another shape is another call


def test_an_expanded_operand_is_a_different_call_from_a_dense_one():
    b = Builder()
    small = b.input("s", (8, 16, 1, 1), torch.float32, kind="input", index=0)
    dense = b.input("d", (8, 16, 32, 32), torch.float32, kind="input", index=1)
    expanded = b.emit("expand", small, size=(8, 16, 32, 32))
    x = b.input("x", (8, 8, 32, 32), torch.float32, kind="input", index=2)
    conv = dict(weight_shape=(16, 8, 1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1)
    from_expanded = b.emit("conv_grad_weight", x, expanded, **conv)
    from_dense = b.emit("conv_grad_weight", x, dense, **conv)
    assert scratch.signature(from_expanded) != scratch.signature(from_dense)
    # The measurement builds the operand the same way: a zero-stride view of the small tensor.
    operand = scratch._operand(expanded)
    assert operand.shape == (8, 16, 32, 32) and operand.stride()[2:] == (0, 0)


def test_without_measurement_the_plan_uses_the_ops_estimate(monkeypatch):
    monkeypatch.setenv("EDGETUNE_MEASURE_SCRATCH", "0")
    b = Builder()
    g = b.input("g", (2, 8, 16, 16), torch.float32, kind="input", index=0)
    w = b.input("w", (8, 1, 3, 3), torch.float32, kind="param", target="w")
    dx = b.emit("conv_grad_input", g, w, input_shape=(2, 8, 16, 16), groups=8,
                stride=(1, 1), padding=(1, 1), dilation=(1, 1))
    graph = b.graph({"loss": dx})
    assert scratch.measure_scratch(graph, torch.device("cpu")) == {}
    assert scratch_bytes(dx) == OPS["conv_grad_input"].scratch(dx) == dx.nbytes  # depthwise estimate
    assert not scratch.can_measure(torch.device("cuda"))
    assert plan(graph).peak_bytes == 2 * dx.nbytes


def _raises(x):
    raise RuntimeError("this kernel cannot run here")


def test_a_failed_measurement_falls_back_to_the_estimate(monkeypatch):
    monkeypatch.setenv("EDGETUNE_MEASURE_SCRATCH", "1")
    name = "test_raises_when_measured"
    register(name, _raises, shape=lambda x: (tuple(x.shape), x.dtype), scratch=lambda n: 123, measure_scratch=True)
    try:
        graph, y = _graph_of(name, (4,))
        with pytest.warns(RuntimeWarning, match="could not measure kernel scratch"):
            measured = scratch.measure_scratch(graph, torch.device("cpu"))
        assert measured == {} and plan(graph, measured).live_bytes[graph.nodes.index(y)] == y.nbytes + 123
    finally:
        del OPS[name]
