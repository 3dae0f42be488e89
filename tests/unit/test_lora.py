"""LoRA as a scheme rule: against PEFT's own LoRA training, its adapter files, and bad rules.

A tiny random HF Llama in float64. The reference is `peft.get_peft_model` trained in eager
PyTorch from the same initial A and B. float64 parity is ~1e-7 relative, not 1e-15: eager
itself differs that much between its two attention implementations (sdpa vs eager) on this
model, so that is the floor for any comparison through attention.
"""
import copy
import json
import math
import os

import pytest
import torch

import edgetune as et
from edgetune.apps.peft import merged_state, save_peft_adapter
from edgetune.compiler.lora import init_adapters
from edgetune.models.hf import causal_lm_loss, tiny_causal_lm
from edgetune.compiler.scheme import Rule, SchemeError, resolve
from tests.reference import padded_lm_batches, train_eager

peft = pytest.importorskip("peft")

QV = {"*.q_proj.weight": {"lora": 4, "alpha": 8}, "*.v_proj.weight": {"lora": 4, "alpha": 8}}
LR = 1e-2


def batches(n=3):
    return padded_lm_batches(n, padding=3)  # right padding, left out of the loss


def llama():
    return tiny_causal_lm("llama").double()


def peft_twin(model, trainer, targets=("q_proj", "v_proj"), r=4, alpha=8):
    """PEFT's LoRA on a copy of `model`, its A and B set to the trainer's initial adapters."""
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets))
    twin = peft.get_peft_model(copy.deepcopy(model), config)
    state = {f"base_model.model.{k.replace('.weight', '.default.weight')}": v for k, v in trainer.adapters.items()}
    missing = set(state) - set(twin.state_dict())
    assert not missing, f"PEFT has no {sorted(missing)[:2]}"
    twin.load_state_dict(state, strict=False)
    return twin


def adapter_masks(twin):
    return {n: torch.ones_like(p, dtype=torch.bool) for n, p in twin.named_parameters() if ".lora_" in n}


def peft_adamw(ps):
    return torch.optim.AdamW(ps, lr=LR, weight_decay=0.01)


def assert_adapters_match(trainer, twin, rtol=1e-5):
    theirs = twin.state_dict()
    for name, mine in trainer.adapters.items():
        ref = theirs["base_model.model." + name.replace(".weight", ".default.weight")]
        torch.testing.assert_close(mine, ref, rtol=rtol, atol=rtol * float(ref.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_lora_training_matches_peft_and_leaves_base_weights_bitwise():
    model, data = llama(), batches()
    initial = copy.deepcopy(model.state_dict())
    trainer = et.compile(model, causal_lm_loss, *data[0], scheme=QV, optimizer=et.AdamW(lr=LR))
    twin = peft_twin(model, trainer)
    losses = [trainer.step(*b) for b in data]
    ref_losses = train_eager(twin, causal_lm_loss, data, adapter_masks(twin), peft_adamw)

    assert losses == pytest.approx(ref_losses, rel=1e-9)
    assert_adapters_match(trainer, twin)
    assert all(not torch.equal(v, torch.zeros_like(v)) for k, v in trainer.adapters.items() if "lora_B" in k)
    for name, value in model.state_dict().items():
        assert torch.equal(value, initial[name]), f"{name}: a LoRA step changed the base model"
    # Only the adapters are differentiated: no base weight gradient, so no base input saved for one.
    grads = [n for n in trainer.graph.nodes if n.op == "linear_grad_weight"]
    assert len(grads) == 8  # A and B of q and v in 2 layers
    assert {tuple(n.shape) for n in grads} <= {tuple(t.shape) for t in trainer.adapters.values()}
    assert {u.name for u in trainer.updates} == set(trainer.adapters)
    assert trainer.trained_masks() == {}


def test_adapters_start_as_peft_initialises_them():
    model = llama()
    a, b = (init_adapters(model, resolve(QV, model)) for _ in range(2))
    assert set(a) == {f"model.layers.{i}.self_attn.{p}.lora_{ab}.weight" for i in (0, 1) for p in ("q_proj", "v_proj")
                      for ab in "AB"}
    for name, t in a.items():
        assert torch.equal(t, b[name]), f"{name}: not deterministic"
        assert t.dtype == torch.float64
        if "lora_B" in name:
            assert not t.any()
        else:  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
            assert t.shape == (4, 32) and 0.5 / math.sqrt(32) < t.abs().max() <= 1 / math.sqrt(32)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.lora_A.weight"],
                           a["model.layers.1.self_attn.q_proj.lora_A.weight"])


def test_lora_alongside_full_ratio_and_frozen_rules():
    scheme = {"model.layers.1.self_attn.q_proj.weight": {"lora": 4, "alpha": 16},
              "model.layers.1.mlp.up_proj.weight": {"ratio": 0.25, "select": "magnitude"},
              "model.layers.1.*norm.weight": "full",
              "model.layers.0.*": "frozen",
              "model.norm.weight": "full"}
    model, data = llama(), batches()
    initial = copy.deepcopy(model.state_dict())
    trainer = et.compile(model, causal_lm_loss, *data[0], scheme=scheme, optimizer=et.AdamW(lr=LR))
    twin = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["model.layers.1.self_attn.q_proj"]))
    twin.load_state_dict({f"base_model.model.{k.replace('.weight', '.default.weight')}": v
                          for k, v in trainer.adapters.items()}, strict=False)
    masks = {**adapter_masks(twin), **{"base_model.model." + k: m for k, m in trainer.trained_masks().items()}}
    assert len(masks) == 2 + 4  # A, B; up_proj, two norms, final norm
    losses = [trainer.step(*b) for b in data]
    ref_losses = train_eager(twin, causal_lm_loss, data, masks, peft_adamw)

    assert losses == pytest.approx(ref_losses, rel=1e-9)
    assert_adapters_match(trainer, twin)
    theirs = twin.state_dict()
    for name, value in model.state_dict().items():
        ref = theirs["base_model.model." + name.replace("1.self_attn.q_proj.weight", "1.self_attn.q_proj.base_layer.weight")]
        torch.testing.assert_close(value, ref, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
        if name not in trainer.rules or trainer.rules[name].lora:
            assert torch.equal(value, initial[name]), f"{name} is not trained but changed"
    up = trainer.trained_masks()["model.layers.1.mlp.up_proj.weight"]
    assert up.any(0).sum() == 8  # ceil(0.25 * 32) input channels
    report = trainer.report()
    assert report.trainable_params == 4 * 32 + 32 * 4 + 64 * 8 + 3 * 32
    assert report.total_params == sum(p.numel() for p in model.parameters()) + 2 * 4 * 32
    modes = {row.module: row.mode for row in report.layers}
    assert modes["model.layers.1.self_attn.q_proj"] == "lora r=4"
    assert modes["model.layers.1.mlp.up_proj"] == "weight@0.25"
    q_row = next(r for r in report.layers if r.module == "model.layers.1.self_attn.q_proj")
    assert q_row.trainable == 256 and q_row.flops > 0
    assert "lora r=4" in str(report)


def test_exported_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    model, data = llama(), batches()
    base = copy.deepcopy(model)
    trainer = et.compile(model, causal_lm_loss, *data[0], scheme=QV, optimizer=et.AdamW(lr=LR))
    twin = peft_twin(model, trainer)
    for b in data:
        trainer.step(*b)
    out = tmp_path / "adapter"
    save_peft_adapter(trainer, str(out), base_model_name="tiny-llama")
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    merged = copy.deepcopy(base)
    merged.load_state_dict(merged_state(trainer), strict=False)
    ids, mask = data[0][0]
    with torch.no_grad():
        got, want = loaded(input_ids=ids, attention_mask=mask).logits, merged(input_ids=ids, attention_mask=mask).logits
        before = base(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert (got - before).abs().max() > 1e-4  # the adapter does something

    twin.save_pretrained(str(tmp_path / "peft"))  # what PEFT itself writes for the same setup
    from safetensors.torch import load_file
    ours, theirs = load_file(out / "adapter_model.safetensors"), load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert set(ours) == set(theirs)
    config = json.loads((out / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias",
                                   "fan_in_fan_out", "base_model_name_or_path")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "base_model_name_or_path": "tiny-llama"}
    assert config["target_modules"] == ["q_proj", "v_proj"]


def test_export_of_some_layers_names_them_in_full(tmp_path):
    model, data = llama(), batches(1)
    scheme = {"model.layers.1.self_attn.q_proj.weight": {"lora": 2}, "model.layers.1.mlp.*.weight": {"lora": 4}}
    trainer = et.compile(model, causal_lm_loss, *data[0], scheme=scheme)
    save_peft_adapter(trainer, str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    layers = ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
              "model.layers.1.self_attn.q_proj"]
    assert config["target_modules"] == layers
    assert config["r"] == 4 and config["rank_pattern"] == {"model.layers.1.self_attn.q_proj": 2}
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path))
    lora_a = {n for n, _ in loaded.named_parameters() if "lora_A" in n}
    assert len(lora_a) == 4
    assert dict(loaded.named_parameters())[
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight"].shape == (2, 32)


def test_checkpoint_restores_adapters(tmp_path):
    data = batches(4)
    model = llama()
    first = et.compile(model, causal_lm_loss, *data[0], scheme=QV, optimizer=et.AdamW(lr=LR))
    for b in data[:2]:
        first.step(*b)
    first.save(str(tmp_path / "ckpt.pt"))
    first.step(*data[2])
    second = et.compile(copy.deepcopy(model), causal_lm_loss, *data[0], scheme=QV, optimizer=et.AdamW(lr=LR))
    second.load(str(tmp_path / "ckpt.pt"))
    second.step(*data[2])
    for name, t in first.adapters.items():
        assert torch.equal(t, second.adapters[name]), name
    state = first.state_dict()
    state["adapters"].pop("model.layers.0.self_attn.q_proj.lora_A.weight")
    with pytest.raises(ValueError, match="LoRA adapters does not match this trainer: missing"):
        second.load_state_dict(state)


@pytest.mark.parametrize("rule, message", [
    ({"lora": 0}, "LoRA rank for .* must be an integer >= 1, got 0"),
    ({"lora": 2.5}, "LoRA rank"),
    ({"lora": 8, "alpha": 0}, "LoRA alpha for .* must be a number > 0"),
    ({"lora": 8, "dropout": 0.1}, "only dropout 0 is supported"),
    ({"lora": 8, "scale": 2}, r"unknown keys \['scale'\]"),
])
def test_bad_lora_rules_name_the_culprit(rule, message):
    with pytest.raises(SchemeError, match=message):
        resolve({"*.q_proj.weight": rule}, llama())


def test_lora_rule_parses_with_peft_default_alpha():
    rules = resolve({"*.q_proj.weight": {"lora": 16}, "*.v_proj.weight": {"lora": 8, "dropout": 0}}, llama())
    assert rules["model.layers.0.self_attn.q_proj.weight"] == Rule(lora=16, alpha=8.0)
    assert rules["model.layers.0.self_attn.q_proj.weight"].scale == 0.5
    assert et.schemes.as_mapping(rules)["model.layers.1.self_attn.v_proj.weight"] == {"lora": 8, "alpha": 8.0}
    assert resolve(et.schemes.as_mapping(rules), llama()) == rules


def test_lora_on_what_is_not_a_linear_weight_is_an_error():
    with pytest.raises(SchemeError, match="needs the weight of a linear layer, but '\\*norm.weight' matches "
                                          "'model.layers.0.input_layernorm.weight'"):
        resolve({"*norm.weight": {"lora": 4}}, llama())
    model = llama()  # 2-D, but an embedding table (tied to the output layer)
    with pytest.raises(SchemeError, match="'model.embed_tokens.weight' is used by op 'embedding'"):
        et.compile(model, causal_lm_loss, *batches(1)[0], scheme={"model.embed_tokens.weight": {"lora": 4}})


def test_saving_without_lora_is_an_error(tmp_path):
    trainer = et.compile(llama(), causal_lm_loss, *batches(1)[0], scheme={"model.norm.weight": "full"})
    with pytest.raises(ValueError, match="no LoRA rule"):
        save_peft_adapter(trainer, str(tmp_path))
    assert not os.listdir(tmp_path)


def test_lora_on_an_untied_lm_head_trains_as_peft():
    """The head keeps its linear (not fused with the loss) where a LoRA rule reads its input."""
    model, data = tiny_causal_lm("llama", tie_word_embeddings=False).double(), batches()
    trainer = et.compile(model, causal_lm_loss, *data[0], scheme={"lm_head.weight": {"lora": 4, "alpha": 8}},
                         optimizer=et.AdamW(lr=LR))
    assert not any(n.op == "vocab_log_prob" for n in trainer.graph.nodes)
    twin = peft_twin(model, trainer, targets=("lm_head",))
    losses = [trainer.step(*b) for b in data]
    assert losses == pytest.approx(train_eager(twin, causal_lm_loss, data, adapter_masks(twin), peft_adamw), rel=1e-9)
    assert_adapters_match(trainer, twin)
