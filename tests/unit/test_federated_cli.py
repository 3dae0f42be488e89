"""`edgetune federate`: FedAvg (sgd) and FedKSeed (mezo) on Flower's Simulation Engine, on digits."""
import json
import os
import re

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import numpy as np
import pytest

pytest.importorskip("flwr", reason="the federated extra: pip install -e '.[federated]'")
pytestmark = pytest.mark.filterwarnings("ignore:Tip. In future versions of Ray:FutureWarning")

from edgetune.cli import main  # noqa: E402
from edgetune.federated.job import partition  # noqa: E402

SMALL = ["--model", "resnet", "--data", "digits", "--size", "16", "--clients", "2", "--rounds", "2",
         "--local-steps", "3", "--batch", "16", "--train-limit", "160", "--val-limit", "80"]


def _run(tmp_path, capsys, *extra):
    out = tmp_path / "run"
    assert main(["federate", *SMALL, "--out", str(out), *extra]) == 0
    printed = capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["curves.png", "history.json", "model.safetensors"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from safetensors.numpy import load_file

    weights = load_file(str(out / "model.safetensors"))
    assert weights and all(np.isfinite(w).all() for w in weights.values())
    h = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in h["rounds"]] == [0, 1, 2] and h["settings"]["clients"] == 2
    lines = re.findall(r"round (\d)/2: held-out accuracy [\d.]+%.*?(?:per client ([\d,]+) B down, ([\d,]+) B up)?$",
                       printed, re.M)
    assert [int(r) for r, _, _ in lines] == [0, 1, 2]
    for r, down, up in lines[1:]:
        clients = h["rounds"][int(r)]["clients"]
        assert len(clients) == 2 and not h["rounds"][int(r)]["refused"]
        assert {c["bytes-down"] for c in clients} == {int(down.replace(",", ""))}
        assert {c["bytes-up"] for c in clients} == {int(up.replace(",", ""))}
        assert 0 <= h["rounds"][int(r)]["central"]["eval-accuracy"] <= 1
    return h, weights


@pytest.mark.parametrize("momentum", [None, "0.5"])
def test_federate_fedavg_moves_exactly_the_trained_slices(tmp_path, capsys, momentum):
    h, weights = _run(tmp_path, capsys, *(["--server-momentum", momentum] if momentum else []))  # sgd, bias_only
    assert h["strategy"] == ({"name": "fedavgm", "server_momentum": 0.5} if momentum else {})
    for r in h["rounds"][1:]:
        for c in r["clients"]:
            assert c["bytes-down"] == c["bytes-up"] == h["slice_bytes"] == 4 * h["trained_entries"]
    assert h["slice_bytes"] < h["model_bytes"] / 50
    assert sum(w.size for w in weights.values()) == h["model_entries"]


def test_federate_fedkseed_moves_seeds_and_scalars(tmp_path, capsys):
    h, _ = _run(tmp_path, capsys, "--optimizer", "mezo", "--lr", "0.01", "--pool", "256")
    assert h["strategy"]["name"] == "fedkseed" and h["strategy"]["k"] == 256
    for r in h["rounds"][1:]:
        for c in r["clients"]:
            assert c["bytes-down"] == 8 * 256 and c["bytes-up"] == 12 * 3  # 3 local steps, 1 direction each


def test_partitions_cover_every_example_once():
    labels = np.repeat(np.arange(10), 30)
    for spec in ("iid", "dirichlet:0.3"):
        parts = partition(labels, 4, spec, seed=1, min_size=16)
        assert sorted(np.concatenate(parts).tolist()) == list(range(300))
        assert min(len(p) for p in parts) >= 16
        assert [p.tolist() for p in partition(labels, 4, spec, seed=1, min_size=16)] == [p.tolist() for p in parts]
    iid = partition(labels, 4, "iid", seed=1)
    skewed = partition(labels, 4, "dirichlet:0.1", seed=1)
    spread = lambda parts: np.mean([len(np.unique(labels[p])) for p in parts])  # noqa: E731
    assert spread(skewed) < spread(iid) == 10  # label skew: fewer classes a client
    with pytest.raises(ValueError, match="dirichlet:ALPHA"):
        partition(labels, 4, "dirichlet:-1")
    with pytest.raises(ValueError, match="cannot give 4 clients 100 each"):
        partition(labels, 4, "iid", min_size=100)


@pytest.mark.parametrize("flags, message", [
    (["--partition", "dirichlet:x"], "--partition takes iid or dirichlet:ALPHA"),
    (["--clients", "0"], "--clients must be at least 1"),
    (["--clients", "20", "--batch", "16"], "cannot give 20 clients 16 each"),
    (["--server-momentum", "1"], "--server-momentum must be in [0, 1)"),
    (["--server-momentum", "0.9", "--optimizer", "mezo"], "FedKSeed (--optimizer mezo) sums"),
])
def test_federate_refuses_bad_settings_before_any_simulation(tmp_path, capsys, flags, message):
    assert main(["federate", *SMALL, "--out", str(tmp_path / "run"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_task_carries_stored_items_and_prepares_a_partition_when_asked():
    """What a Simulation Engine actor is sent: the stored uint8 images (and the model), not every
    partition's prepared float tensors; a node's partition is prepared on its own request, the
    same rows, as for evaluation."""
    import cloudpickle
    import torch

    import edgetune as et
    from edgetune.apps.jobs import build_job
    from edgetune.federated.job import job_task

    job = build_job("resnet", "digits", size=64, train_limit=400, val_limit=100, augment=False)
    parts = partition(job.train.labels, 4, "iid", seed=0, min_size=16)
    task = job_task(job, parts, et.schemes.parse("bias_only"), et.SGD(lr=0.01), local_steps=2, batch_size=16)
    prepared_bytes = 400 * 3 * 64 * 64 * 4
    assert len(cloudpickle.dumps(task)) < prepared_bytes / 4
    (x,), (y,) = task.train_data(2, 4)
    index = torch.from_numpy(parts[2])
    assert torch.equal(y, job.train.labels[index])
    assert torch.equal(x, job.prepare(job.train.subset(index).items, False)[0])
    (cx,), (cy,) = task.central_test_data()
    assert cx.shape == (100, 3, 64, 64) and torch.equal(cy, job.val.labels)
    with pytest.raises(ValueError, match="split for 4 clients, not 3"):
        task.train_data(0, 3)
