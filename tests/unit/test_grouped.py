"""The updates of small tensors run as one multi-tensor update in the torch backend
(edgetune/compiler/backends/grouped.py): the same numbers as one update each, the same skips."""
import copy

import pytest
import torch
import torch.nn.functional as F

import edgetune as et
from edgetune.compiler.backends import torch as torch_backend
from edgetune.compiler.backends.grouped import UpdateGroup, group_updates
from edgetune.compiler.ir.builder import Builder

from tests.unit.nets import ConvNet, batch

# Biases and BN biases (small, whole), the head (small), a conv weight on half its channels (a part).
SCHEME = {"bn.bias": "full", "bn2.bias": "full", "pw.bias": "full", "head.*": "full", "pw.weight": 0.5}
OPTIMIZERS = {
    "sgd-momentum-decay": lambda: et.SGD(0.1, momentum=0.9, weight_decay=0.01),
    "sgd-nesterov": lambda: et.SGD(0.1, momentum=0.9, nesterov=True),
    "sgd-plain": lambda: et.SGD(0.1),
    "adamw": lambda: et.AdamW(0.01, weight_decay=0.1),
    "adamw-no-decay": lambda: et.AdamW(0.01, weight_decay=0.0),
}


def _trainer(model, grouped: bool, optimizer, monkeypatch, on_nonfinite="skip"):
    monkeypatch.setattr(torch_backend, "GROUP_UPDATES", grouped)
    return et.compile(model, F.cross_entropy, *batch(), scheme=SCHEME, optimizer=optimizer,
                      on_nonfinite=on_nonfinite)


def _pair(optimizer, monkeypatch, on_nonfinite="skip"):
    model = ConvNet().eval()
    other = copy.deepcopy(model)
    return ((model, _trainer(model, False, optimizer(), monkeypatch, on_nonfinite)),
            (other, _trainer(other, True, optimizer(), monkeypatch, on_nonfinite)))


def _same(a, b) -> bool:
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def _state_same(a, b) -> bool:
    return all(torch.equal(v, b.state[k]) for k, v in a.state.items())


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("on_nonfinite", ["skip", "apply"])
def test_grouped_updates_give_the_same_weights_and_state_to_the_bit(optimizer, on_nonfinite, monkeypatch):
    (one_model, one), (grouped_model, grouped) = _pair(OPTIMIZERS[optimizer], monkeypatch, on_nonfinite)
    assert "_op_update_group" in grouped.compiled.source and "_op_update_group" not in one.compiled.source
    assert grouped.compiled.source.count("_op_update_ok") < one.compiled.source.count("_op_update_ok") or \
        on_nonfinite == "apply"
    for s in range(3):
        assert one.step(*batch(seed=s)) == grouped.step(*batch(seed=s))
    assert _same(one_model, grouped_model) and _state_same(one, grouped)


def _nan_in_call(trainer, kernel, shape, which):
    """The `which`-th result of `kernel` of this shape (in the first step after this) gets NaN
    in its first entry."""
    namespace = trainer.compiled.fn.__globals__
    real, count = namespace[f"_op_{kernel}"], [0]

    def faulty(*args, **kwargs):
        out = real(*args, **kwargs)
        if tuple(out.shape) == shape and out.is_floating_point():
            count[0] += 1
            if count[0] == which:
                out[0] = float("nan")
        return out

    namespace[f"_op_{kernel}"] = faulty


@pytest.mark.parametrize("shape, which", [((8,), 1), ((8,), 2), ((16,), 1)])  # bn2.bias, bn.bias, pw.bias
def test_a_non_finite_gradient_skips_its_own_update_only(shape, which, monkeypatch):
    (one_model, one), (grouped_model, grouped) = _pair(OPTIMIZERS["adamw"], monkeypatch)
    one.step(*batch(seed=0)), grouped.step(*batch(seed=0))
    for trainer in (one, grouped):  # a bias gradient (a sum over the batch and pixels) goes NaN
        _nan_in_call(trainer, "sum", shape, which)
    one.step(*batch(seed=1)), grouped.step(*batch(seed=1))
    assert one.last_step.skipped == grouped.last_step.skipped == 1
    assert _same(one_model, grouped_model) and _state_same(one, grouped)
    assert all(torch.isfinite(v).all() for v in grouped_model.state_dict().values())


def test_an_update_is_not_delayed_past_a_reader_of_its_parameter():
    b = Builder()
    x = b.input("x", (4,), torch.float32, kind="input", index=0)
    w1, w2 = (b.input(f"w{k}", (4,), torch.float32, kind="param", target=f"w{k}") for k in (1, 2))
    lr, step = b.input("lr", (), torch.float64, kind="hyper"), b.input("step", (), torch.int64, kind="hyper")
    g1, g2 = b.emit("mul", x, w1), b.emit("mul", x, w2)
    sgd = dict(part=None, n_state=0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False)
    first = b.emit("sgd_update", w1, g1, lr, step, **sgd)
    reads_new_w1 = b.emit("mul", x, w1)  # w1's value after its update
    reads_old_w2 = b.emit("mul", x, w2)  # w2's value before its update
    second = b.emit("sgd_update", w2, g2, lr, step, **sgd)
    nodes = [g1, g2, first, reads_new_w1, second]
    assert group_updates(nodes, 1 << 20) == nodes  # w1's update cannot wait past its reader
    nodes = [g1, g2, first, reads_old_w2, second]
    scheduled = group_updates(nodes, 1 << 20)
    assert scheduled[:3] == [g1, g2, reads_old_w2]
    assert isinstance(scheduled[3], UpdateGroup) and scheduled[3].members == [first, second]


def test_the_gradients_a_group_holds_fit_its_budget():
    b = Builder()
    x = b.input("x", (4,), torch.float32, kind="input", index=0)
    lr, step = b.input("lr", (), torch.float64, kind="hyper"), b.input("step", (), torch.int64, kind="hyper")
    sgd = dict(part=None, n_state=0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False)
    nodes = []
    for k in range(4):
        w = b.input(f"w{k}", (4,), torch.float32, kind="param", target=f"w{k}")
        g = b.emit("mul", x, w)
        nodes += [g, b.emit("sgd_update", w, g, lr, step, **sgd)]
    groups = [n for n in group_updates(nodes, 32) if isinstance(n, UpdateGroup)]  # 2 gradients of 16 bytes
    assert [len(g.members) for g in groups] == [2, 2]
    # below the step's peak (room beside every node) the group may hold more, as far as the
    # node with the least room between its members allows
    room = {n: 32 for n in nodes}
    assert [len(g.members) for g in group_updates(nodes, 32, room) if isinstance(g, UpdateGroup)] == [4]
    room[nodes[4]] = 0  # the third gradient's own node: the first two gradients, held across it, fill the budget
    assert [len(g.members) for g in group_updates(nodes, 32, room) if isinstance(g, UpdateGroup)] == [2, 2]
