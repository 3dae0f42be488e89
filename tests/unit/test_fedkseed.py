"""FedKSeed on Flower (edgetune.federated.fedkseed): MeZO nodes send (seed index, gradient)
pairs, the server K per-seed sums; every model is theta_0 replayed with those sums."""
import os
import time

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("flwr", reason="the federated extra: pip install -e '.[federated]'")
pytestmark = pytest.mark.filterwarnings("ignore:Tip. In future versions of Ray:FutureWarning")

import edgetune as et  # noqa: E402
from edgetune.federated import client as fclient  # noqa: E402
from edgetune.federated import fedkseed as fk  # noqa: E402
from edgetune.federated import slices  # noqa: E402
from edgetune.federated.server import History  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def compile_in_process():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGETUNE_COMPILE_IN_PROCESS", "1")
        yield


# -- a toy task: 3 linearly separable classes of 8 features, an MLP in float64 ---------------

W = torch.tensor([[1., -1, 0], [0, 1, -1], [-1, 0, 1], [1, 1, -2], [0, 0, 0], [1, 0, 0], [0, -1, 0], [0, 0, 1]],
                 dtype=torch.float64)
SCHEME = {"0.weight": 0.5, "*.bias": "full", "2.weight": "full"}
LR, EPS, STEPS = 0.05, 1e-3, 20


def builder(width):
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 3)).double()
    return build


def toy(seed, n):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g, dtype=torch.float64)
    return (x,), ((x @ W).argmax(-1),)


def train_data(partition, num_partitions):
    return toy(100 + partition, 32 + 32 * partition)  # unequal sizes: the weights matter


def held_out(partition, num_partitions):
    return toy(200 + partition, 64)


def central_data():
    return toy(999, 128)


def task(width=16, **kw):
    return fclient.Task(model=builder(width), loss=F.cross_entropy, train_data=train_data, test_data=held_out,
                        central_test_data=central_data, scheme=SCHEME, optimizer=et.MeZO(lr=LR, eps=EPS),
                        local_steps=STEPS, batch_size=16, **kw)


class Federation:
    """The FedKSeed server strategy and client app driven in this process, message by message."""

    def __init__(self, t, k, clients=3):
        self.task, self.k, self.clients = t, k, clients
        self.server = t.compile(central_data())
        self.server.optimizer.seeds = fk.pool(k)
        self.model = fk.Model(self.server, fk.pool(k))
        self.history = History()
        self.strategy = fk.FedKSeed(self.model, self.history, LR, STEPS)
        self.app = fk.client_app(t)
        self.config = {"pool-size": k, "pool-seed": 0, "layout-digest": self.model.digest,
                       "lr": LR, "local-steps": STEPS}
        self.coefficients = np.zeros(k)

    def send(self, partition, kind="train", server_round=1, coefficients=None):
        c = self.coefficients if coefficients is None else coefficients
        md = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=10 + partition, reply_to_message_id="",
                      group_id="1", created_at=time.time(), ttl=3600.0, message_type=kind)
        msg = Message(content=RecordDict({"arrays": ArrayRecord({fk.COEFFICIENTS: Array(c)}),
                                          "config": ConfigRecord({"server-round": server_round, **self.config})}),
                      metadata=md)
        context = Context(run_id=1, node_id=10 + partition, state=RecordDict(), run_config={},
                          node_config={"partition-id": partition, "num-partitions": self.clients})
        return self.app(msg, context)

    def round(self, server_round):
        replies = [reply(10 + p, self.send(p, server_round=server_round).content) for p in range(self.clients)]
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            self.coefficients = arrays[fk.COEFFICIENTS].numpy()
        return replies


def reply(node, content):
    md = Metadata(run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="m",
                  group_id="1", created_at=time.time(), ttl=3600.0, message_type="train")
    return Message(content=content, metadata=md)


def trained(trainer):
    return {k: v.numpy().copy() for k, v in slices.read(trainer).items()}


def snapshot(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_the_pool_is_a_function_of_k_and_the_pool_seed():
    a = fk.pool(1024)
    assert a == fk.pool(1024) and len(set(a)) == 1024 and all(0 <= s < 2 ** 32 for s in a)
    assert fk.pool(1024, pool_seed=1) != a and fk.pool(8) == a[:8]
    with pytest.raises(ValueError, match="at least 1 seed"):
        fk.pool(0)


# -- (a) bytes per client per round: K floats down, 12 bytes a local step up ------------------

def test_bytes_per_round_do_not_depend_on_the_model_size():
    sent = {}
    for width in (16, 512):
        fed = Federation(task(width), k=1024, clients=2)
        fed.round(1)
        (c0, c1) = fed.history.rounds[1]["clients"]
        slice_bytes = sum(s.nbytes for s in fed.model.layout.values())
        sent[width] = (c0["bytes-received"], c0["bytes-sent"], c1["bytes-received"], c1["bytes-sent"], slice_bytes)
        for c in (c0, c1):
            assert c["bytes-up"] == c["bytes-sent"] == 12 * STEPS  # int32 index + float64 gradient a step
            assert c["bytes-received"] == 8 * 1024
            assert c["bytes-received"] + c["bytes-up"] < 18 * 1024
    assert sent[16][:4] == sent[512][:4]
    assert sent[512][4] > 30 * sent[16][4]  # while the trained slices grow 32-fold


# -- (b) every model is theta_0 replayed with the global coefficients ------------------------

def test_the_server_and_the_clients_hold_the_replayed_model():
    t = task()
    fed = Federation(t, k=64)
    fresh = t.compile(central_data())
    initial = trained(fresh)
    for r in (1, 2):
        before = fed.coefficients.copy()
        replies = fed.round(r)
        # the aggregate: each reply's pairs summed per seed, weighted by its examples
        n = np.array([float(m.content["metrics"]["num-examples"]) for m in replies])
        assert sorted(n) == [32, 64, 96]
        want = np.zeros(64)
        for w, m in zip(n / n.sum(), replies):
            np.add.at(want, m.content["arrays"][fk.INDEX].numpy().astype(int), w * m.content["arrays"][fk.GRAD].numpy())
        np.testing.assert_allclose(fed.strategy.last_aggregate, want, rtol=0, atol=1e-15)
        np.testing.assert_allclose(fed.coefficients, before + LR * want, rtol=0, atol=1e-15)
    indices = [set(m.content["arrays"][fk.INDEX].numpy().tolist()) for m in replies]
    assert indices[0] != indices[1] != indices[2]  # nodes draw their own seeds from the pool
    # the server's model: the initial model plus the aggregated updates replayed
    pairs = [(s, float(c)) for s, c in zip(fk.pool(64), fed.coefficients) if c]
    fresh.optimizer.seeds = fk.pool(64)
    fresh.replay(pairs, lr=1.0)
    server = trained(fed.server)
    moved = False
    for name, a in trained(fresh).items():
        np.testing.assert_allclose(server[name], a, rtol=0, atol=1e-10)
        moved |= not np.allclose(a, initial[name])
    assert moved
    masks, built = fed.server.trained_masks(), builder(16)().state_dict()
    for k, v in fed.server.model.state_dict().items():
        frozen = ~masks[k] if k in masks else torch.ones_like(v, dtype=torch.bool)
        assert torch.equal(v[frozen], built[k][frozen]), k
    # a client's model after its replay (an evaluate message carries the coefficients)
    ev = fed.send(1, kind="evaluate", server_round=2).content["metrics"]
    node = fclient.node_for(t, 1, 3)
    for name, a in trained(node.trainer).items():
        np.testing.assert_allclose(a, server[name], rtol=0, atol=1e-10)
    assert ev["eval-loss"] == pytest.approx(fclient.evaluate(fed.server, F.cross_entropy, held_out(1, 3))["eval-loss"],
                                            rel=1e-10)


# -- (d) a malformed reply is refused whole ---------------------------------------------------

def _pairs(index, grad, index_dtype=np.int32):
    return RecordDict({"arrays": ArrayRecord({fk.INDEX: Array(np.array(index, dtype=index_dtype)),
                                              fk.GRAD: Array(np.array(grad, dtype=np.float64))}),
                       "metrics": MetricRecord({"num-examples": 32, "train-loss": 1.0, "bytes-received": 0,
                                                "bytes-sent": 0, "partition-id": 0})})


@pytest.mark.parametrize("index, grad, message", [
    ([0, 64], [0.1, 0.2], "seed index 64 outside the pool of 64"),
    ([0, -1], [0.1, 0.2], "seed index -1 outside the pool of 64"),
    ([0, 1], [0.1, float("nan")], "1 NaN or infinite gradients"),
    ([0, 1, 2], [0.1, 0.2], "3 seed indices but 2 gradients"),
    (list(range(STEPS + 1)), [0.1] * (STEPS + 1), "21 pairs, more than the round's 20"),
])
def test_a_malformed_reply_is_refused_and_changes_nothing(index, grad, message):
    fed = Federation(task(), k=64)
    fed.round(1)
    before, coefficients = snapshot(fed.server), fed.coefficients.copy()
    with pytest.raises(fk.FedKSeedError, match=message):
        fk.check_reply({k: a.numpy() for k, a in _pairs(index, grad)["arrays"].items()}, 64, STEPS)
    arrays, metrics = fed.strategy.aggregate_train(2, [reply(21, _pairs(index, grad))])
    assert arrays is None and metrics is None
    (refused,) = fed.history.rounds[2]["refused"]
    assert refused["node"] == 21 and message in refused["reason"] and "nothing was changed" in refused["reason"]
    after = snapshot(fed.server)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert np.array_equal(fed.strategy.model.coefficients, coefficients)
    # beside a good reply, the bad one is left out of the aggregate
    good = _pairs([3, 5], [0.5, -0.25])
    arrays, metrics = fed.strategy.aggregate_train(3, [reply(21, _pairs(index, grad)), reply(22, good)])
    want = coefficients.copy()
    want[3] += LR * 0.5
    want[5] -= LR * 0.25
    assert np.array_equal(arrays[fk.COEFFICIENTS].numpy(), want) and metrics["num-examples"] == 32


def test_a_node_refuses_bad_coefficients_and_another_layout():
    fed = Federation(task(), k=64)
    with pytest.raises(fk.FedKSeedError, match=r"expected float64 \[64\]"):
        fed.send(0, coefficients=np.zeros(63))
    with pytest.raises(fk.FedKSeedError, match="NaN or infinite"):
        fed.send(0, coefficients=np.full(64, np.nan))
    fed.config["layout-digest"] += 1
    with pytest.raises(fk.FedKSeedError, match="trains other tensors, channels or initial values"):
        fed.send(0)
    # the digest covers the initial values of the trained entries: other weights, another digest
    layout, initial = fed.model.layout, dict(fed.model.initial)
    assert fk.layout_digest(layout, initial) == fed.model.digest != fk.layout_digest(layout)
    initial["2.bias"] = initial["2.bias"] + 1e-12
    assert fk.layout_digest(layout, initial) != fed.model.digest
    with pytest.raises(ValueError, match="FedKSeed trains with MeZO"):
        fk.client_app(fclient.Task(model=builder(16), loss=F.cross_entropy, train_data=train_data,
                                   optimizer=et.SGD(lr=0.1)))
    with pytest.raises(ValueError, match="weight_decay=0"):
        fk.server_app(fclient.Task(model=builder(16), loss=F.cross_entropy, train_data=train_data,
                                   optimizer=et.MeZO(lr=0.1, weight_decay=0.1)))


# -- (c) a few rounds on Flower's Simulation Engine improve the held-out loss -----------------

def test_fedkseed_on_the_simulation_engine_improves_the_held_out_loss():
    app = fk.run_simulation(task(), num_clients=3, num_rounds=3, k=64, fraction_evaluate=0.0)
    h = app.history
    assert h.strategy == {"name": "fedkseed", "k": 64, "pool-seed": 0, "lr": LR, "local-steps": STEPS}
    central = [h.rounds[r]["central"]["eval-loss"] for r in range(4)]
    assert central[3] < central[2] < central[1] < central[0]
    assert h.rounds[3]["central"]["eval-accuracy"] > h.rounds[0]["central"]["eval-accuracy"]
    for r in h.rounds[1:]:
        assert not r["refused"] and len(r["clients"]) == 3
        for c in r["clients"]:
            assert c["bytes-down"] == 8 * 64 and c["bytes-up"] == 12 * STEPS == 12 * c["pairs"]
            assert c["wire-down"] > c["bytes-down"]  # Flower's count adds the .npy header and key
    # the server's model is theta_0 replayed with the final coefficients
    fresh = task().compile(central_data())
    fresh.optimizer.seeds = fk.pool(64)
    fresh.replay([(s, float(c)) for s, c in zip(fk.pool(64), app.strategy.model.coefficients) if c], lr=1.0)
    server = trained(app.trainer)
    for name, a in trained(fresh).items():
        np.testing.assert_allclose(server[name], a, rtol=0, atol=1e-10)
