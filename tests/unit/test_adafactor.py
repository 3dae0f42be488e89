"""Adafactor as the compiled step's optimizer: against torch.optim.Adafactor run eagerly on the
same trained slices (float64, parameter and state after every step), and its factored state
far smaller than AdamW's in the memory plan. Its ONNX lowering is tested with the other ops'
(tests/ops/test_onnx_lowering.py) and a whole exported step (tests/unit/test_onnx_export.py)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import edgetune as et
from edgetune.compiler.optim import by_name
from edgetune.compiler.scheme import SchemeError
from tests.reference import TrainedSlices, assert_untrained_channels_kept

# 0: a conv weight (4-D, factored over its last two dims), 2 of its 3 input channels by
# magnitude (gathered); 3: a linear's first 5 input channels; 5: whole; biases whole (1-D).
PARTIAL = {"0.weight": 0.5, "3.weight": {"ratio": 0.5, "select": "first"}, "5.weight": "full", "*.bias": "full"}


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 10), nn.Tanh(),
                         nn.Linear(10, 4)).double()


def batches(n: int = 6) -> list:
    g = torch.Generator().manual_seed(5)
    return [((torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64),), (torch.randint(0, 4, (8,), generator=g),))
            for _ in range(n)]


def train_eager(model, data, trainer, **hyper) -> dict:
    """torch.optim.Adafactor on leaves holding exactly what `trainer` trains (a slice is a leaf
    of its own, written into its weight for each forward): {name: (slice or None, leaf, optimizer)}."""
    trained = TrainedSlices(model, trainer)
    optimizer = torch.optim.Adafactor(list(trained.leaves.values()), foreach=False, **hyper)
    for inputs, targets in data:
        loss = F.cross_entropy(torch.func.functional_call(model, trained.weights(), inputs), *targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {n: (trained.parts[n], leaf, optimizer) for n, leaf in trained.leaves.items()}


@pytest.mark.parametrize("scheme, hyper", [
    (PARTIAL, dict(lr=0.05, weight_decay=0.1)),
    (et.schemes.full(), dict(lr=0.3, beta2_decay=-0.5, eps=(1e-30, 1e-3), d=1.0)),  # later steps clip: lr > 1/sqrt(t)
])
def test_parameters_and_state_match_torch_adafactor(scheme, hyper):
    model, data = net(), batches()
    ref, before = copy.deepcopy(model), copy.deepcopy(model.state_dict())
    trainer = et.compile(model, F.cross_entropy, *data[0], scheme=scheme, optimizer=et.Adafactor(**hyper))
    for b in data:
        trainer.step(*b)
    params = dict(model.named_parameters())
    eager = train_eager(ref, data, trainer, **hyper)
    assert set(eager) == set(params)  # every tensor of the net trains under both schemes
    for name, (part, leaf, optimizer) in eager.items():
        got = params[name].detach()
        torch.testing.assert_close(got.index_select(*part) if part else got, leaf.detach(), rtol=1e-9, atol=1e-12,
                                   msg=lambda m: f"{name}: {m}")
        keys = ("row_var", "col_var") if leaf.dim() > 1 else ("variance",)
        for key in keys:
            torch.testing.assert_close(trainer.state[f"{name}:{key}"], optimizer.state[leaf][key], rtol=1e-9,
                                       atol=1e-15, msg=lambda m: f"{name}:{key}: {m}")
        if part:
            assert_untrained_channels_kept(got, before[name], part)


def test_the_state_is_factored_over_the_last_two_dims():
    trainer = et.compile(net(), F.cross_entropy, *batches(1)[0], scheme=PARTIAL, optimizer=et.Adafactor())
    shapes = {k: tuple(v.shape) for k, v in trainer.state.items()}
    assert shapes["0.weight:row_var"] == (6, 2, 3, 1) and shapes["0.weight:col_var"] == (6, 2, 1, 3)  # 2 of 3 in
    assert shapes["3.weight:row_var"] == (10, 1) and shapes["3.weight:col_var"] == (1, 48)  # 48 of 96 inputs
    assert shapes["0.bias:variance"] == (6,)


def test_the_plan_predicts_far_less_optimizer_state_than_adamw():
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8))
    batch = (torch.randn(4, 256),), (torch.randint(0, 8, (4,)),)
    state = {name: et.compile(copy.deepcopy(model), F.cross_entropy, *batch, optimizer=opt).report().state_bytes
             for name, opt in (("adamw", et.AdamW()), ("adafactor", et.Adafactor()))}
    weights = sum(p.numel() for p in model.parameters()) * 4
    assert state["adamw"] == 2 * weights
    assert state["adafactor"] < weights / 50  # rows and columns, and the biases' variances


@pytest.mark.parametrize("make, message", [
    (lambda: et.Adafactor(lr=-1), "lr must be >= 0"),
    (lambda: et.Adafactor(beta2_decay=0.5), "beta2_decay must be <= 0"),
    (lambda: et.Adafactor(d=0.5), "d (the update's RMS clip) must be >= 1"),
    (lambda: et.Adafactor(eps=(None, -1)), "eps must be"),
])
def test_bad_settings_are_errors(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_touched_rows_are_refused_with_what_to_do():
    with pytest.raises(SchemeError, match="touched.*use AdamW"):
        et.Adafactor().update_for("embed.weight", (100, 8), table=True, touched=True)


def test_by_name_makes_adafactor_with_the_rate_and_decay():
    opt = by_name("adafactor", 0.02, 0.1)
    assert isinstance(opt, et.Adafactor) and opt.lr == 0.02 and opt.weight_decay == 0.1
