"""Each pass: the graph changes as intended, the numbers do not."""
import pytest
import torch
import torch.nn.functional as F

import edgetune as et
from edgetune.memory import plan, saved_for_backward
from edgetune.passes import PIPELINE
from edgetune.passes.masks import _maskable, _with_masks, bitmask_activations
from tests.unit.nets import ConvNet, batch

PARTIAL = {"pw.weight": 0.5, "dw.weight": {"ratio": 0.25, "select": "first"}, "head.*": "full"}


def without(name):
    return [p for p in PIPELINE if p[0] != name]


def trained(passes, scheme, mode="eval", steps=2, size=16):
    torch.manual_seed(0)
    model = ConvNet().train(mode == "train")
    trainer = et.compile(model, F.cross_entropy, *batch(size=size), scheme=scheme,
                         optimizer=et.SGD(lr=0.1, momentum=0.9), passes=passes)
    losses = [trainer.step(*batch(size=size, seed=s)) for s in range(steps)]
    return trainer, model, losses


def ops(trainer):
    return ops_of(trainer.graph)


def ops_of(graph):
    return [n.op for n in graph.nodes]


@pytest.mark.parametrize("name", [p[0] for p in PIPELINE])
@pytest.mark.parametrize("scheme", [et.schemes.full(), et.schemes.bias_only(), PARTIAL])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_every_pass_changes_no_number(name, scheme, mode):
    _, with_model, with_losses = trained(PIPELINE, scheme, mode)
    _, ref_model, ref_losses = trained(without(name), scheme, mode)
    assert with_losses == ref_losses
    for (k, a), b in zip(with_model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(a, b), f"{k} differs with pass {name!r}"


def test_bitmask_replaces_saved_activations_with_bits():
    before, _, _ = trained(without("bitmask"), et.schemes.bias_only())
    after, _, _ = trained(PIPELINE, et.schemes.bias_only())
    assert "relu_grad" in ops(before) and "hardtanh_grad" in ops(before)
    # relu(bn(stem)) is the larger map, live when the backward starts: it becomes bits. The
    # relu6 output is freed before the peak either way, so it keeps its float (no pack cost).
    assert "relu_grad" not in ops(after) and "hardtanh_grad" in ops(after)
    assert ops(after).count("pack_mask") == ops(after).count("masked_grad") == 1
    saved = lambda t: sum(n.nbytes for n in saved_for_backward(t.graph.nodes))  # noqa: E731
    assert saved(after) < saved(before)
    assert after.report().predicted_peak_bytes < before.report().predicted_peak_bytes


def test_bitmask_packs_no_more_activations_than_the_lowest_peak_needs():
    upto_bitmask = [p for p in PIPELINE if p[0] in ("dce", "slices")]
    graph = trained(upto_bitmask, et.schemes.bias_only())[0].graph
    grads = _maskable(graph)
    every = plan(_with_masks(graph, grads)).peak_bytes
    assert plan(bitmask_activations(graph)).peak_bytes <= every < plan(graph).peak_bytes
    assert ops_of(bitmask_activations(graph)).count("pack_mask") < len(set(grads.values()))


def test_bitmask_stays_out_where_packing_would_raise_the_peak():
    # 8x8 maps: the packing scratch outweighs the few bytes the masks would free.
    trainer, _, _ = trained(PIPELINE, et.schemes.bias_only(), size=8)
    assert "pack_mask" not in ops(trainer) and "hardtanh_grad" in ops(trainer)


def test_bitmask_leaves_activations_that_a_weight_gradient_needs():
    trainer, _, _ = trained(PIPELINE, {"pw.weight": "full"})
    # relu6(bn2(dw(x))) is pw's input: it stays whole, so packing it would only add bits.
    assert "hardtanh_grad" not in ops(trainer) and "pack_mask" not in ops(trainer)


def test_slices_save_only_the_trained_channels_in_the_forward():
    before, _, _ = trained(without("slices"), PARTIAL)
    after, _, _ = trained(PIPELINE, PARTIAL)
    # The gather of pw's input channels moves from the backward into the forward.
    gather = next(n for n in after.graph.nodes if n.op == "index_select")
    assert "grad_of" not in gather.meta and gather.shape[1] == 4
    assert any(n.op == "copy" for n in after.graph.nodes)
    saved_before = {n.name: n.nbytes for n in saved_for_backward(before.graph.nodes)}
    saved_after = {n.name: n.nbytes for n in saved_for_backward(after.graph.nodes)}
    assert sum(saved_after.values()) < sum(saved_before.values())


def test_reorder_updates_each_parameter_right_after_its_gradient():
    trainer, _, _ = trained(PIPELINE, et.schemes.full())
    nodes = trainer.graph.nodes
    for pos, n in enumerate(nodes):
        if n.op == "sgd_update":
            grad = n.inputs[1]
            readers = [k for k, m in enumerate(nodes) if n.inputs[0] in m.inputs and m is not n]
            ready = max(nodes.index(grad), *readers)
            between = {m.op for m in nodes[ready + 1:pos]}
            assert between <= {"sgd_update"}, f"update of {n.inputs[0]} waits behind {between}"
    before, _, _ = trained(without("reorder"), et.schemes.full())
    assert [n.op for n in before.graph.nodes][-1] == "sgd_update"
