"""The views pass (passes/views.py): chains folded, and a cat of views that tile one flat buffer
turned into a view of it, with the values unchanged and nothing folded that is not the same."""
from __future__ import annotations

import pytest
import torch

from edgetune.compiler.ir.builder import Builder
from edgetune.compiler.ir.ops import OPS
from edgetune.compiler.passes.views import fold_views


def _run(graph, flat: torch.Tensor) -> torch.Tensor:
    """The graph's output, each node by its kernel (the one input is the flat buffer)."""
    values = {}
    for n in graph.nodes:
        args = [values[i] for i in n.inputs]
        values[n] = flat if n.op == "input" else OPS[n.op].kernel(*args, **n.attrs)
    return values[graph.outputs["out"]]


def _flat(b: Builder, numel: int):
    x = b.input("x", (numel,), torch.float64, kind="input", index=0)
    return b.emit("exp", x)  # a kernel's output: the pass reasons about its contiguous buffer


def _qkv_gradient(b, flat, n, t, h, d, interleaved: bool, order=(0, 1, 2)):
    """attention's backward as the autodiff builds it for a fused qkv projection: the three
    pieces of the packed buffer, as [N, H, T, D], concatenated back and laid out as the
    projection's [N * T, 3 * H * D] gradient."""
    pieces = []
    for i in order:
        if interleaved:
            piece = b.emit("select", b.emit("reshape", flat, shape=(n, t, 3, h, d)), dim=2, index=i)
        else:
            size = n * t * h * d
            piece = b.emit("reshape", b.emit("slice", flat, dim=0, start=i * size, end=(i + 1) * size, step=1),
                           shape=(n, t, h, d))
        pieces.append(b.emit("reshape", b.emit("permute", piece, dims=(0, 2, 1, 3)), shape=(1, n, h, t, d)))
    cat = b.emit("cat", *pieces, dim=0)
    return b.emit("reshape", b.emit("permute", cat, dims=(1, 3, 0, 2, 4)), shape=(n * t, 3 * h * d))


def _folded(build, numel):
    b = Builder()
    flat = _flat(b, numel)
    graph = b.graph({"out": build(b, flat)})
    x = torch.randn(numel, dtype=torch.float64)
    before, after = _run(graph, x), _run(fold_views(graph), x)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    return fold_views(graph)


@pytest.mark.parametrize("n", [1, 2])
def test_an_interleaved_qkv_gradient_becomes_one_reshape_of_the_buffer(n):
    t, h, d = 5, 3, 4
    graph = _folded(lambda b, flat: _qkv_gradient(b, flat, n, t, h, d, interleaved=True), n * t * 3 * h * d)
    assert [x.op for x in graph.nodes] == ["input", "exp", "reshape"]


@pytest.mark.parametrize("n", [1, 2])
def test_pieces_one_after_another_lose_the_cat_and_keep_one_permute(n):
    t, h, d = 5, 3, 4
    graph = _folded(lambda b, flat: _qkv_gradient(b, flat, n, t, h, d, interleaved=False), n * t * 3 * h * d)
    ops = [x.op for x in graph.nodes]
    assert "cat" not in ops and ops.count("permute") == 1


@pytest.mark.parametrize("order", [(1, 0, 2), (0, 0, 2)])
def test_pieces_out_of_order_or_repeated_stay_a_cat(order):
    t, h, d = 5, 3, 4
    graph = _folded(lambda b, flat: _qkv_gradient(b, flat, 2, t, h, d, interleaved=True, order=order), 2 * t * 3 * h * d)
    assert "cat" in [x.op for x in graph.nodes]


def test_slices_of_different_lengths_that_cover_the_buffer_become_a_view():
    def build(b, flat):
        grid = b.emit("reshape", flat, shape=(6, 4))
        parts = [b.emit("slice", grid, dim=0, start=s, end=e, step=1) for s, e in ((0, 1), (1, 4), (4, 6))]
        return b.emit("cat", *parts, dim=0)
    graph = _folded(build, 24)
    assert "cat" not in [x.op for x in graph.nodes]


@pytest.mark.parametrize("pieces", [((0, 1), (1, 4)), ((0, 1), (2, 6)), ((1, 4), (4, 6))])
def test_slices_that_leave_part_of_the_buffer_out_stay_a_cat(pieces):
    # a view of the whole buffer would keep the part left out alive; a gap is no view at all
    def build(b, flat):
        grid = b.emit("reshape", flat, shape=(6, 4))
        parts = [b.emit("slice", grid, dim=0, start=s, end=e, step=1) for s, e in pieces]
        return b.emit("cat", *parts, dim=0)
    graph = _folded(build, 24)
    assert "cat" in [x.op for x in graph.nodes]


def test_columns_side_by_side_stay_a_cat():
    # cat along the inner axis of row-major pieces interleaves them: not a view
    def build(b, flat):
        parts = [b.emit("reshape", b.emit("slice", flat, dim=0, start=s, end=s + 12, step=1), shape=(4, 3))
                 for s in (0, 12)]
        return b.emit("cat", *parts, dim=1)
    graph = _folded(build, 24)
    assert "cat" in [x.op for x in graph.nodes]


def test_a_permute_of_unit_axes_only_is_a_reshape_and_folds():
    def build(b, flat):
        x = b.emit("reshape", flat, shape=(1, 6, 1, 4))
        return b.emit("reshape", b.emit("permute", x, dims=(2, 1, 0, 3)), shape=(24,))
    graph = _folded(build, 24)
    assert [x.op for x in graph.nodes] == ["input", "exp"]
