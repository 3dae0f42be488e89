"""Language-model scheme presets: which parameters they pick on tiny HF Llama, Qwen2 and BERT,
their string spellings, their errors, and a compiled lm_sparse step against PyTorch eager."""
import pytest

import edgetune as et
from edgetune import schemes
from edgetune.models.hf import causal_lm_loss, tiny_causal_lm, tiny_sequence_classifier
from edgetune.compiler.scheme import Rule, SchemeError, resolve
from tests.e2e.test_models import OPTIMIZERS, run_and_compare
from tests.reference import padded_lm_batches
from tests.unit.nets import ConvNet

pytest.importorskip("transformers")

FULL = Rule()


def llama(layers=3):
    return tiny_causal_lm("llama", num_hidden_layers=layers)


def block(i, *leaves):
    return [f"model.layers.{i}.{leaf}" for leaf in leaves]


LLAMA_BLOCK = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
               "input_layernorm.weight", "post_attention_layernorm.weight"]
NORMS = ["input_layernorm.weight", "post_attention_layernorm.weight"]


def issue_scheme(i, select="magnitude"):
    """The issue's benchmark scheme on block i, written out by hand."""
    return {f"model.layers.{i}.self_attn.q_proj.weight": {"ratio": 0.5, "select": select},
            f"model.layers.{i}.self_attn.v_proj.weight": "full",
            f"model.layers.{i}.mlp.up_proj.weight": {"ratio": 0.25, "select": select},
            **{name: "full" for name in block(i, *NORMS)}}


def test_lm_last_is_the_last_blocks_and_the_final_norm():
    rules = resolve(schemes.lm_last(2), llama())
    assert list(rules) == block(1, *LLAMA_BLOCK) + block(2, *LLAMA_BLOCK) + ["model.norm.weight"]
    assert set(rules.values()) == {FULL}


def test_lm_sparse_defaults_are_the_issue_scheme():
    model = llama()
    rules = resolve(schemes.lm_sparse(2), model)
    assert rules == resolve({**issue_scheme(1), **issue_scheme(2)}, model)
    assert rules["model.layers.2.self_attn.q_proj.weight"] == Rule(0.5, "magnitude")
    custom = resolve(schemes.lm_sparse(1, attention={"q": 0.25, "k": 1}, ffn={"gate": 0.5, "up": 0}, norms=False,
                                       select="first"), model)
    assert custom == {"model.layers.2.self_attn.q_proj.weight": Rule(0.25, "first"),
                      "model.layers.2.self_attn.k_proj.weight": FULL,
                      "model.layers.2.mlp.gate_proj.weight": Rule(0.5, "first")}


def test_lm_sparse_trains_the_biases_of_trained_projections():
    rules = resolve(schemes.lm_sparse(1), tiny_causal_lm("qwen2"))  # Qwen2: q, k, v have biases
    assert list(rules) == block(1, "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.v_proj.weight",
                                "self_attn.v_proj.bias", "mlp.up_proj.weight", *NORMS)


def test_norms_only_and_lora_presets():
    model = llama(2)
    assert list(resolve(schemes.norms_only(), model)) == block(0, *NORMS) + block(1, *NORMS) + ["model.norm.weight"]
    rules = resolve(schemes.lora(8), model)
    assert list(rules) == [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in "qv"]
    assert set(rules.values()) == {Rule(lora=8, alpha=8.0)}
    rules = resolve(schemes.lora(4, targets=("o_proj", "down_proj"), alpha=16, blocks=1), model)
    assert rules == {"model.layers.1.self_attn.o_proj.weight": Rule(lora=4, alpha=16.0),
                     "model.layers.1.mlp.down_proj.weight": Rule(lora=4, alpha=16.0)}


def test_bert_names():
    model = tiny_sequence_classifier()
    layer = "bert.encoder.layer.1."
    assert {n for n in resolve(schemes.lm_last(1), model)} == {n for n, _ in model.named_parameters()
                                                               if n.startswith(layer)}
    rules = resolve(schemes.lm_sparse(1), model)
    assert {n: r for n, r in rules.items() if n.endswith("weight") and "LayerNorm" not in n} == {
        layer + "attention.self.query.weight": Rule(0.5), layer + "attention.self.value.weight": FULL,
        layer + "intermediate.dense.weight": Rule(0.25)}
    assert sorted(n for n in rules if "LayerNorm" in n) == sorted(
        layer + f"{m}.LayerNorm.{p}" for m in ("attention.output", "output") for p in ("weight", "bias"))
    assert len(resolve(schemes.norms_only(), model)) == 2 * (1 + 2 * 2)  # embeddings + 2 per layer
    assert len(resolve(schemes.lora(8, targets=("query", "value")), model)) == 4


@pytest.mark.parametrize("spec, preset", [
    ("lm-last:2", schemes.lm_last(2)),
    ("lm-sparse:2", schemes.lm_sparse(2)),
    ("lm-sparse:1:q=0.25,k=1,gate=0.5", schemes.lm_sparse(1, attention={"q": 0.25, "k": 1}, ffn={"gate": 0.5})),
    ("norms", schemes.norms_only()),
    ("lora:8", schemes.lora(8)),
    ("lora:4:q_proj,k_proj,alpha=16,blocks=2", schemes.lora(4, ("q_proj", "k_proj"), alpha=16, blocks=2)),
    ("full", schemes.full()),
    ("bias_only", schemes.bias_only()),
    ("last:2", schemes.last(2)),
])
def test_from_string(spec, preset):
    model = ConvNet() if spec == "bias_only" else llama()  # a Llama has no bias
    assert resolve(schemes.from_string(spec), model) == resolve(preset, model)


@pytest.mark.parametrize("spec, message", [
    ("lm-sparse", "unknown scheme 'lm-sparse': use one of full, bias_only"),
    ("lm-last:x", "lm-last:K needs a whole number"),
    ("lm-sparse:2:q", "expected key=value, got 'q'"),
    ("lm-sparse:2:x=1", "unknown projection 'x'"),
    ("lm-sparse:2:q=2", "must be a number in \\(0, 1\\]"),
    ("lora:8:alpha=16,rank=2", "unknown options \\['rank'\\]"),
    ("lora:0", "LoRA rank for 'lora\\(\\)' must be an integer >= 1"),
])
def test_from_string_errors(spec, message):
    with pytest.raises(SchemeError, match=message):
        resolve(schemes.from_string(spec), llama())


@pytest.mark.parametrize("scheme, model, message", [
    (schemes.lm_last(1), ConvNet, "found no transformer blocks in ConvNet: looked for parameters under "
                                  "'model.layers.N.' \\(HF decoders\\), 'encoder.layer.N.' \\(BERT\\)"),
    (schemes.lm_sparse(1), ConvNet, "lm_sparse: found no transformer blocks"),
    (schemes.lm_last(4), llama, "asked for the last 4 blocks, but the model has 3 "
                                "\\(model.layers.0 .. model.layers.2\\)"),
    (schemes.lm_sparse(1, ffn={"gate": 0.5}), tiny_sequence_classifier,
     "block 'bert.encoder.layer.1' has no 'gate' projection \\(a linear layer named gate_proj\\)"),
    (schemes.lora(8, targets=("query",)), llama, "no linear layer is named like \\['query'\\]; .*'q_proj'"),
    (schemes.norms_only(), lambda: ConvNet().head, "norms_only: the model has no module whose class name "
                                                   "contains 'Norm'"),
])
def test_presets_that_find_nothing_say_what_they_looked_for(scheme, model, message):
    with pytest.raises(SchemeError, match=message):
        resolve(scheme, model())


def test_norms_only_finds_batch_norms_too():
    assert set(resolve(schemes.norms_only(), ConvNet())) == {"bn.weight", "bn.bias", "bn2.weight", "bn2.bias"}


@pytest.mark.parametrize("k, bad, message", [
    (0, {}, "lm_sparse needs a number of blocks >= 1, got 0"),
    (1, {"attention": {"q": 1.5}}, "ratio for 'lm_sparse q'"),
    (1, {"select": "random"}, "select for 'lm_sparse'"),
])
def test_bad_preset_arguments(k, bad, message):
    with pytest.raises(SchemeError, match=message):
        schemes.lm_sparse(k, **bad)


def token_batches(n=3):
    return padded_lm_batches(n, padded_row=0, padding=2)


@pytest.mark.parametrize("opt_name", ["sgd-nesterov-wd", "adamw"])
def test_compiled_lm_sparse_matches_eager_with_gradient_masks(opt_name):
    """The issue's scheme on the last block of a 2-block Llama, three steps, against eager
    PyTorch with the same gradient masks (the e2e harness: losses, every weight, untouched
    entries bitwise, the trainable count by formula)."""
    model = llama(2).train()
    run_and_compare(model, schemes.lm_sparse(1), issue_scheme(1), causal_lm_loss, token_batches(),
                    *OPTIMIZERS[opt_name])


def test_lm_sparse_report_names_the_modes():
    model = llama(2)
    trainer = et.compile(model, causal_lm_loss, *token_batches(1)[0], scheme=schemes.lm_sparse(1))
    modes = {row.module: row.mode for row in trainer.report().layers}
    assert modes["model.layers.1.self_attn.q_proj"] == "weight@0.5"
    assert modes["model.layers.1.self_attn.v_proj"] == "weight"
    assert modes["model.layers.1.mlp.up_proj"] == "weight@0.25"
    assert modes["model.layers.0.self_attn.q_proj"] == "frozen"
