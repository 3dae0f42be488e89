"""Values every step computes the same, hoisted out of the torch backend's step
(edgetune/compiler/backends/invariants.py): the same numbers, computed once, recomputed when
what they read changes, never a value the step writes, within their memory budget."""
import copy

import pytest
import torch
import torch.nn.functional as F

import edgetune as et
from edgetune.compiler.backends import torch as torch_backend
from edgetune.compiler.backends.invariants import Invariants, hoist
from edgetune.compiler.backends.torch import CompiledStep
from edgetune.compiler.ir.builder import Builder

from tests.unit.nets import ConvNet, batch

# Frozen convs and BN scales (folded), trained BN biases: each step reads the BN scales.
SCHEME = {"bn.bias": "full", "bn2.bias": "full", "pw.bias": "full", "head.*": "full"}


def _trainer(model, hoisted: bool, monkeypatch):
    monkeypatch.setattr(torch_backend, "HOIST_INVARIANTS", hoisted)
    return et.compile(model, F.cross_entropy, *batch(), scheme=SCHEME, optimizer=et.SGD(0.1, momentum=0.9))


def _pair(monkeypatch):
    model = ConvNet().eval()
    plain_model, kept_model = model, copy.deepcopy(model)
    return (plain_model, _trainer(plain_model, False, monkeypatch)), (kept_model, _trainer(kept_model, True, monkeypatch))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_the_bn_scales_are_computed_once_and_the_steps_are_the_same_to_the_bit(monkeypatch):
    (plain_model, plain), (kept_model, kept) = _pair(monkeypatch)
    assert not hasattr(plain.compiled, "invariants")
    prologue, step = kept.compiled.source.split("def _edgetune_step")
    assert "_op_bn_scale(" in prologue and "_op_bn_scale(" not in step
    computed = []
    compute = kept.compiled.invariants.compute
    kept.compiled.invariants.compute = lambda *reads: computed.append(1) or compute(*reads)
    for s in range(3):
        assert plain.step(*batch(seed=s)) == kept.step(*batch(seed=s))
    assert len(computed) == 1 and _same(plain_model, kept_model)


def test_a_frozen_tensor_changed_in_place_takes_effect_at_the_next_step(monkeypatch):
    (plain_model, plain), (kept_model, kept) = _pair(monkeypatch)
    plain.step(*batch(seed=0)), kept.step(*batch(seed=0))
    for model in (plain_model, kept_model):  # a checkpoint's frozen statistics, loaded in place
        state = model.state_dict()
        state["bn.running_var"] = state["bn.running_var"] * 4 + 1
        model.load_state_dict(state)
    with_old_scale = copy.deepcopy(kept.compiled.invariants.values)
    assert plain.step(*batch(seed=1)) == kept.step(*batch(seed=1))
    assert _same(plain_model, kept_model)
    assert any(not torch.equal(a, b) for a, b in zip(with_old_scale, kept.compiled.invariants.values))


def test_an_inference_tensor_has_no_version_so_nothing_is_trusted():
    calls = []
    kept = Invariants(lambda t: calls.append(1) or (t * 2,))
    with torch.inference_mode():
        t = torch.ones(3)
    kept(t), kept(t)
    assert len(calls) == 2
    other = torch.ones(3)
    kept(other), kept(other), kept(torch.ones(3))  # another tensor than last time: computed again
    assert len(calls) == 4


def _graph_with_a_written_value():
    b = Builder()
    w = b.input("w", (4,), torch.float32, kind="param", target="w")
    frozen = b.input("frozen", (4,), torch.float32, kind="param", target="frozen")
    x = b.input("x", (4,), torch.float32, kind="input", index=0)
    scaled = b.emit("mul", frozen, b.const(2.0))          # invariant, and kept
    clipped = b.emit("mul", frozen, b.const(3.0))         # invariant, then written in place by the step
    written = b.emit("hardtanh_inplace", clipped, min=0.0, max=6.0)
    of_w = b.emit("mul", w, b.const(2.0))                 # w is updated by the step
    g = b.emit("mul", b.emit("add", b.emit("add", b.emit("mul", x, scaled), written), of_w), x)
    lr, step = b.input("lr", (), torch.float64, kind="hyper"), b.input("step", (), torch.int64, kind="hyper")
    b.emit("sgd_update", w, g, lr, step, part=None, n_state=0, momentum=0.0, dampening=0.0,
           weight_decay=0.0, nesterov=False)
    return b.graph({"loss": b.emit("sum", g, dims=(0,), keepdim=False)}), scaled


def test_values_the_step_writes_or_that_read_written_tensors_are_never_kept():
    graph, scaled = _graph_with_a_written_value()
    assert hoist(graph).kept == [scaled]


@pytest.mark.parametrize("budget", [0, 64, 1 << 20])
def test_the_kept_values_fit_their_budget_the_smallest_first(monkeypatch, budget):
    model = ConvNet().eval()
    trainer = _trainer(model, True, monkeypatch)
    hoisted = hoist(trainer.graph, budget)
    new_bytes = [n.nbytes for n in hoisted.kept if n.op != "input"]
    assert sum(new_bytes) <= budget
    kinds = {n.op for n in hoisted.kept}
    if budget == 0:
        assert "bn_scale" not in kinds  # 32 bytes each: over a budget of none
    if budget == 64:
        assert kinds == {"bn_scale"}  # two scales of 8 floats; the folded weights are larger
    if budget == 1 << 20:
        assert {"bn_scale", "fold_bn_weight"} <= kinds


def test_a_large_value_both_the_step_and_a_kept_one_read_is_computed_in_both():
    b = Builder()
    frozen = b.input("frozen", (1024,), torch.float32, kind="param", target="frozen")
    x = b.input("x", (1024,), torch.float32, kind="input", index=0)
    large = b.emit("mul", frozen, b.const(2.0))                    # 4 KB: over the budget
    small = b.emit("sum", large, dims=(0,), keepdim=False)         # 4 bytes: kept
    out = b.emit("add", b.emit("mul", x, large), small)
    graph = b.graph({"loss": b.emit("sum", out, dims=(0,), keepdim=False)})
    hoisted = hoist(graph, budget=64)
    assert hoisted.kept == [small] and large in hoisted.prologue and large not in hoisted.only_once
    args = (torch.randn(1024), torch.randn(1024))
    by_input = {"frozen": args[0], "x": args[1]}
    call = [by_input[n.name] for n in graph.inputs]
    want = (args[1] * args[0] * 2 + (args[0] * 2).sum()).sum()
    step = CompiledStep(graph, torch.device("cpu"), keep_bytes=64)
    assert torch.allclose(step(*call)["loss"], want) and torch.allclose(step(*call)["loss"], want)
