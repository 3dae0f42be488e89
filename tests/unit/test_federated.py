"""edgetune as Flower's client trainer (edgetune.federated): only the trained slices travel,
a bad record is refused whole, and FedAvg over the slices on Flower's Simulation Engine."""
import os
import subprocess
import sys
import time

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # Flower reports usage events unless told not to

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("flwr", reason="the federated extra: pip install -e '.[federated]'")
pytestmark = pytest.mark.filterwarnings("ignore:Tip. In future versions of Ray:FutureWarning")

import edgetune as et  # noqa: E402
from edgetune.federated import client as fclient  # noqa: E402
from edgetune.federated import slices  # noqa: E402
from edgetune.federated.records import load_record, payload_bytes, to_record  # noqa: E402
from edgetune.federated.slices import SliceError  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict  # noqa: E402
from tests.unit.nets import ConvNet, batch  # noqa: E402

@pytest.fixture(scope="module", autouse=True)
def compile_in_process():
    """This file compiles some twenty small trainers: in-process each takes ~0.2 s, forked ~1.3 s."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGETUNE_COMPILE_IN_PROCESS", "1")
        yield


# -- a toy task: 3 linearly separable classes of 8 features, an MLP in float64 ---------------

W = torch.tensor([[1., -1, 0], [0, 1, -1], [-1, 0, 1], [1, 1, -2], [0, 0, 0], [1, 0, 0], [0, -1, 0], [0, 0, 1]],
                 dtype=torch.float64)
SCHEME = {"0.weight": 0.5, "*.bias": "full", "2.weight": "full"}  # half of layer 0's inputs


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).double()


def toy(seed, n):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g, dtype=torch.float64)
    return (x,), ((x @ W).argmax(-1),)


def train_data(partition, num_partitions):
    return toy(100 + partition, 32 + 32 * partition)  # unequal sizes: FedAvg's weights matter


def held_out(partition, num_partitions):
    return toy(200 + partition, 64)


def central_data():
    return toy(999, 128)


def task(**kw):
    return fclient.Task(model=build, loss=F.cross_entropy, train_data=train_data, test_data=held_out,
                        central_test_data=central_data, scheme=SCHEME, optimizer=et.SGD(lr=0.2, momentum=0.9),
                        local_steps=8, batch_size=16, **kw)


def snapshot(trainer):
    return {**{k: v.clone() for k, v in trainer.model.state_dict().items()},
            **{k: v.clone() for k, v in trainer.adapters.items()}}


def assert_unchanged(trainer, before):
    after = snapshot(trainer)
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k


def assert_frozen_equal(trainer, reference_model):
    """Every entry the trainer does not train is bitwise the reference model's."""
    masks, ref = trainer.trained_masks(), reference_model.state_dict()
    for k, v in trainer.model.state_dict().items():
        frozen = ~masks[k] if k in masks else torch.ones_like(v, dtype=torch.bool)
        assert torch.equal(v[frozen], ref[k][frozen]), k


# -- (a) the record holds exactly the trained slices -----------------------------------------

def test_the_record_holds_exactly_the_trained_slices():
    model = ConvNet().eval()
    x, y = batch(4)
    trainer = et.compile(model, F.cross_entropy, x, y, scheme={"pw.weight": 0.5, "*.bias": "full",
                                                                "head.weight": "full"})
    record = to_record(trainer)
    params = dict(model.named_parameters())
    assert list(record) == [u.name for u in trainer.updates]
    assert set(record) == {"bn.bias", "bn2.bias", "pw.weight", "pw.bias", "head.weight", "head.bias"}
    chosen = next(u for u in trainer.updates if u.name == "pw.weight").part.index.attrs["value"]
    pw = record["pw.weight"].numpy()
    assert pw.shape == (16, 4, 1, 1)  # 4 of its 8 input channels
    assert np.array_equal(pw, params["pw.weight"].detach().index_select(1, chosen).numpy())
    for name in ("bn.bias", "head.weight"):
        assert np.array_equal(record[name].numpy(), params[name].detach().numpy())
    # bytes: the trained entries times 4 (float32); the masks count the same entries
    assert payload_bytes(record) == trainer.trainable_params * 4 == 4 * sum(
        int(m.sum()) for m in trainer.trained_masks().values())
    whole = slices.model_bytes(model)
    assert payload_bytes(record) < whole / 2
    assert record.count_bytes() > payload_bytes(record)  # Flower's count adds .npy headers and keys


def test_lora_adapters_travel_and_the_base_weight_does_not():
    model = build()
    x, y = toy(1, 8)
    trainer = et.compile(model, F.cross_entropy, x, y, scheme={"0.weight": {"lora": 2, "alpha": 4}, "2.bias": "full"})
    record = to_record(trainer)
    assert set(record) == {"0.lora_A.weight", "0.lora_B.weight", "2.bias"}
    assert record["0.lora_A.weight"].shape == (2, 8) and record["0.lora_B.weight"].shape == (16, 2)
    assert payload_bytes(record) == 8 * (2 * 8 + 16 * 2 + 3)
    # and they load back into another trainer, whose base weights do not move
    other = et.compile(build(), F.cross_entropy, x, y, scheme={"0.weight": {"lora": 2, "alpha": 4}, "2.bias": "full"})
    trainer.step(x, y)
    load_record(other, to_record(trainer))
    for k, v in trainer.adapters.items():
        assert torch.equal(other.adapters[k], v)
    assert torch.equal(other.model[0].weight, build()[0].weight)


# -- (b) a bad record is refused, and the weights are unchanged ------------------------------

def mlp_trainer():
    x, y = toy(1, 16)
    return et.compile(build(), F.cross_entropy, x, y, scheme=SCHEME, optimizer=et.SGD(lr=0.1))


def _altered(trainer, change):
    """The trainer's record with every value moved (so a partial write would show), then `change`d."""
    arrays = {k: a.numpy() + 1.0 for k, a in to_record(trainer).items()}
    change(arrays)
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


BAD = {
    "missing": (lambda a: a.pop("2.bias"), "missing '2.bias'"),
    "extra": (lambda a: a.update({"2.weight.extra": np.zeros(3)}), "not trained here '2.weight.extra'"),
    "extra frozen weight": (lambda a: a.update({"0.weight.full": np.zeros((16, 8))}), "'0.weight.full'"),
    "whole weight for a slice": (lambda a: a.update({"0.weight": np.zeros((16, 8))}),
                                 "'0.weight' has shape (16, 8), this trainer trains (16, 4)"),
    "wrong shape": (lambda a: a.update({"2.bias": np.zeros(4)}), "'2.bias' has shape (4,)"),
    "wrong dtype": (lambda a: a.update({"2.weight": a["2.weight"].astype(np.float32)}), "'2.weight' is float32"),
    "non-finite": (lambda a: a["2.bias"].__setitem__(0, np.nan), "'2.bias' holds NaN"),
}


@pytest.fixture(scope="module")
def refusing():
    """One trainer for the refusal tests: each leaves it as it found it (which they check)."""
    return mlp_trainer()


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_record_is_refused_and_changes_nothing(refusing, case):
    trainer = refusing
    change, message = BAD[case]
    record = _altered(trainer, change)
    before = snapshot(trainer)
    with pytest.raises(SliceError, match="refused, nothing was changed") as err:
        load_record(trainer, record)
    assert message in str(err.value)
    assert_unchanged(trainer, before)


def test_other_chosen_channels_are_refused(refusing):
    trainer = refusing
    chosen = slices.layout(trainer)["0.weight"].channels
    other = sorted(set(range(8)) - set(chosen))
    before = snapshot(trainer)
    with pytest.raises(SliceError, match="other channels than this trainer in '0.weight'"):
        load_record(trainer, _altered(trainer, lambda a: None), channels={"0.weight": other})
    assert_unchanged(trainer, before)
    load_record(trainer, to_record(trainer), channels={"0.weight": chosen})  # its own choice loads


def test_a_record_writes_the_trained_entries_and_nothing_else():
    sender, receiver = mlp_trainer(), mlp_trainer()
    x, y = toy(2, 16)
    for _ in range(3):
        sender.step(x, y)
    load_record(receiver, to_record(sender))
    masks = receiver.trained_masks()
    for name, p in receiver.model.named_parameters():
        trained = masks.get(name, torch.zeros_like(p, dtype=torch.bool))
        assert torch.equal(p[trained], dict(sender.model.named_parameters())[name][trained]), name
    assert_frozen_equal(receiver, build())
    assert not torch.equal(sender.model[0].weight, build()[0].weight)  # the sender did train


# -- the ClientApp, driven with Messages directly --------------------------------------------

def _message(record, kind="train", **config):
    # explicit metadata: a Message built outside a Flower run has no task identity to take it from
    metadata = Metadata(run_id=1, message_id="m", src_node_id=1, dst_node_id=7, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=3600.0, message_type=kind)
    return Message(content=RecordDict({"arrays": record, "config": ConfigRecord({"server-round": 1, **config})}),
                   metadata=metadata)


def _context(partition, num_partitions=3):
    return Context(run_id=1, node_id=7, node_config={"partition-id": partition, "num-partitions": num_partitions},
                   state=RecordDict(), run_config={})


def test_the_client_app_trains_its_slices_and_replies_with_them():
    t = task()
    app = fclient.client_app(t)
    server = mlp_trainer()
    layout = slices.layout(server)
    channels = {"channels/0.weight": layout["0.weight"].channels}
    reply = app(_message(to_record(server), **channels), _context(1))
    metrics = reply.content["metrics"]
    sent = reply.content["arrays"]
    assert list(sent) == list(layout)
    assert metrics["num-examples"] == 64 and metrics["bytes-sent"] == metrics["bytes-received"] == payload_bytes(sent)
    assert metrics["bytes-sent"] == 8 * server.trainable_params
    node = fclient.node_for(t, 1, 3)
    assert_frozen_equal(node.trainer, build())  # local steps moved only the trained entries
    assert not np.array_equal(sent["2.weight"].numpy(), server.model[2].weight.detach().numpy())
    # a node's reply depends on the message alone (fresh optimizer state, seeded batches)
    again = app(_message(to_record(server), **channels), _context(1))
    for k in sent:
        assert np.array_equal(again.content["arrays"][k].numpy(), sent[k].numpy()), k
    # a bad record is refused before the node changes
    before = snapshot(node.trainer)
    bad = _altered(server, lambda a: a.update({"2.bias": np.zeros(5)}))
    with pytest.raises(SliceError, match="'2.bias' has shape"):
        app(_message(bad, **channels), _context(1))
    assert_unchanged(node.trainer, before)
    # evaluate: held-out loss and accuracy of the received slices on the node's test data
    ev = app(_message(to_record(server), kind="evaluate", **channels), _context(1)).content["metrics"]
    want = fclient.evaluate(server, F.cross_entropy, held_out(1, 3))
    assert ev["eval-loss"] == pytest.approx(want["eval-loss"], rel=1e-12)
    assert ev["eval-accuracy"] == want["eval-accuracy"] and ev["num-examples"] == 64


# -- (c, d) FedAvg of the slices on Flower's Simulation Engine -------------------------------

def test_fedavg_over_the_slices_on_the_simulation_engine():
    from edgetune.federated.server import run_simulation

    app = run_simulation(task(), num_clients=3, num_rounds=2)
    h, strategy = app.history, app.strategy
    assert [r["round"] for r in h.rounds] == [0, 1, 2]
    # (c) the global slices are the example-weighted average of what the clients sent
    replies = strategy.last_replies
    assert sorted(m["partition-id"] for _, m, _ in replies) == [0, 1, 2]
    weights = np.array([m["num-examples"] for _, m, _ in replies], dtype=np.float64)
    assert list(sorted(weights)) == [32, 64, 96]
    for name, s in slices.layout(app.trainer).items():
        sent = [arrays[name] for _, _, arrays in replies]
        assert not np.array_equal(sent[0], sent[1])  # the clients did differ
        want = sum(w * a for w, a in zip(weights / weights.sum(), sent))
        got = strategy.last_global[name].numpy()
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
        assert np.array_equal(slices.read(app.trainer)[name].numpy(), got)  # the server holds them
    # ... and the frozen entries never changed on the server, which never sent them
    assert_frozen_equal(app.trainer, build())
    for r in h.rounds[1:]:
        assert not r["refused"] and len(r["clients"]) == 3
        for c in r["clients"]:
            assert c["bytes-down"] == c["bytes-up"] == h.slice_bytes == 8 * h.trained_entries
    assert (h.trained_entries, h.model_entries) == (16 * 4 + 16 + 3 * 16 + 3, 8 * 16 + 16 + 16 * 3 + 3)
    assert h.model_bytes == 8 * h.model_entries
    # (d) two rounds improve the held-out loss, on the server's set and on the nodes'
    central = [h.rounds[r]["central"]["eval-loss"] for r in (0, 1, 2)]
    assert central[2] < central[1] < central[0]
    assert h.rounds[2]["evaluate"]["eval-loss"] < h.rounds[1]["evaluate"]["eval-loss"]


def _reply(node, record, n):
    metadata = Metadata(run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="m",
                        group_id="1", created_at=time.time(), ttl=3600.0, message_type="train")
    metrics = MetricRecord({"train-loss": 1.0, "num-examples": n, "bytes-received": 0, "bytes-sent": 0,
                            "partition-id": node})
    return Message(content=RecordDict({"arrays": record, "metrics": metrics}), metadata=metadata)


def test_the_server_leaves_a_bad_reply_out_of_the_average(refusing):
    from edgetune.federated.server import History, SparseFedAvg

    history = History()
    strategy = SparseFedAvg(slices.layout(refusing), history)
    good = _altered(refusing, lambda a: None)
    bad = _altered(refusing, lambda a: a.update({"0.weight": np.zeros((16, 8))}))  # a whole frozen weight
    arrays, metrics = strategy.aggregate_train(1, [_reply(11, good, 32), _reply(12, bad, 64)])
    for k in good:
        assert np.array_equal(arrays[k].numpy(), good[k].numpy()), k  # the one good reply, alone
    assert metrics["num-examples"] == 32
    (refused,) = history.rounds[1]["refused"]
    assert refused["node"] == 12 and "'0.weight' has shape (16, 8), this trainer trains (16, 4)" in refused["reason"]
    assert [c["node"] for c in history.rounds[1]["clients"]] == [11]


def test_a_server_momentum_strategy_moves_the_slices_alone_and_still_refuses(refusing):
    from flwr.serverapp.strategy import FedAvgM, FedProx

    from edgetune.federated.server import History, sparse_strategy

    history, layout = History(), slices.layout(refusing)
    strategy = sparse_strategy(FedAvgM)(layout, history, server_learning_rate=1.0, server_momentum=0.5)
    start = to_record(refusing, layout)
    strategy.current_arrays = start  # what FedAvgM's configure_train keeps in the first round
    first = _altered(refusing, lambda a: None)  # start + 1
    bad = _altered(refusing, lambda a: a.update({"0.weight": np.zeros((16, 8))}))
    one, _ = strategy.aggregate_train(1, [_reply(11, first, 32), _reply(12, bad, 64)])
    second = _altered(refusing, lambda a: a.update({k: v + 2.0 for k, v in a.items()}))  # start + 3
    two, _ = strategy.aggregate_train(2, [_reply(11, second, 32)])
    for k in start:  # pseudo-gradients -1, then -2 from one: with momentum 0.5 the second step is -2.5
        np.testing.assert_allclose(one[k].numpy(), start[k].numpy() + 1.0)
        np.testing.assert_allclose(two[k].numpy(), start[k].numpy() + 1.0 + 2.5)
    assert set(one) == set(layout) and [r["node"] for r in history.rounds[1]["refused"]] == [12]
    with pytest.raises(TypeError, match="Flower's FedAvg or a subclass"):
        sparse_strategy(dict)
    with pytest.raises(ValueError, match="proximal term"):  # a client-side loss edgetune's client lacks
        sparse_strategy(FedProx)


def test_mezo_nodes_perturb_in_their_own_directions():
    t = task()
    t.optimizer = et.MeZO(lr=0.05, eps=1e-3)
    app = fclient.client_app(t)
    server = mlp_trainer()
    channels = {"channels/0.weight": slices.layout(server)["0.weight"].channels}
    node, seeds, sent = None, {}, {}
    for partition in (0, 1):
        reply = app(_message(to_record(server), **channels), _context(partition))
        node = fclient.node_for(t, partition, 3)
        seeds[partition] = [s for s, _ in node.trainer.last_step.directions]
        sent[partition] = reply.content["arrays"]
    assert seeds[0] != seeds[1]  # each node (and round) draws its own seeds
    assert not np.array_equal(sent[0]["2.weight"].numpy(), server.model[2].weight.detach().numpy())
    assert_frozen_equal(node.trainer, build())


def test_received_slices_reach_an_onnxruntime_step():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    x, y = toy(3, 16)
    x = (x[0].float(),)

    def compile_(**kw):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        return et.compile(model, F.cross_entropy, x, y, scheme=SCHEME, optimizer=et.SGD(lr=0.5), **kw)

    sender, on_torch, on_ort = compile_(), compile_(), compile_(backend="onnxruntime")
    for _ in range(3):
        sender.step(x, y)
    for t in (on_torch, on_ort):
        load_record(t, to_record(sender))
    losses = [t.step(x, y) for t in (sender, on_torch, on_ort)]
    assert losses[1] == losses[0] and losses[2] == pytest.approx(losses[0], rel=1e-6)


class Bag(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(20, 6), nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


@pytest.mark.parametrize("rule, shape", [({"rows": [2, 5, 7]}, (3, 6)), ({"rows": "touched"}, (20, 6))])
def test_rows_rules_send_their_rows_or_the_whole_table(rule, shape):
    ids, labels = torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0])
    trainer = et.compile(Bag(), F.cross_entropy, (ids,), (labels,), scheme={"emb.weight": rule, "head.bias": "full"},
                         optimizer=et.SGD(lr=0.5))
    trainer.step((ids,), (labels,))
    record = to_record(trainer)
    assert record["emb.weight"].shape == shape and record["head.bias"].shape == (3,)
    rows = [2, 5, 7] if shape[0] == 3 else list(range(20))  # a batch's rows change each step: all travel
    assert np.array_equal(record["emb.weight"].numpy(), trainer.model.emb.weight.detach()[rows].numpy())
    receiver = et.compile(Bag(), F.cross_entropy, (ids,), (labels,), scheme={"emb.weight": rule, "head.bias": "full"})
    load_record(receiver, record)
    assert torch.equal(receiver.model.emb.weight, trainer.model.emb.weight)
    assert torch.equal(receiver.model.head.weight, Bag().head.weight)  # frozen


def test_a_train_message_sets_lr_and_local_steps_for_its_round_only():
    t = task()
    app = fclient.client_app(t)
    server = mlp_trainer()
    sent = to_record(server)
    channels = {"channels/0.weight": slices.layout(server)["0.weight"].channels}
    still = app(_message(sent, lr=0.0, **channels), _context(0)).content["arrays"]
    for k in sent:
        assert np.array_equal(still[k].numpy(), sent[k].numpy()), k  # lr 0: nothing moved
    moved = app(_message(sent, **channels), _context(0)).content["arrays"]  # the task's lr again
    assert not np.array_equal(moved["2.weight"].numpy(), sent["2.weight"].numpy())
    none = app(_message(sent, **{"local-steps": 0}, **channels), _context(0)).content
    assert np.array_equal(none["arrays"]["2.weight"].numpy(), sent["2.weight"].numpy())
    assert np.isnan(none["metrics"]["train-loss"])


# -- Flower's Deployment Engine (a SuperLink, two SuperNodes, `flwr run`), FedAvg and FedKSeed --

DEPLOY_APP = '''
import os
import subprocess
import sys
import torch, torch.nn as nn, torch.nn.functional as F
import edgetune as et
from {apps} import client_app, server_app
from edgetune.federated import Task

W = torch.tensor({w}, dtype=torch.float64)

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).double()

def toy(seed, n):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g, dtype=torch.float64)
    return (x,), ((x @ W).argmax(-1),)

task = Task(model=build, loss=F.cross_entropy, train_data=lambda p, n: toy(100 + p, 32 + 32 * p),
            test_data=lambda p, n: toy(200 + p, 64), central_test_data=lambda: toy(999, 128),
            scheme={scheme!r}, optimizer={optimizer}, local_steps={steps}, batch_size=16)
client = client_app(task)
# No evaluation on the nodes (the simulation tests cover it): each message starts a ClientApp
# process here, and evaluate rounds would double them.
server = server_app(task, num_rounds=2, fraction_evaluate=0.0, history_path=os.environ["EDGEFED_HISTORY"]{options})
'''

DEPLOY_PYPROJECT = '''
[project]
name = "edgefed"
version = "1.0.0"
description = "edgetune as Flower's client trainer, on the Deployment Engine"
license = "Apache-2.0"
dependencies = ["flwr[simulation]==1.42.0"]

[tool.flwr.app]
publisher = "edgetune"

[tool.flwr.app.components]
serverapp = "edgefed.apps:server"
clientapp = "edgefed.apps:client"
'''


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# (the apps' module, the task's optimizer, its local steps, server_app's options)
DEPLOYED = {"fedavg": ("edgetune.federated", "et.SGD(lr=0.2, momentum=0.9)", 8, ""),
            "fedkseed": ("edgetune.federated.fedkseed", "et.MeZO(lr=0.05, eps=1e-3)", 20, ", k=64")}


@pytest.mark.parametrize("strategy", list(DEPLOYED))
def test_the_apps_run_on_flowers_deployment_engine(tmp_path, strategy):
    import json
    import socket
    import subprocess
    import sys

    app = tmp_path / "app"
    (app / "edgefed").mkdir(parents=True)
    (app / "pyproject.toml").write_text(DEPLOY_PYPROJECT)
    (app / "edgefed" / "__init__.py").write_text("")
    apps, optimizer, steps, options = DEPLOYED[strategy]
    (app / "edgefed" / "apps.py").write_text(DEPLOY_APP.format(w=W.tolist(), scheme=SCHEME, apps=apps,
                                                               optimizer=optimizer, steps=steps, options=options))
    link = _free_port()
    home = tmp_path / "flwrhome"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "here"\n\n[superlink.here]\n'
                                      f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    history = tmp_path / "history.json"
    bin_ = os.path.dirname(sys.executable)
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "EDGEFED_HISTORY": str(history),
           "PATH": bin_ + os.pathsep + os.environ.get("PATH", "")}
    logs = [open(tmp_path / f"{name}.log", "w") for name in ("superlink", "node0", "node1")]
    procs = [subprocess.Popen([f"{bin_}/flower-superlink", "--insecure", "--port", str(link)], env=env,
                              stdout=logs[0], stderr=subprocess.STDOUT)]
    try:
        deadline = time.time() + 60
        while True:  # the SuperLink listening
            try:
                socket.create_connection(("127.0.0.1", link), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline, (tmp_path / "superlink.log").read_text()
                time.sleep(0.5)
        for p in (0, 1):
            procs.append(subprocess.Popen(
                [f"{bin_}/flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--port",
                 str(_free_port()), "--node-config", f"partition-id={p} num-partitions=2"],
                env=env, stdout=logs[1 + p], stderr=subprocess.STDOUT))
        run = subprocess.run([f"{bin_}/flwr", "run", str(app), "here", "--stream"], env=env, capture_output=True,
                             text=True, timeout=400)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        h = json.loads(history.read_text())
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs:
            f.close()
    assert h["slice_bytes"] == 8 * h["trained_entries"] and h["trained_entries"] == 131
    # FedAvg moves the trained slices each way; FedKSeed K coefficients down, a (seed, gradient) pair a step up
    down, up = (h["slice_bytes"], h["slice_bytes"]) if strategy == "fedavg" else (8 * 64, 12 * steps)
    for r in h["rounds"][1:]:
        assert len(r["clients"]) == 2 and not r["refused"]
        assert all(c["bytes-down"] == down and c["bytes-up"] == up for c in r["clients"])
    central = [r["central"]["eval-loss"] for r in h["rounds"]]
    assert central[2] < central[1] < central[0]


def test_flower_and_ray_are_told_not_to_report_usage_unless_the_user_says_otherwise():
    """Flower's telemetry (read when flwr is first imported) and Ray's usage statistics are off
    once edgetune.federated is imported; a user's own setting is kept."""
    code = ("import os, edgetune.federated.server, flwr.supercore.telemetry as t; "
            "print(t.FLWR_TELEMETRY_ENABLED, os.environ['RAY_USAGE_STATS_ENABLED'])")
    env = {k: v for k, v in os.environ.items() if k not in ("FLWR_TELEMETRY_ENABLED", "RAY_USAGE_STATS_ENABLED")}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.stdout.split() == ["0", "0"], run.stderr
    run = subprocess.run([sys.executable, "-c", code], env={**env, "RAY_USAGE_STATS_ENABLED": "1"},
                         capture_output=True, text=True, timeout=120)
    assert run.stdout.split() == ["0", "1"], run.stderr
