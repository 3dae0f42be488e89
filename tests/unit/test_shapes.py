"""Shape buckets: one Trainer, a compiled step per batch shape (compile(max_shapes=N)), all
sharing the parameters, optimizer state and partial-channel choice, matching eager PyTorch."""
import copy

import pytest
import torch
import torch.nn.functional as F

import edgetune as et
from edgetune.compiler.inputs import BatchError
from edgetune.compiler.memory import BudgetError
from tests.reference import assert_models_match, padded_lm_batches, train_eager
from tests.unit.test_hostile import assert_unchanged, snapshot
from tests.unit.nets import ConvNet, batch

# Magnitude-chosen channels: a compile for a later shape must keep the first compile's
# choice, not choose again on the trained weights.
SCHEME = {"pw.weight": 0.5, "stem.weight": 0.25, "*.bias": "full", "head.*": "full"}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_batches_of_other_sizes_train_as_in_eager(optimizer):
    model = ConvNet().eval()
    reference = copy.deepcopy(model)
    # Full batches of 4, a last partial batch of 3, another epoch, a 9x9 image batch.
    batches = [batch(4, seed=0), batch(4, seed=1), batch(3, seed=2), batch(4, seed=3), batch(2, size=9, seed=4)]
    ours, theirs = {"sgd": (et.SGD(lr=0.1, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
                    "adamw": (et.AdamW(lr=0.01), lambda ps: torch.optim.AdamW(ps, lr=0.01))}[optimizer]
    trainer = et.compile(model, F.cross_entropy, *batches[0], scheme=SCHEME, optimizer=ours, max_shapes=3)
    masks = trainer.trained_masks()
    losses = [trainer.step(*b) for b in batches]
    assert trainer.trained_masks().keys() == masks.keys()
    assert all(torch.equal(trainer.trained_masks()[k], m) for k, m in masks.items())
    want = train_eager(reference, F.cross_entropy, batches, masks, theirs)
    assert losses == pytest.approx(want, rel=1e-5)
    assert_models_match(model, reference)
    assert trainer.steps == 5 and len(trainer.variants) == 3
    assert [v.shapes[1] for v in trainer.variants.values()] == [(3,), (4,), (2,)]  # least recently used first


def test_the_least_recently_used_shape_goes_beyond_max_shapes():
    model = ConvNet().eval()
    trainer = et.compile(model, F.cross_entropy, *batch(4), scheme=SCHEME, max_shapes=2)
    for n in (4, 3, 4, 2):
        trainer.step(*batch(n))
    assert [v.shapes[1] for v in trainer.variants.values()] == [(4,), (2,)]  # 3 was used least recently
    text = str(trainer.report())
    assert "step for batch shapes 2x3x8x8 2: predicted peak" in text and "step for batch shapes 4x3x8x8 4" in text
    assert "x3x8x8 3:" not in text


def test_one_shape_by_default_and_a_new_shape_is_refused_with_nothing_changed():
    model = ConvNet().eval()
    trainer = et.compile(model, F.cross_entropy, *batch(4), scheme=SCHEME)
    trainer.step(*batch(4))
    before = snapshot(model, trainer)
    with pytest.raises(BatchError, match=r"input 0 is float32\[3, 3, 8, 8\].*max_shapes=N"):
        trainer.step(*batch(3))
    assert_unchanged(before, model, trainer)


def test_a_shape_the_model_cannot_take_is_refused_with_nothing_changed():
    model = ConvNet().eval()
    trainer = et.compile(model, F.cross_entropy, *batch(4), scheme=SCHEME, max_shapes=4)
    (x,), (y,) = batch(4)
    before = snapshot(model, trainer)
    with pytest.raises(BatchError, match="no step could be compiled for batch shapes"):
        trainer.step((x[:, :2],), (y,))  # two colour channels: the stem's conv takes three
    with pytest.raises(BatchError, match="number of dimensions"):
        trainer.step((x[0],), (y,))
    assert_unchanged(before, model, trainer)
    assert len(trainer.variants) == 1


def test_each_new_shape_is_held_to_the_memory_budget():
    model = ConvNet().eval()
    # The peak of these tiny steps is mostly kernel scratch, measured at each compile: leave room.
    budget = 2 * et.compile(copy.deepcopy(model), F.cross_entropy, *batch(4), scheme=SCHEME).report().predicted_peak_bytes
    trainer = et.compile(model, F.cross_entropy, *batch(4), scheme=SCHEME, memory_budget=budget, max_shapes=4)
    trainer.step(*batch(2))
    before = snapshot(model, trainer)
    with pytest.raises(BudgetError, match=r"batch shapes \(\(256, 3, 8, 8\), \(256,\)\)"):
        trainer.step(*batch(256))
    assert_unchanged(before, model, trainer)
    assert len(trainer.variants) == 2


def test_int8_frozen_weights_stay_int8_across_shapes():
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    trainer = et.compile(model, F.cross_entropy, (x,), (y,), scheme={"2.*": "full"}, frozen_weights="int8",
                         max_shapes=2)
    first = trainer.step((x,), (y,))
    assert model[0].weight.numel() == 0  # its float storage is released
    trainer.step((x[:2],), (y[:2],))
    assert model[0].weight.numel() == 0 and len(trainer.variants) == 2
    assert trainer.step((x,), (y,)) < first  # the same step again, after two updates


def test_a_language_model_takes_sequence_buckets():
    pytest.importorskip("transformers")
    from edgetune.models.hf import causal_lm_loss, tiny_causal_lm

    model = tiny_causal_lm("llama").double()
    reference = copy.deepcopy(model)
    short, long_ = padded_lm_batches(n=2, length=8), padded_lm_batches(n=1, length=12)
    batches = [short[0], long_[0], short[1]]
    scheme = {"model.layers.1.self_attn.q_proj.weight": 0.5, "model.layers.1.*norm.weight": "full"}
    trainer = et.compile(model, causal_lm_loss, *batches[0], scheme=scheme, max_shapes=2,
                         optimizer=et.SGD(lr=0.1, momentum=0.9))
    losses = [trainer.step(*b) for b in batches]
    want = train_eager(reference, causal_lm_loss, batches, trainer.trained_masks(),
                       lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    assert losses == pytest.approx(want, rel=1e-5)  # transformers' float32 RMSNorm: see test_hf_models
    assert_models_match(model, reference, rtol=1e-5, atol=1e-6)
    assert sorted(v.shapes[0][1] for v in trainer.variants.values()) == [8, 12]


def test_onnx_export_writes_the_examples_step_whatever_ran_last(tmp_path):
    pytest.importorskip("onnx")
    import json

    model = ConvNet().eval()
    trainer = et.compile(model, F.cross_entropy, *batch(4), scheme=SCHEME, max_shapes=2)
    trainer.step(*batch(3))
    trainer.step(*batch(2))  # the examples' step is no longer held
    trainer.export_onnx(tmp_path / "step")
    manifest = json.loads((tmp_path / "step" / "manifest.json").read_text())
    shapes = [i["shape"] for i in manifest["inputs"] if i["kind"] in ("input", "target")]
    assert shapes == [[4, 3, 8, 8], [4]]


def test_each_compile_says_its_phases_under_edgetune_debug(monkeypatch, capsys):
    monkeypatch.setenv("EDGETUNE_DEBUG", "1")
    trainer = et.compile(ConvNet().eval(), F.cross_entropy, *batch(4), scheme=SCHEME, max_shapes=2)
    trainer.step(*batch(3))
    said = [line for line in capsys.readouterr().out.splitlines() if "compiled the step for batch shapes" in line]
    assert len(said) == 2 and all(phase in said[1] for phase in ("export", "graph", "plan"))
    assert ", (3,)):" in said[1]
    phases = [v.seconds for v in trainer.variants.values()]
    assert all(set(p) == {"export", "graph", "plan", "backend"} and min(p.values()) > 0 for p in phases)


def test_the_compile_time_bench_times_a_first_compile_and_a_new_bucket():
    pytest.importorskip("transformers")
    from bench.compile_time import parse_args, run_edgetune

    result = run_edgetune(parse_args(["--tiny", "--scheme", "lm-sparse:1", "--seq-len", "16", "--bucket", "8"]))
    assert set(result["phases"]) == {"16", "8"} and result["first"] > 0 and result["new_bucket"] > 0
    assert result["phases"]["8"]["export"] > result["phases"]["8"]["backend"]
