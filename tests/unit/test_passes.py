"""Each pass: the graph changes as intended, the numbers do not."""
import pytest
import torch
import torch.nn.functional as F

import edgetune as et
from edgetune.compiler.memory import allocates, plan, saved_for_backward, storage_of
from edgetune.compiler.passes import FORWARD_PIPELINE, PIPELINE
from edgetune.compiler.passes.masks import _maskable, _with_masks, bitmask_activations
from tests.unit.nets import ConvNet, batch

PARTIAL = {"pw.weight": 0.5, "dw.weight": {"ratio": 0.25, "select": "first"}, "head.*": "full"}


def without(name):
    return [p for p in FORWARD_PIPELINE + PIPELINE if p[0] != name]


def trained(passes, scheme, mode="eval", steps=2, size=16):
    torch.manual_seed(0)
    model = ConvNet().train(mode == "train")
    trainer = et.compile(model, F.cross_entropy, *batch(size=size), scheme=scheme,
                         optimizer=et.SGD(lr=0.1, momentum=0.9), passes=passes)
    losses = [trainer.step(*batch(size=size, seed=s)) for s in range(steps)]
    return trainer, model, losses


def ops(trainer):
    return ops_of(trainer.graph)


def estimated_peak(trainer):
    """The plan the passes decide on: kernel scratch estimated per op, the same on every machine
    (the trainer's report adds what the kernels are measured to take on this one)."""
    return plan(trainer.graph).peak_bytes


def ops_of(graph):
    return [n.op for n in graph.nodes]


# Folding BN into a conv's weight rounds differently: it has its own test below.
@pytest.mark.parametrize("name", [p[0] for p in PIPELINE])
@pytest.mark.parametrize("scheme", [et.schemes.full(), et.schemes.bias_only(), PARTIAL])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_every_pass_changes_no_number(name, scheme, mode):
    _, with_model, with_losses = trained(None, scheme, mode)
    _, ref_model, ref_losses = trained(without(name), scheme, mode)
    assert with_losses == ref_losses
    for (k, a), b in zip(with_model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(a, b), f"{k} differs with pass {name!r}"


def test_bitmask_replaces_saved_activations_with_bits():
    before, _, _ = trained(without("bitmask"), et.schemes.bias_only())
    after, _, _ = trained(None, et.schemes.bias_only())
    assert "relu_grad" in ops(before) and "hardtanh_grad" in ops(before)
    # relu(bn(stem)) is the larger map, live when the backward starts: it becomes bits. The
    # relu6 output is freed before the peak either way, so it keeps its float (no pack cost).
    assert "relu_grad" not in ops(after) and "hardtanh_grad" in ops(after)
    unpacks = [op for op in ops(after) if op in ("masked_grad", "masked_grad_inplace")]  # over a dying gradient
    assert ops(after).count("pack_mask") == len(unpacks) == 1
    saved = lambda t: sum(n.nbytes for n in saved_for_backward(t.graph.nodes))  # noqa: E731
    assert saved(after) < saved(before)
    assert estimated_peak(after) < estimated_peak(before)


def test_bitmask_packs_no_more_activations_than_the_lowest_peak_needs():
    upto_bitmask = [p for p in PIPELINE if p[0] in ("dce", "slices")]
    graph = trained(upto_bitmask, et.schemes.bias_only())[0].graph
    grads = _maskable(graph)
    every = plan(_with_masks(graph, grads)).peak_bytes
    assert plan(bitmask_activations(graph)).peak_bytes <= every < plan(graph).peak_bytes
    assert ops_of(bitmask_activations(graph)).count("pack_mask") < len(set(grads.values()))


def test_bitmask_stays_out_where_packing_would_raise_the_peak():
    # 8x8 maps: the packing scratch outweighs the few bytes the masks would free.
    trainer, _, _ = trained(None, et.schemes.bias_only(), size=8)
    assert "pack_mask" not in ops(trainer) and "hardtanh_grad" in ops(trainer)


def test_bitmask_leaves_activations_that_a_weight_gradient_needs():
    trainer, _, _ = trained(None, {"pw.weight": "full"})
    # relu6(bn2(dw(x))) is pw's input: it stays whole, so packing it would only add bits.
    assert "hardtanh_grad" not in ops(trainer) and "pack_mask" not in ops(trainer)


def test_slices_save_only_the_trained_channels_in_the_forward():
    before, _, _ = trained(without("slices"), PARTIAL)
    after, _, _ = trained(None, PARTIAL)
    # The gather of pw's input channels moves from the backward into the forward.
    gather = next(n for n in after.graph.nodes if n.op == "index_select")
    assert "grad_of" not in gather.meta and gather.shape[1] == 4
    assert any(n.op == "copy" for n in after.graph.nodes)
    saved_before = {n.name: n.nbytes for n in saved_for_backward(before.graph.nodes)}
    saved_after = {n.name: n.nbytes for n in saved_for_backward(after.graph.nodes)}
    assert sum(saved_after.values()) < sum(saved_before.values())


def test_reorder_updates_each_parameter_right_after_its_gradient():
    trainer, _, _ = trained(None, et.schemes.full())
    nodes = trainer.graph.nodes
    for pos, n in enumerate(nodes):
        if n.op == "sgd_update":
            grad = n.inputs[1]
            readers = [k for k, m in enumerate(nodes) if n.inputs[0] in m.inputs and m is not n]
            ready = max(nodes.index(grad), *readers)
            # Only other updates and this update's own guard (is its gradient finite?) run between.
            between = {m.op for m in nodes[ready + 1:pos]}
            assert between <= {"sgd_update", "update_ok"}, f"update of {n.inputs[0]} waits behind {between}"
    before, _, _ = trained(without("reorder"), et.schemes.full())
    assert [n.op for n in before.graph.nodes][-1] == "sgd_update"


def float64_run(passes, scheme, steps=3):
    torch.manual_seed(0)
    model = ConvNet().double().eval()
    (x,), (y,) = batch(size=16)
    trainer = et.compile(model, F.cross_entropy, (x.double(),), (y,), scheme=scheme,
                         optimizer=et.SGD(lr=0.1, momentum=0.9), passes=passes)
    losses = [trainer.step((xs.double(),), ys) for (xs,), ys in (batch(size=16, seed=s) for s in range(steps))]
    return trainer, model, losses


@pytest.mark.parametrize("scheme", [et.schemes.bias_only(), {"head.*": "full", "bn2.bias": "full"}])
def test_fold_bn_merges_eval_bn_into_the_frozen_conv_and_changes_only_rounding(scheme):
    folded, folded_model, folded_losses = float64_run(None, scheme)
    plain, plain_model, plain_losses = float64_run(without("fold_bn"), scheme)
    assert ops(plain).count("batch_norm") == 2
    assert ops(folded).count("fold_bn_weight") >= 1
    assert ops(folded).count("batch_norm") + ops(folded).count("fold_bn_weight") == 2
    assert folded_losses == pytest.approx(plain_losses, rel=1e-12)
    for (k, a), b in zip(folded_model.state_dict().items(), plain_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=k)


def test_fold_bn_leaves_trained_convs_trained_scales_and_train_mode_alone():
    full, _, _ = trained(None, et.schemes.full())
    gamma, _, _ = trained(None, {"bn.weight": "full", "bn2.bias": "full"})
    train_mode, _, _ = trained(None, et.schemes.bias_only(), mode="train")
    assert "fold_bn_weight" not in ops(full) + ops(train_mode)
    assert not any(n.op == "fold_bn_weight" and n.inputs[1].attrs.get("target") == "bn.weight"
                   for n in gamma.graph.nodes)  # bn's scale trains


def test_fold_bn_never_raises_the_forward_peak():
    from edgetune.compiler.frontend.torch import export
    from edgetune.compiler.passes.fold_bn import fold_frozen_batchnorm

    for size in (8, 16, 32):
        forward = export(ConvNet().eval(), F.cross_entropy, *batch(size=size))
        folded = fold_frozen_batchnorm(forward.graph, trained=set())
        assert plan(folded).peak_bytes <= plan(forward.graph).peak_bytes
        assert "fold_bn_weight" in ops_of(folded)


@pytest.mark.parametrize("size, folds", [(16, True), (1, False)])
def test_fold_bn_only_where_the_weight_is_no_larger_than_the_activation(size, folds):
    model = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 1, bias=False), torch.nn.BatchNorm2d(64),
                                torch.nn.Flatten(), torch.nn.LazyLinear(4)).eval()
    x = torch.randn(1, 64, size, size)
    model(x)  # materialize the lazy head
    trainer = et.compile(model, F.cross_entropy, (x,), (torch.tensor([1]),), scheme=et.schemes.bias_only())
    assert ("fold_bn_weight" in ops(trainer)) == folds


def test_inplace_writes_over_inputs_that_die_there_and_nowhere_else():
    trainer, _, _ = trained(None, et.schemes.full())
    nodes = trainer.graph.nodes
    inplace = [n for n in nodes if n.op.endswith("_inplace")]
    assert {"relu_inplace", "hardtanh_inplace"} <= {n.op for n in inplace}
    for n in inplace:
        overwritten = storage_of(n.inputs[0])
        later = nodes[nodes.index(n) + 1:]
        assert not any(overwritten in i.inputs for i in later), f"{n.name} overwrites a value read later"


def test_inplace_allocates_less_and_never_raises_the_peak():
    before, _, _ = trained(without("inplace"), et.schemes.bias_only(), size=32)
    after, _, _ = trained(None, et.schemes.bias_only(), size=32)
    allocated = lambda t: sum(n.nbytes for n in t.graph.nodes if allocates(n))  # noqa: E731
    assert allocated(after) < allocated(before)
    assert estimated_peak(after) <= estimated_peak(before)


def test_recompute_keeps_conv_outputs_and_redoes_bn_and_activation_in_backward():
    before, _, _ = trained(without("recompute"), et.schemes.full(), size=16)
    after, _, _ = trained(None, et.schemes.full(), size=16)
    redone = [n for n in after.graph.nodes if "recompute_of" in n.meta]
    ops_redone = {n.op.removesuffix("_inplace") for n in redone}
    assert "batch_norm" in ops_redone and ops_redone <= {"batch_norm", "relu", "hardtanh"}
    assert all("grad_of" in n.meta for n in redone)  # they run in the backward
    saved = lambda t: sum(n.nbytes for n in saved_for_backward(t.graph.nodes))  # noqa: E731
    assert saved(after) < saved(before)
    assert estimated_peak(after) < estimated_peak(before)


class GatedMLP(torch.nn.Module):
    """Llama's MLP, down(silu(gate(x)) * up(x)), on [batch, tokens, width]: each projection is
    a linear over the flattened tokens, reshaped back (the view the recompute reads through)."""

    def __init__(self, width=16, hidden=64):
        super().__init__()
        self.gate = torch.nn.Linear(width, hidden, bias=False)
        self.up = torch.nn.Linear(width, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, width, bias=False)

    def forward(self, x):
        return x + self.down(F.silu(self.gate(x)) * self.up(x))


class GatedMLPs(torch.nn.Module):
    def __init__(self, width=16, depth=3):
        super().__init__()
        self.inp = torch.nn.Linear(width, width)
        self.blocks = torch.nn.Sequential(*[GatedMLP(width) for _ in range(depth)])
        self.head = torch.nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.blocks(self.inp(x)).mean(1))


# Only what comes before the MLPs (and the head) trains: the backward crosses their frozen
# projections and reads the SiLUs' saved values. Or LoRA on the gate projections: the SiLU then
# reads a sum (projection + adapter), which the backward keeps in place of the projection.
MLP_SCHEMES = {"frozen MLPs": {"inp.*": "full", "head.*": "full"}, "LoRA on gate": et.schemes.lora(4, ("gate",))}


def trained_mlp(passes, scheme, steps=2):
    torch.manual_seed(0)
    model = GatedMLPs()
    x, y = torch.randn(4, 32, 16), torch.tensor([0, 1, 2, 1])
    trainer = et.compile(model, F.cross_entropy, (x,), (y,), scheme=scheme,
                         optimizer=et.SGD(lr=0.1, momentum=0.9), passes=passes)
    losses = [trainer.step((x + s,), (y,)) for s in range(steps)]
    return trainer, model, losses


@pytest.mark.parametrize("scheme", MLP_SCHEMES.values(), ids=MLP_SCHEMES.keys())
def test_recompute_redoes_silu_from_what_the_backward_keeps(scheme):
    before, before_model, before_losses = trained_mlp(without("recompute"), scheme)
    after, after_model, after_losses = trained_mlp(None, scheme)
    redone = {n.op.removesuffix("_inplace") for n in after.graph.nodes if "recompute_of" in n.meta}
    assert redone == {"sigmoid", "mul"}
    saved = lambda t: sum(n.nbytes for n in saved_for_backward(t.graph.nodes))  # noqa: E731
    assert saved(after) < saved(before)
    assert estimated_peak(after) < estimated_peak(before)
    assert after_losses == before_losses
    for (k, a), b in zip(after_model.state_dict().items(), before_model.state_dict().values()):
        assert torch.equal(a, b), k
    for name, adapter in after.adapters.items():
        assert torch.equal(adapter, before.adapters[name]), name


def test_recompute_chosen_at_a_glance_keeps_the_peak_within_the_slack(monkeypatch):
    """Above GLANCE_ABOVE (a language model's graph) the recomputes are chosen from two plans
    instead of two a candidate: the peak stays within PEAK_SLACK of the lowest, the numbers
    are those of no recompute at all."""
    from edgetune.compiler.passes import rewrite

    scheme = MLP_SCHEMES["LoRA on gate"]
    exact, _, _ = trained_mlp(None, scheme)
    monkeypatch.setattr(rewrite, "GLANCE_ABOVE", 0)
    glance, glance_model, glance_losses = trained_mlp(None, scheme)
    _, plain_model, plain_losses = trained_mlp(without("recompute"), scheme)
    assert any("recompute_of" in n.meta for n in glance.graph.nodes)
    assert estimated_peak(glance) <= estimated_peak(exact) * (1 + rewrite.PEAK_SLACK)
    assert glance_losses == plain_losses
    for (k, a), b in zip(glance_model.state_dict().items(), plain_model.state_dict().values()):
        assert torch.equal(a, b), k


def test_recompute_does_nothing_where_the_backward_keeps_no_activation():
    trainer, _, _ = trained(None, et.schemes.bias_only())
    assert not any("recompute_of" in n.meta for n in trainer.graph.nodes)


@pytest.mark.parametrize("scheme", [et.schemes.full(), et.schemes.bias_only()], ids=["full", "bias-only"])
def test_ln_stats_changes_no_number_and_computes_the_statistics_once(scheme):
    """The row statistics the forward's kernel keeps are the ones the backward computed again."""
    def run(passes):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.GELU(),
                                    torch.nn.Linear(16, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))
        x, y = torch.randn(5, 7, 8), torch.randint(0, 3, (5, 7))
        loss = lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten())  # noqa: E731
        trainer = et.compile(model, loss, (x,), (y,), scheme=scheme, optimizer=et.SGD(lr=0.1, momentum=0.9),
                             passes=passes)
        return trainer, [trainer.step((x,), (y,)) for _ in range(3)], model
    with_pass, with_losses, with_model = run(None)
    without_pass, ref_losses, ref_model = run(without("ln_stats"))
    assert with_losses == ref_losses
    for (k, a), b in zip(with_model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(a, b), f"{k} differs with pass 'ln_stats'"
    assert ops(without_pass).count("ln_stats") == 2 and "ln_stats" not in ops(with_pass)
    assert ops(with_pass).count("layer_norm_stats") == 2
