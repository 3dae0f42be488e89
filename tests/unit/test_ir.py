import pytest
import torch

from edgetune.compiler.ir.builder import Builder
from edgetune.compiler.ir.graph import Graph, format_graph
from edgetune.compiler.ir.verify import GraphError, verify
from edgetune.compiler.memory import plan
from edgetune.compiler.passes.dce import dce


def small_graph():
    b = Builder()
    x = b.input("x", (2, 3), torch.float32, kind="input", index=0)
    w = b.input("w", (4, 3), torch.float32, kind="param", target="w")
    y = b.emit("linear", x, w)
    unused = b.emit("relu", x)
    loss = b.emit("sum", b.emit("relu", y), dims=(0, 1), keepdim=False)
    return b, x, w, y, unused, loss


def test_builder_infers_shapes_from_kernels():
    _, _, _, y, _, loss = small_graph()
    assert y.shape == (2, 4) and y.dtype == torch.float32
    assert loss.shape == ()


def test_printer_shows_ops_attrs_and_types():
    b, *_, loss = small_graph()
    text = format_graph(b.graph({"loss": loss}))
    assert "%linear = linear(%x, %w)" in text
    assert "dims=(0, 1)" in text and "float32[2, 4]" in text


def test_verifier_rejects_use_before_definition():
    b, x, w, y, _, loss = small_graph()
    nodes = [n for n in b.nodes if n is not x] + [x]
    with pytest.raises(GraphError, match="used before it is defined"):
        verify(Graph(nodes, {"loss": loss}), where="shuffle")


def test_verifier_rejects_read_after_in_place_update():
    b, x, w, y, _, loss = small_graph()
    g = b.emit("linear_grad_weight", y, x)
    lr = b.input("lr", (), torch.float64, kind="hyper")
    step = b.input("step", (), torch.int64, kind="hyper")
    b.emit("sgd_update", w, g, lr, step, part=None, n_state=0, momentum=0.0, dampening=0.0,
           weight_decay=0.0, nesterov=False)
    b.emit("linear", x, w)  # reads w after it was updated
    with pytest.raises(GraphError, match="after an in-place update"):
        verify(b.graph({"loss": loss}))


def test_verifier_rejects_reading_a_view_of_an_updated_tensor():
    b, x, w, y, _, loss = small_graph()
    w_t = b.emit("permute", w, dims=(1, 0))  # a view: it would see the new weights
    lr = b.input("lr", (), torch.float64, kind="hyper")
    step = b.input("step", (), torch.int64, kind="hyper")
    b.emit("sgd_update", w, b.emit("linear_grad_weight", y, x), lr, step, part=None, n_state=0,
           momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False)
    b.emit("mm", x, w_t)
    with pytest.raises(GraphError, match="reads %permute after an in-place update"):
        verify(b.graph({"loss": loss}))


def test_dce_drops_dead_values_keeps_inputs_and_numbers():
    b, x, w, y, unused, loss = small_graph()
    graph = b.graph({"loss": loss})
    after = dce(graph)
    assert unused in graph.nodes and unused not in after.nodes
    assert x in after.nodes and w in after.nodes
    verify(after)
    assert plan(after).peak_bytes <= plan(graph).peak_bytes


def test_memory_plan_frees_at_last_use_and_views_cost_nothing():
    b = Builder()
    x = b.input("x", (256,), torch.float32, kind="input", index=0)
    a = b.emit("exp", x)  # 1 KiB
    v = b.emit("reshape", a, shape=(16, 16))  # a view of a: free
    c = b.emit("exp", v)  # 1 KiB, a still alive through v
    loss = b.emit("sum", c, dims=(0, 1), keepdim=False)
    p = plan(b.graph({"loss": loss}))
    assert max(p.live_bytes) == 2 * 1024
    assert p.live_bytes[-1] == 1024 + 4  # the sum reads c while it writes the loss


def test_memory_plan_counts_kernel_scratch_while_it_runs():
    b = Builder()
    g = b.input("g", (2, 8, 16, 16), torch.float32, kind="input", index=0)
    w = b.input("w", (8, 1, 3, 3), torch.float32, kind="param", target="w")
    conv = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1))
    dx = b.emit("conv_grad_input", g, w, input_shape=(2, 8, 16, 16), groups=8, **conv)
    dense = b.emit("conv_grad_input", g, b.input("w2", (8, 8, 3, 3), torch.float32, kind="param", target="w2"),
                   input_shape=(2, 8, 16, 16), groups=1, **conv)
    loss = b.emit("sum", b.emit("add", dx, dense), dims=(0, 1, 2, 3), keepdim=False)
    p = plan(b.graph({"loss": loss}))
    assert p.live_bytes[b.nodes.index(dx)] == 2 * dx.nbytes  # depthwise: output + a same-size buffer
    assert p.live_bytes[b.nodes.index(dense)] == dx.nbytes + dense.nbytes
