"""GaLore as the compiled step's optimizer: against an eager reference of galore-torch's
GaLoreAdamW (tests/reference.py), on whole and partially trained weights of both orientations,
with the projector's refreshes, checkpoints, its refusals and its smaller optimizer state."""
import copy
import json

import pytest
import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

import edgetune as et
from edgetune.compiler.backends.onnx import ExportError
from edgetune.compiler.scheme import SchemeError
from tests.reference import GaLoreAdamWReference, TrainedSlices, assert_untrained_channels_kept

HYPER = dict(lr=0.05, rank=4, update_gap=3, scale=0.25, weight_decay=0.1)  # refreshes at steps 1, 4, 7
# 0.weight: 16x12, its first 6 input channels (16x6, rows >= columns); 2.weight: 10x16 whole
# (rows < columns); 4.weight: 6x10, 8 input channels by magnitude (6x8, rows < columns, gathered).
PARTIAL = {"0.weight": {"ratio": 0.5, "select": "first"}, "2.weight": "full", "4.weight": 0.8, "*.bias": "full"}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 10), nn.Tanh(), nn.Linear(10, 6)).double()


def batches(n: int = 7, dtype=torch.float64) -> list:
    g = torch.Generator().manual_seed(3)
    return [((torch.randn(8, 12, generator=g, dtype=dtype),), (torch.randint(0, 6, (8,), generator=g),))
            for _ in range(n)]


def train_eager(model, data, trainer, projected: set[str], lr, rank, update_gap, scale, weight_decay,
                loss_fn=F.cross_entropy):
    """Train `model` eagerly on the slices `trainer` trains: each trained slice is a leaf of its
    own, written into its weight for the forward; the projected ones step with the GaLore
    reference, the rest with torch.optim.AdamW. Returns {name: (slice or None, leaf, optimizer)}."""
    trained = TrainedSlices(model, trainer)
    leaves = trained.leaves
    galore = GaLoreAdamWReference([leaves[n] for n in projected], lr=lr, rank=rank, update_gap=update_gap,
                                  scale=scale, weight_decay=weight_decay)
    adamw = torch.optim.AdamW([leaves[n] for n in leaves if n not in projected], lr=lr, weight_decay=weight_decay)
    for inputs, targets in data:
        loss = loss_fn(torch.func.functional_call(model, trained.weights(), inputs), *targets)
        galore.zero_grad()
        adamw.zero_grad()
        loss.backward()
        galore.step()
        adamw.step()
    return {n: (trained.parts[n], leaves[n], galore if n in projected else adamw) for n in leaves}


def projected_names(trainer) -> set[str]:
    return {k.removesuffix(":projector") for k in trainer.state if k.endswith(":projector")}


@pytest.mark.parametrize("scheme, weight_decay", [(PARTIAL, 0.1), (et.schemes.full(), 0.0)])
def test_parameters_and_state_match_the_eager_reference(scheme, weight_decay):
    model, data = mlp(), batches()
    ref, before = copy.deepcopy(model), copy.deepcopy(model.state_dict())
    hyper = dict(HYPER, weight_decay=weight_decay)
    trainer = et.compile(model, F.cross_entropy, *data[0], scheme=scheme, optimizer=et.GaLore(**hyper))
    for b in data:
        trainer.step(*b)
    projected = {"0.weight", "2.weight", "4.weight"}
    assert projected_names(trainer) == projected
    assert_matches_eager(trainer, model, train_eager(ref, data, trainer, projected, **hyper), before, projected)


def assert_matches_eager(trainer, model, eager, before, projected, rtol=1e-7, atol=1e-10):
    """Every trained slice and its optimizer state as the eager run's (atol relative to the
    tensor's largest entry); the untrained channels as they were before."""
    def assert_close(got, want, name):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol * float(want.abs().max()),
                                   msg=lambda m: f"{name}: {m}")

    params = dict(model.named_parameters())
    for name, (part, leaf, optimizer) in eager.items():
        got = params[name].detach()
        assert_close(got.index_select(*part) if part else got, leaf.detach(), name)
        if part:
            assert_untrained_channels_kept(got, before[name], part)
        keys = ("exp_avg", "exp_avg_sq", "projector") if name in projected else ("exp_avg", "exp_avg_sq")
        for key in keys:
            assert_close(trainer.state[f"{name}:{key}"], optimizer.state[leaf][key], f"{name}:{key}")


def test_a_tiny_llama_under_a_sparse_scheme_matches_the_eager_reference():
    from edgetune.apps.lm import compile_lm, load_lm
    from edgetune.models.hf import causal_lm_loss
    from tests.reference import padded_lm_batches

    model = load_lm("tiny-llama").model.double()
    ref, before = copy.deepcopy(model), copy.deepcopy(model.state_dict())
    data = padded_lm_batches(n=4, vocab=100)
    hyper = dict(HYPER, update_gap=2)
    trainer = compile_lm(model, et.schemes.parse("lm-sparse:1"), 2, 12, et.GaLore(**hyper))
    for inputs, targets in data:
        trainer.step(inputs, targets)
    projected = projected_names(trainer)
    assert {name.rpartition(".")[0].rpartition(".")[2] for name in projected} == {"q_proj", "v_proj", "up_proj"}
    assert any(u.part is not None and u.name in projected for u in trainer.updates)  # a slice is projected
    eager = train_eager(ref, data, trainer, projected, **hyper, loss_fn=causal_lm_loss)
    # transformers' RMSNorm computes in float32 even in a float64 model: float32's error, not float64's
    assert_matches_eager(trainer, model, eager, before, projected, rtol=1e-5, atol=1e-5)


def test_the_state_has_the_projected_shapes_of_each_orientation():
    trainer = et.compile(mlp(), F.cross_entropy, *batches(1)[0], scheme=PARTIAL, optimizer=et.GaLore(**HYPER))
    shapes = {k: tuple(v.shape) for k, v in trainer.state.items()}
    assert shapes["0.weight:exp_avg"] == (16, 4) and shapes["0.weight:projector"] == (4, 6)  # slice 16x6
    assert shapes["2.weight:exp_avg_sq"] == (4, 16) and shapes["2.weight:projector"] == (10, 4)  # 10x16
    assert shapes["4.weight:exp_avg"] == (4, 8) and shapes["4.weight:projector"] == (6, 4)  # slice 6x8
    assert shapes["4.bias:exp_avg"] == (6,) and "4.bias:projector" not in shapes


def test_the_projector_changes_only_on_refresh_steps():
    model, data = mlp(), batches()
    trainer = et.compile(model, F.cross_entropy, *data[0], scheme=et.schemes.full(), optimizer=et.GaLore(**HYPER))
    projectors = []
    for b in data:
        trainer.step(*b)
        projectors.append(trainer.state["0.weight:projector"].clone())
    changed = [k + 2 for k in range(len(data) - 1) if not torch.equal(projectors[k], projectors[k + 1])]
    assert changed == [4, 7]


class Embedder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 12)
        self.fc = nn.Linear(12, 6)

    def forward(self, ids):
        return self.fc(self.emb(ids).mean(1))


def id_batches(n: int = 4) -> list:
    g = torch.Generator().manual_seed(5)
    return [((torch.randint(0, 20, (4, 5), generator=g),), (torch.randint(0, 6, (4,), generator=g),)) for _ in range(n)]


def test_what_is_not_projected_trains_exactly_as_adamw():
    # The table is left out by default (an embedding reads it), touched rows and all; fc.weight
    # (6x12) is too small for rank 8; the biases are 1-D.
    scheme = {"emb.weight": {"rows": "touched"}, "fc.*": "full"}
    data, model = id_batches(), Embedder()
    twin = copy.deepcopy(model)
    galore = et.compile(model, F.cross_entropy, *data[0], scheme=scheme,
                        optimizer=et.GaLore(lr=0.05, rank=8, weight_decay=0.1))
    adamw = et.compile(twin, F.cross_entropy, *data[0], scheme=scheme, optimizer=et.AdamW(lr=0.05, weight_decay=0.1))
    for b in data:
        assert galore.step(*b) == adamw.step(*b)
    assert projected_names(galore) == set() and galore.state.keys() == adamw.state.keys()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
    for key, value in galore.state.items():
        assert torch.equal(value, adamw.state[key]), key


def test_targets_choose_what_is_projected():
    data = id_batches(1)
    by_default = et.compile(Embedder(), F.cross_entropy, *data[0], scheme=et.schemes.full(),
                            optimizer=et.GaLore(rank=4))
    assert projected_names(by_default) == {"fc.weight"}  # not the table
    targeted = et.compile(Embedder(), F.cross_entropy, *data[0], scheme=et.schemes.full(),
                          optimizer=et.GaLore(rank=4, targets=["emb.*"]))
    assert projected_names(targeted) == {"emb.weight"}


def test_a_checkpoint_mid_run_resumes_as_if_never_stopped(tmp_path):
    data, model = batches(dtype=torch.float64), mlp()
    resumed_model, whole_model = copy.deepcopy(model), copy.deepcopy(model)
    make = lambda m: et.compile(m, F.cross_entropy, *data[0], scheme=PARTIAL, optimizer=et.GaLore(**HYPER))  # noqa: E731
    first = make(model)
    for b in data[:2]:  # the projector of step 1 carries into step 3
        first.step(*b)
    first.save(tmp_path / "ckpt.safetensors")
    resumed, whole = make(resumed_model), make(whole_model)
    resumed.load(tmp_path / "ckpt.safetensors")
    assert resumed.steps == 2
    for b in data[:2]:
        whole.step(*b)
    for b in data[2:]:
        assert resumed.step(*b) == whole.step(*b)
    for (name, p), q in zip(resumed_model.named_parameters(), whole_model.parameters()):
        assert torch.equal(p, q), name
    for key, value in resumed.state.items():
        assert torch.equal(value, whole.state[key]), key


@pytest.mark.parametrize("make, message", [
    (lambda: et.GaLore(lr=-1.0), "GaLore lr must be >= 0"),
    (lambda: et.GaLore(rank=0), "rank must be a whole number >= 1"),
    (lambda: et.GaLore(rank=2.5), "rank must be a whole number >= 1"),
    (lambda: et.GaLore(update_gap=0), "update_gap must be a whole number >= 1"),
    (lambda: et.GaLore(scale=0.0), "scale must be > 0"),
    (lambda: et.GaLore(betas=(0.9, 1.0)), "betas must be in"),
    (lambda: et.GaLore(eps=-1e-8), "eps must be >= 0"),
    (lambda: et.GaLore(weight_decay=-0.1), "weight_decay must be >= 0"),
    (lambda: et.GaLore(targets=[]), "targets must be None or a non-empty list"),
    (lambda: et.GaLore(targets=[3]), "targets must be None or a non-empty list"),
])
def test_bad_settings_are_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_projecting_touched_rows_is_refused():
    with pytest.raises(SchemeError, match="GaLore cannot project 'emb.weight': its 'touched' rows rule"):
        et.compile(Embedder(), F.cross_entropy, *id_batches(1)[0], scheme={"emb.weight": {"rows": "touched"}},
                   optimizer=et.GaLore(rank=4, targets=["emb.weight"]))


def test_onnx_refuses_galore_and_says_to_use_the_torch_backend(tmp_path):
    pytest.importorskip("onnxruntime")
    data = batches(1, dtype=torch.float32)
    model = mlp().float()
    trainer = et.compile(model, F.cross_entropy, *data[0], scheme=PARTIAL, optimizer=et.GaLore(**HYPER))
    with pytest.raises(ExportError, match="SVD.*backend='torch'"):
        trainer.export_onnx(tmp_path / "step")
    with pytest.raises(ExportError, match="backend='torch'"):
        et.compile(model, F.cross_entropy, *data[0], scheme=PARTIAL, optimizer=et.GaLore(**HYPER),
                   backend="onnxruntime")
    auto = et.compile(model, F.cross_entropy, *data[0], scheme=PARTIAL, optimizer=et.GaLore(**HYPER), backend="auto")
    assert auto.backend.name == "torch" and "SVD" in auto.backend.unavailable["onnxruntime"]


def test_the_plan_predicts_less_optimizer_state_than_adamw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))
    x, y = (torch.randn(4, 256),), (torch.randint(0, 10, (4,)),)
    reports = {name: et.compile(copy.deepcopy(model), F.cross_entropy, x, y, scheme=et.schemes.full(),
                                optimizer=optimizer).report()
               for name, optimizer in (("adamw", et.AdamW()), ("galore", et.GaLore(rank=16)))}
    adamw_entries = 2 * (512 * 256 + 512 + 10 * 512 + 10)
    # 0.weight (512x256): moments 512x16, projector 16x256; 2.weight (10x512) is under rank 16: AdamW
    galore_entries = 2 * 512 * 16 + 16 * 256 + 2 * (512 + 10 * 512 + 10)
    assert reports["adamw"].state_bytes == 4 * adamw_entries
    assert reports["galore"].state_bytes == 4 * galore_entries


def test_cli_finetune_lm_with_galore_projects_the_blocks_weights(tmp_path, capsys):
    from edgetune.cli import main
    from tests.unit.test_lm import write_chats

    out = tmp_path / "run"
    args = ["finetune-lm", "--model", "tiny-llama", "--data", write_chats(tmp_path / "c.jsonl"), "--scheme", "full",
            "--optimizer", "galore", "--galore-rank", "8", "--galore-gap", "2", "--galore-scale", "0.5",
            "--steps", "4", "--batch", "4", "--seq-len", "32", "--lr", "3e-3", "--val-count", "4", "--no-progress",
            "--checkpoint-every", "2", "--out", str(out)]
    assert main(args) == 0
    history = json.loads((out / "history.json").read_text())
    assert len(history["losses"]) == 4 and history["evals"][-1]["loss"] < history["evals"][0]["loss"]
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert (settings["optimizer"], settings["galore_rank"], settings["galore_gap"]) == ("galore", 8, 2)
    state = safetensors.torch.load_file(next(out.glob("checkpoint/*.safetensors")))
    projected = {k.removeprefix("optimizer/").removesuffix(":projector") for k in state if k.endswith(":projector")}
    linears = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")
    # every block's linear (16 wide at least); not the tied embedding table, which gets AdamW
    assert projected == {f"model.layers.{i}.{linear}.weight" for i in range(2) for linear in linears}
    assert "optimizer/model.embed_tokens.weight:exp_avg" in state


@pytest.mark.parametrize("argv, message", [
    (["--galore-rank", "8"], "--galore-rank set GaLore, but the optimizer is adamw: add --optimizer galore"),
    (["--optimizer", "galore", "--galore-rank", "0"], "GaLore rank must be a whole number >= 1"),
])
def test_cli_refuses_galore_settings_it_cannot_use(tmp_path, capsys, argv, message):
    from edgetune.cli import main

    assert main(["finetune-lm", "--model", "tiny-llama", "--data", str(tmp_path / "none.jsonl"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_by_name_makes_galore_with_its_settings_and_refuses_them_elsewhere():
    from edgetune.compiler.optim import by_name

    assert by_name("galore", 0.01, 0.1, rank=8, update_gap=None) == et.GaLore(lr=0.01, weight_decay=0.1, rank=8)
    assert by_name("galore", 0.01) == et.GaLore(lr=0.01)
    with pytest.raises(ValueError, match="rank are GaLore's settings, but the optimizer is 'adamw'"):
        by_name("adamw", 0.01, rank=8)
