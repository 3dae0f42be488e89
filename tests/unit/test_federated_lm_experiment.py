"""experiments.federated_lm without Ray: its tasks on the tiny random LM (clients cut from the
training split, the test split kept by the server, both methods compile and step) and its
section's goals computed from the numbers."""
import copy
import math

import pytest

pytest.importorskip("flwr", reason="the federated extra: pip install -e '.[federated]'")

import edgetune as et  # noqa: E402
from experiments import federated_lm as fl  # noqa: E402

TINY = dict(fl.SETTINGS, model="tiny-llama", test=20, val=10, clients=3, rounds=2, local_steps=2, k=64,
            mezo_scheme="lm-sparse:2", threads=None)


@pytest.fixture(scope="module", autouse=True)
def compile_in_process():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGETUNE_COMPILE_IN_PROCESS", "1")
        yield


@pytest.fixture(scope="module")
def data():
    return fl.split(TINY)


def test_the_clients_share_the_training_split_and_the_server_keeps_the_test_split(data):
    _, train, val, test = data
    task, parts, _, _ = fl.make_task("fedkseed", 1e-4, TINY, data)
    seen = sorted(i for p in parts for i in p)
    assert seen == list(range(len(train))) and len(parts) == TINY["clients"]
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # iid: near-equal parts
    (ids, mask), (labels,) = task.train_data(1, TINY["clients"])
    assert ids.shape == (len(parts[1]), TINY["seq_len"]) and (ids == train.input_ids[parts[1]]).all()
    (tids, _), (tlabels,) = task.central_test_data()
    assert (tids == test.input_ids).all() and (tlabels == test.labels).all()
    assert len(test) == TINY["test"] and len(val) == TINY["val"]
    with pytest.raises(ValueError, match="cut for 3 clients"):
        task.train_data(0, 2)


@pytest.mark.parametrize("method, optimizer", [("fedkseed", et.MeZO), ("lora", et.AdamW)])
def test_each_method_compiles_and_steps_on_a_client(data, method, optimizer):
    task, _, _, _ = fl.make_task(method, 1e-3, TINY, data)
    assert isinstance(task.optimizer, optimizer) and task.local_steps == 2 and task.batch_size == 4
    client = task.train_data(0, TINY["clients"])
    trainer = task.compile(client)
    from edgetune.federated.client import evaluate, rows

    loss = trainer.step(*rows(client, range(4)))
    assert math.isfinite(loss)
    assert math.isfinite(evaluate(trainer, task.loss, task.central_test_data())["eval-loss"])
    if method == "lora":
        assert trainer.adapters  # only the adapters train
    else:
        assert task.optimizer.eps == TINY["mezo_eps"] and task.optimizer.weight_decay == 0


def _results(fedkseed_last=1.85, down=8192, up=120):
    s = dict(fl.SETTINGS)
    rounds = lambda first, last, d, u: [  # noqa: E731
        {"round": r, "test": first if r == 0 else last, "down": [] if r == 0 else [d] * 4,
         "up": [] if r == 0 else [u] * 4, "seconds": 10.0 * (r + 1)} for r in range(s["rounds"] + 1)]
    return {"meta": {"settings": s, "cpu": "x86_64", "date": "2026-12-02"},
            "before": {"test": 1.90, "val": 1.89},
            "tune": {"fedkseed@0.0001": {"method": "fedkseed", "lr": 1e-4, "val": 1.88, "diverged": False},
                     "fedkseed@0.001": {"method": "fedkseed", "lr": 1e-3, "val": float("nan"), "diverged": True},
                     "lora@0.003": {"method": "lora", "lr": 3e-3, "val": 1.80, "diverged": False}},
            "federated": {
                "fedkseed": {"method": "fedkseed", "lr": 1e-4, "rounds": rounds(1.90, fedkseed_last, down, up),
                             "seconds": 70.0, "trained_entries": 2992896, "slice_bytes": 4 * 2992896,
                             "replay_seconds": 5.0, "replayed_seeds": 200, "directions": 1},
                "lora": {"method": "lora", "lr": 3e-3, "rounds": rounds(1.90, 1.80, 1843200, 1843200),
                         "seconds": 80.0, "trained_entries": 460800, "slice_bytes": 1843200}}}


def test_the_section_computes_the_goals_from_the_numbers():
    text = fl.section(_results())
    assert text.startswith(fl.TITLE) and "`python -m experiments.federated_lm`" in text
    assert "8,312 B (8,192 down + 120 up) — met" in text
    assert "8,192 + 120 B" in text and "— met." in text
    assert "1.8500 after 6 rounds against 1.9000 pretrained (-0.05000) — met" in text
    assert "0.001 diverged" in text and "0.0001: 1.8800 (chosen)" in text
    assert "| 6 | 1.8500 | 70 | 1.8000 | 70 |" in text
    worse = fl.section(_results(fedkseed_last=1.91))
    assert "1.9100 after 6 rounds against 1.9000 pretrained (+0.01000) — missed" in worse
    big = fl.section(_results(down=8 * 4096))
    assert "— missed (the bytes differ from the formula)" in big
    assert "(32,768 down + 120 up) — missed" in big


def test_the_section_before_any_federated_run():
    r = _results()
    del r["federated"]
    text = fl.section(copy.deepcopy(r))
    assert "not measured" in text and "Pretrained: test loss 1.9000" in text


def test_the_chunked_loss_is_causal_lm_loss():
    import torch

    from edgetune.models.hf import causal_lm_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 16, 50, generator=g)
    labels = torch.randint(0, 50, (20, 16), generator=g)
    labels[:, :5] = -100
    labels[3] = -100  # an example with nothing to learn
    assert torch.allclose(fl.lm_loss(logits, labels), causal_lm_loss(logits, labels), rtol=1e-6)
    assert torch.equal(fl.lm_loss(logits[:4], labels[:4]), causal_lm_loss(logits[:4], labels[:4]))
