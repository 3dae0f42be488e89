"""Property: whatever model, scheme and batch, a step either matches PyTorch eager or raises an
edgetune error before anything changes.

Hypothesis draws a small model (an MLP or a conv net: widths, activation, optional norm, train
or eval mode), a scheme (full, biases only, a ratio of the first layer's input channels, the
first layer frozen), an optimizer, the non-finite mode, and then a few batches, each valid or
hostile (wrong shape, dtype or count, a non-tensor, NaN or inf, a class label out of range).
Valid batches must train exactly as eager PyTorch does in float64; hostile ones must be
refused with a one-line error, leaving parameters, buffers, optimizer state and the step count
as they were.

Compiling is what costs (~0.3-1 s a trainer), so the compiled configurations are a fixed,
seeded sample of COMPILES from the whole product space, and each is compiled once and reused:
an example gets fresh weights and zeroed optimizer state in the cached trainer.
"""
from __future__ import annotations

import copy
import itertools
import random
from collections import OrderedDict
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edgetune as et
from edgetune.compiler.inputs import BatchError
from tests.reference import assert_models_match, train_eager

CLASSES, FEATURES, CHANNELS, SIZE = 3, 5, 3, 5
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
SCHEMES = {
    "full": {"*": "full"},
    "biases": {"*.bias": "full"},
    "ratio": {"inp.weight": {"ratio": 0.5, "select": "magnitude"}, "head.*": "full"},
    "first channels": {"inp.weight": {"ratio": 0.5, "select": "first"}, "*.bias": "full"},
    "first frozen": {"inp.*": "frozen", "*": "full"},
}
OPTIMIZERS = {
    "sgd": (lambda: et.SGD(lr=0.1, momentum=0.9, weight_decay=1e-3),
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adamw": (lambda: et.AdamW(lr=0.01, weight_decay=0.01),
              lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.01)),
}


@dataclass(frozen=True)
class Config:
    """Everything a compile depends on."""

    kind: str  # "mlp" or "conv"
    width: int
    activation: str
    norm: bool
    train: bool
    scheme: str
    optimizer: str
    on_nonfinite: str
    rows: int  # the batch size


def _all_configs() -> list[Config]:
    space = itertools.product(("mlp", "conv"), (2, 4, 7), ACTIVATIONS, (False, True), (False, True), SCHEMES,
                              OPTIMIZERS, ("skip", "raise", "apply"), (3, 4))
    return [Config(*c) for c in space]


# A seeded sample of the product space (6,480 configurations), the same in every run: every
# value of every axis appears, and every scheme on both kinds of model (checked below). 30
# compiles are about 20 s of the test's CPU time; 500 examples on them, about 5 s.
COMPILES = random.Random(14).sample(_all_configs(), 30)


def build(config: Config) -> nn.Module:
    """A float64 model of `config`; a layer before a norm has no bias (the norm would cancel its
    gradient to rounding noise, which AdamW would then amplify into a real step)."""
    act = ACTIVATIONS[config.activation]
    if config.kind == "mlp":
        layers = [("inp", nn.Linear(FEATURES, config.width, bias=not config.norm))]
        layers += [("norm", nn.BatchNorm1d(config.width) if config.train else nn.LayerNorm(config.width))] * config.norm
        layers += [("act", act()), ("head", nn.Linear(config.width, CLASSES))]
    else:
        layers = [("inp", nn.Conv2d(CHANNELS, config.width, 3, bias=not config.norm))]
        layers += [("norm", nn.BatchNorm2d(config.width))] * config.norm
        layers += [("act", act()), ("pool", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten()),
                   ("head", nn.Linear(config.width, CLASSES))]
    return nn.Sequential(OrderedDict(layers)).double().train(config.train)


def example_batch(config: Config, generator: torch.Generator) -> tuple[tuple, tuple]:
    shape = (config.rows, FEATURES) if config.kind == "mlp" else (config.rows, CHANNELS, SIZE, SIZE)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (config.rows,), generator=generator)
    if config.rows > 1 and torch.rand((), generator=generator) < 0.3:
        y[0] = -100  # cross-entropy's ignore_index: a valid label (never all of them: the loss would be 0/0)
    return (x,), (y,)


@pytest.fixture(autouse=True, scope="module")
def _compile_in_process():
    # A forked compile re-imports torch.export in every child (seconds each); the in-process
    # compile is the same (tests/unit/test_trainer.py checks that).
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGETUNE_COMPILE_IN_PROCESS", "1")
        yield


_trainers: dict[Config, tuple[nn.Module, et.Trainer]] = {}


def trainer_for(config: Config) -> tuple[nn.Module, et.Trainer]:
    if config not in _trainers:
        model = build(config)
        examples = example_batch(config, torch.Generator().manual_seed(0))
        trainer = et.compile(model, F.cross_entropy, *examples, scheme=SCHEMES[config.scheme],
                             optimizer=OPTIMIZERS[config.optimizer][0](), on_nonfinite=config.on_nonfinite)
        _trainers[config] = model, trainer
    return _trainers[config]


def fresh_start(config: Config, seed: int) -> tuple[nn.Module, et.Trainer]:
    """The cached trainer with new weights, zero optimizer state and no steps taken. In place:
    the compiled step holds these very tensors."""
    model, trainer = trainer_for(config)
    torch.manual_seed(seed)
    model.load_state_dict(build(config).state_dict())
    for state in trainer.state.values():
        state.zero_()
    trainer.steps, trainer.lr = 0, OPTIMIZERS[config.optimizer][0]().lr
    return model, trainer


# -- hostile batches: each returns (inputs, targets) that the step must refuse -----------------

def _nonfinite(config, x, y, draw):
    x = x.clone()
    for _ in range(draw(st.integers(1, 3))):
        index = tuple(draw(st.integers(0, n - 1)) for n in x.shape)
        x[index] = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    return (x,), (y,)


def _label_out_of_range(config, x, y, draw):
    y = y.clone()
    y[draw(st.integers(0, len(y) - 1))] = draw(st.sampled_from([CLASSES, CLASSES + 5, -1, -99, 2**40]))
    return (x,), (y,)


def _wrong_shape(config, x, y, draw):
    rows = draw(st.sampled_from([1, config.rows - 1, config.rows + 1]))
    if draw(st.booleans()):
        return (x[:rows] if rows <= len(x) else torch.cat([x, x[:1]]),), (y[:rows] if rows <= len(y) else
                                                                          torch.cat([y, y[:1]]),)
    return (x[..., :-1],), (y,)  # one feature or pixel column short


def _wrong_dtype(config, x, y, draw):
    return draw(st.sampled_from([((x.float(),), (y,)), ((x,), (y.int(),)), ((x,), (y.double(),)),
                                 ((x.half(),), (y,))]))


def _wrong_count(config, x, y, draw):
    return draw(st.sampled_from([((x, x), (y,)), ((), (y,)), ((x,), ()), ((x,), (y, y))]))


def _not_a_tensor(config, x, y, draw):
    return draw(st.sampled_from([((x.tolist(),), (y,)), ((x,), (y.tolist(),)), ((x.numpy(),), (y,))]))


HOSTILE = {"non-finite": _nonfinite, "label out of range": _label_out_of_range, "wrong shape": _wrong_shape,
           "wrong dtype": _wrong_dtype, "wrong count": _wrong_count, "not a tensor": _not_a_tensor}


def snapshot(model, trainer):
    return (copy.deepcopy(model.state_dict()), {k: v.clone() for k, v in trainer.state.items()}, trainer.steps)


def assert_same(before, after):
    for b, a in zip(before[:2], after[:2]):
        changed = [k for k in b if not torch.equal(b[k], a[k])]  # NaN is never in a valid state here
        assert not changed, f"a refused batch changed {changed}"
    assert before[2] == after[2], "a refused batch counted as a step"


def refused(trainer, model, batch, what):
    before = snapshot(model, trainer)
    with pytest.raises((BatchError, TypeError)) as err:
        trainer.step(*batch)
    message = str(err.value)
    assert "\n" not in message and message.split()[0] in ("input", "target", "step()"), f"{what}: {message}"
    assert_same(before, snapshot(model, trainer))


@settings(max_examples=500, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(config=st.sampled_from(COMPILES), seed=st.integers(0, 2**16), data=st.data())
def test_a_step_matches_eager_or_refuses_the_batch_with_nothing_changed(config, seed, data):
    model, trainer = fresh_start(config, seed)
    reference = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    valid = []
    for _ in range(data.draw(st.integers(1, 3), label="batches")):
        batch = example_batch(config, generator)
        kind = data.draw(st.sampled_from(["valid", "valid", *HOSTILE]), label="batch")
        if kind == "non-finite" and config.on_nonfinite == "apply":
            kind = "valid"  # "apply" lets a non-finite batch through by design (tests/unit/test_hostile.py)
        if kind == "valid":
            trainer.step(*batch)
            assert trainer.last_step.skipped == 0
            valid.append(batch)
        else:
            refused(trainer, model, HOSTILE[kind](config, *batch[0], *batch[1], data.draw), kind)
    assert trainer.steps == len(valid)
    if valid:
        train_eager(reference, F.cross_entropy, valid, trainer.trained_masks(), OPTIMIZERS[config.optimizer][1])
    assert_models_match(model, reference, rtol=1e-7, atol=1e-10)


def test_the_sample_covers_every_value_of_every_axis():
    everything = _all_configs()
    for axis in Config.__dataclass_fields__:
        assert {getattr(c, axis) for c in COMPILES} == {getattr(c, axis) for c in everything}, axis
    assert {(c.kind, c.scheme) for c in COMPILES} == set(itertools.product(("mlp", "conv"), SCHEMES))
