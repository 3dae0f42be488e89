"""The fine-tuning loop: schedule, evaluation, history, checkpoint files."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import edgetune as et
from edgetune.data import LabeledData
from edgetune.apps.finetune import evaluate, finetune, fit_batch, learning_rate, load_weights, save_weights
from edgetune.models import build


def test_cosine_schedule_warms_up_then_decays_to_zero():
    rates = [learning_rate(s, 100, 0.1, "cosine", warmup=10) for s in range(100)]
    assert rates[0] == pytest.approx(0.01) and rates[9] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))
    assert rates[-1] < 1e-3
    assert learning_rate(50, 100, 0.1, "constant") == 0.1
    with pytest.raises(ValueError, match="schedule"):
        learning_rate(0, 10, 0.1, "step")


def _blobs(n: int, seed: int) -> LabeledData:
    """Two classes of 8x8 grey images, bright vs dark: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    items = (torch.rand(n, 1, 8, 8, generator=g) * 100 + labels.view(-1, 1, 1, 1) * 150).to(torch.uint8)
    return LabeledData(items, labels, ["dark", "bright"])


def _prepare(items, training):
    return (items.float().div(255).expand(-1, 3, -1, -1) * 2 - 1,)


def test_finetune_learns_and_records_history(tmp_path):
    torch.manual_seed(0)
    model = build("resnet", num_classes=2).eval()
    train, val = _blobs(64, 0), _blobs(32, 1)
    inputs, targets = _prepare(train.items[:16], True), (train.labels[:16],)
    trainer = et.compile(model, F.cross_entropy, inputs, targets, scheme=et.schemes.last(2),
                         optimizer=et.SGD(lr=0.2, momentum=0.9))
    history = finetune(trainer, train, val, _prepare, epochs=3, batch_size=16, lr=0.2, progress=False,
                       log=lambda _: None)
    assert len(history.losses) == 3 * 4 and len(history.evals) == 4
    assert history.final["accuracy"] == evaluate(model, val, _prepare).accuracy
    assert history.final["accuracy"] > 0.9 and history.losses[-1] < history.losses[0]
    assert history.lrs[0] == pytest.approx(0.2) and history.lrs[-1] < 0.2
    history.save(str(tmp_path / "h.json"))
    assert json.loads((tmp_path / "h.json").read_text())["losses"] == history.losses
    history.plot(str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_diverging_loss_stops_with_advice():
    model = build("resnet", num_classes=2).eval()
    train = _blobs(32, 0)
    trainer = et.compile(model, F.cross_entropy, _prepare(train.items[:16], True), (train.labels[:16],),
                         optimizer=et.SGD(lr=1e12))
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        finetune(trainer, train, train, _prepare, epochs=5, batch_size=16, lr=1e12, progress=False,
                 evaluate_before=False, log=lambda _: None)


def _small_resnet_trainer():
    """A trainer for batches of 4 of 8 two-class blobs, and those blobs."""
    model = build("resnet", num_classes=2).eval()
    train = _blobs(8, 0)
    return et.compile(model, F.cross_entropy, _prepare(train.items[:4], True), (train.labels[:4],)), train


def test_too_few_items_for_one_batch_is_a_clear_error():
    trainer, train = _small_resnet_trainer()
    with pytest.raises(ValueError, match="smaller --batch"):
        finetune(trainer, train, train, _prepare, epochs=1, batch_size=16, lr=0.1, progress=False)


def test_weights_round_trip_through_safetensors_with_tied_weights(tmp_path):
    model = build("llama", num_classes=50)
    path = str(tmp_path / "m.safetensors")
    save_weights(model, path, metadata={"model": "llama"})
    fresh = build("llama", num_classes=50)
    load_weights(fresh, path)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert [f for f in os.listdir(tmp_path) if f.startswith(".edgetune-")] == []


def test_a_failed_write_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    model = build("resnet", num_classes=2)
    path = str(tmp_path / "m.safetensors")
    save_weights(model, path)
    before = open(path, "rb").read()
    import safetensors.torch

    def crash(model, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", crash)
    with pytest.raises(OSError):
        save_weights(model, path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_loading_weights_of_another_model_names_the_mismatch(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_weights(build("resnet", num_classes=2), path)
    with pytest.raises(ValueError, match="does not fit"):
        load_weights(build("mobilenetv2-0.35", num_classes=2), path)


def test_fit_batch_clips_to_the_data_and_says_so():
    said = []
    assert fit_batch(32, 19, log=said.append) == 19
    assert said == ["note: only 19 training items, so the batch is 19 instead of 32"]
    assert fit_batch(8, 19, log=said.append) == 8 and len(said) == 1  # fits: nothing said
    with pytest.raises(ValueError, match="at least 1, got 0"):
        fit_batch(0, 19)
    with pytest.raises(ValueError, match="no training items"):
        fit_batch(4, 0)


def test_epochs_below_one_is_an_error_not_a_batch_complaint():
    trainer, train = _small_resnet_trainer()
    with pytest.raises(ValueError, match="epochs must be at least 1, got 0"):
        finetune(trainer, train, train, _prepare, epochs=0, batch_size=4, lr=0.1, progress=False)


def test_evaluation_takes_a_held_out_split_smaller_than_a_batch_and_refuses_an_empty_one():
    model = build("resnet", num_classes=2).eval()
    val = _blobs(3, 1)
    metrics = evaluate(model, val, _prepare, batch_size=128)
    assert metrics.accuracy in (0, 1 / 3, 2 / 3, 1) and metrics.loss > 0
    with pytest.raises(ValueError, match="held-out split is empty"):
        evaluate(model, val.subset(torch.tensor([], dtype=torch.int64)), _prepare)


@pytest.mark.parametrize("items, max_shapes, steps", [(10, 2, [4, 4, 2]), (10, 1, [4, 4]), (9, 2, [4, 4])],
                         ids=["partial-trains", "one-shape-drops-it", "one-item-left-drops-it"])
def test_the_last_partial_batch_trains_where_the_trainer_takes_its_shape(items, max_shapes, steps):
    model = build("resnet", num_classes=2).eval()
    train = _blobs(items, 0)
    trainer = et.compile(model, F.cross_entropy, _prepare(train.items[:4], True), (train.labels[:4],),
                         max_shapes=max_shapes)
    rows = []
    real_step = trainer.step
    trainer.step = lambda inputs, targets: rows.append(len(targets[0])) or real_step(inputs, targets)
    history = finetune(trainer, train, train, _prepare, epochs=2, batch_size=4, lr=0.1, progress=False,
                       evaluate_before=False, log=lambda _: None)
    assert rows == steps * 2 and len(history.losses) == len(rows)
    assert sorted(len(v.examples[1][0]) for v in trainer.variants.values()) == sorted(set(steps))


def test_finetune_evaluates_a_lora_scheme_with_its_adapters_folded_in():
    from edgetune.apps.peft import adapters_merged

    torch.manual_seed(0)
    model = build("resnet", num_classes=2).eval()
    train, val = _blobs(64, 0), _blobs(32, 1)
    inputs, targets = _prepare(train.items[:16], True), (train.labels[:16],)
    trainer = et.compile(model, F.cross_entropy, inputs, targets, scheme={"fc.weight": {"lora": 2, "alpha": 4}},
                         optimizer=et.AdamW(lr=0.05))
    history = finetune(trainer, train, val, _prepare, epochs=2, batch_size=16, lr=0.05, progress=False,
                       log=lambda _: None)
    with adapters_merged(trainer) as merged:
        as_trained = evaluate(merged, val, _prepare).loss
    assert history.final["loss"] == pytest.approx(as_trained)
    assert evaluate(model, val, _prepare).loss != pytest.approx(as_trained)  # the bare model lacks the adapters
