"""Hugging Face transformers models, compiled straight from `transformers`, three steps under
full, last-block and partial-channel schemes against PyTorch eager (tests/reference.py).

The loss receives the model's output object (`outputs.logits`); attention masks with
padding are part of the inputs, and padded positions are left out of the loss."""
import copy

import pytest
import torch
import torch.nn.functional as F

import edgetune as et
from edgetune.models.hf import causal_lm_loss, tiny_causal_lm, tiny_sequence_classifier
from tests.reference import assert_models_match, padded_classifier_batches, padded_lm_batches, train_eager

pytest.importorskip("transformers")


def lm_batches():
    return padded_lm_batches()  # the second sequence padded


def classifier_batches():
    return padded_classifier_batches()


def classifier_loss(outputs, labels):
    return F.cross_entropy(outputs.logits, labels)


DECODER_SCHEMES = {
    "full": None,
    "last-block": {"model.layers.1.*": "full", "model.norm.weight": "full"},
    "partial": {"model.layers.1.self_attn.q_proj.weight": 0.5, "model.layers.1.mlp.up_proj.weight": 0.25,
                "model.layers.1.self_attn.v_proj.weight": "full", "model.layers.1.*norm.weight": "full"},
}

OPTIMIZERS = {
    "sgd": (et.SGD(lr=0.1, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
    # eps=1e-4: see tests/e2e/test_models.py (Adam's step on gradients that are zero up to rounding).
    "adamw": (et.AdamW(lr=1e-2, eps=1e-4, weight_decay=0.01),
              lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=1e-4, weight_decay=0.01)),
}


def check_against_eager(model, loss_fn, batches, scheme, optimizer, rtol=1e-7):
    model = model.double()
    reference = copy.deepcopy(model)
    ours, theirs = OPTIMIZERS[optimizer]
    trainer = et.compile(model, loss_fn, *batches[0], scheme=scheme, optimizer=ours)
    masks = trainer.trained_masks()
    losses = [trainer.step(*batch) for batch in batches]
    want = train_eager(reference, loss_fn, batches, masks, theirs)
    assert losses == pytest.approx(want, rel=rtol)
    assert_models_match(model, reference, rtol=rtol, atol=rtol / 10)
    trained = dict(model.named_parameters())
    for name, ref in reference.named_parameters():
        if name not in masks:
            assert torch.equal(trained[name], ref), f"{name} is frozen but changed"
    return trainer


# transformers' decoders compute RMSNorm and the rotary tables in float32 even in a float64
# model, so both engines round to float32 there, in different orders: 1e-7 relative.
DECODER_RTOL = 1e-5


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("scheme", DECODER_SCHEMES)
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_decoder_language_models(kind, scheme, optimizer):
    trainer = check_against_eager(tiny_causal_lm(kind), causal_lm_loss, lm_batches(), DECODER_SCHEMES[scheme],
                                  optimizer, rtol=DECODER_RTOL)
    ops = {n.op for n in trainer.graph.nodes}
    assert "vocab_log_prob" in ops and "log_softmax" not in ops  # the logits never exist whole


def test_tied_embedding_gets_both_gradients():
    # The embedding is also the LM head: a full scheme trains it through both uses.
    model = tiny_causal_lm("llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    check_against_eager(model, causal_lm_loss, lm_batches(), {"model.embed_tokens.weight": "full"}, "sgd",
                        rtol=DECODER_RTOL)


@pytest.mark.parametrize("scheme", [
    None,
    {"classifier.*": "full", "bert.encoder.layer.1.attention.self.query.weight": 0.5, "*.bias": "full"},
], ids=["full", "partial-and-biases"])
def test_bert_sequence_classifier(scheme):
    check_against_eager(tiny_sequence_classifier(), classifier_loss, classifier_batches(), scheme, "adamw")


def test_labels_may_be_the_input_ids_tensor_itself():
    # transformers' idiom `labels = input_ids`: one tensor passed as an input and as a target.
    # The step must still bind them apart: later batches bring labels that differ from the ids.
    model = tiny_causal_lm("llama")
    (ids, mask), (labels,) = lm_batches()[0]
    trainer = et.compile(model, causal_lm_loss, (ids, mask), (ids,), scheme={"model.norm.weight": "full"})
    with torch.no_grad():
        want = causal_lm_loss(model(ids, mask), labels).item()
    assert trainer.step((ids, mask), (labels,)) == pytest.approx(want, rel=1e-5)


def tiny_gpt2():
    import transformers

    config = transformers.GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4, use_cache=False)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def keyword_batches():
    # GPT-2's forward takes past_key_values second: the batch goes in by keyword.
    return [({"input_ids": ids, "attention_mask": mask}, targets) for (ids, mask), targets in lm_batches()]


def test_ratio_rules_on_transposed_linears_train_rows():
    # transformers' Conv1D holds W as [in, out] and computes x @ W: its input channels are W's rows.
    scheme = {"transformer.h.1.attn.c_attn.weight": 0.5, "transformer.h.1.mlp.c_fc.weight": 0.25,
              "transformer.h.1.ln_*.weight": "full"}
    trainer = check_against_eager(tiny_gpt2(), causal_lm_loss, keyword_batches(), scheme, "adamw")
    mask = trainer.trained_masks()["transformer.h.1.attn.c_attn.weight"]
    assert mask.any(1).sum() == 16 and mask.all(1).sum() == 16  # 16 of 32 rows, each whole


def test_keyword_inputs_are_checked_by_name():
    model = tiny_gpt2()
    batch, (labels,) = keyword_batches()[0]
    trainer = et.compile(model, causal_lm_loss, batch, (labels,), scheme={"transformer.ln_f.*": "full"})
    reordered = {"attention_mask": batch["attention_mask"], "input_ids": batch["input_ids"]}
    with torch.no_grad():
        want = causal_lm_loss(model(**batch), labels).item()
    assert trainer.step(reordered, (labels,)) == pytest.approx(want, rel=1e-5)
    with pytest.raises(et.BatchError, match=r"has keys \['input_ids'\]; the examples had"):
        trainer.step({"input_ids": batch["input_ids"]}, (labels,))
    with pytest.raises(TypeError, match="must be a dict of input_ids, attention_mask"):
        trainer.step((batch["input_ids"], batch["attention_mask"]), (labels,))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_ratio_rules_on_the_lm_head_and_embeddings_train_hidden_columns(tied):
    # The head inside the fused vocabulary loss, and the embedding table: a ratio is over the
    # hidden axis, the head's input channels (a tied weight is both, one rule).
    model = tiny_causal_lm("llama", tie_word_embeddings=tied)
    rules = {"model.embed_tokens.weight": 0.25} if tied else {"lm_head.weight": 0.25, "model.embed_tokens.weight": 0.5}
    trainer = check_against_eager(model, causal_lm_loss, lm_batches(), {**rules, "model.norm.weight": "full"}, "sgd",
                                  rtol=DECODER_RTOL)
    assert "vocab_log_prob" in {n.op for n in trainer.graph.nodes}
    masks = trainer.trained_masks()
    for name, ratio in rules.items():
        columns = int(32 * ratio)  # of the 32 hidden columns, each whole
        assert masks[name].all(0).sum() == columns and masks[name].any(0).sum() == columns, name


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_rows_rules_train_only_the_chosen_tokens(tied):
    # New tokens' embeddings: only their rows train, through the lookup and (tied, or as the
    # untied head's own rule) through the fused vocabulary loss.
    model = tiny_causal_lm("llama", tie_word_embeddings=tied)
    rows = {"model.embed_tokens.weight": [1, 5, 7, 100, 127], **({} if tied else {"lm_head.weight": [3, 5, 9]})}
    scheme = {**{name: {"rows": ids} for name, ids in rows.items()}, "model.norm.weight": "full"}
    trainer = check_against_eager(model, causal_lm_loss, lm_batches(), scheme, "adamw", rtol=DECODER_RTOL)
    masks = trainer.trained_masks()
    for name, ids in rows.items():
        assert masks[name].all(1).nonzero().flatten().tolist() == ids and masks[name].any(1).sum() == len(ids)


def lazy_reference(model, loss_fn, batches, trainer, optimizer, table, lazy=True):
    rows = {table: lambda inputs: inputs[0].flatten()} if lazy else None
    return train_eager(model, loss_fn, batches, trainer.trained_masks(), OPTIMIZERS[optimizer][1], lazy_rows=rows)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_touched_rows_update_as_a_sparse_optimizer_does(optimizer):
    # Only the rows a batch looks up move, optimizer state included; the rest wait unchanged
    # (momentum and weight decay would move them in a dense update). BERT's table has a
    # padding row (0), which gets no gradient.
    for model, loss_fn, batches, table, also, rtol in (
            (tiny_causal_lm("llama", tie_word_embeddings=False), causal_lm_loss, padded_lm_batches(n=4, vocab=40),
             "model.embed_tokens.weight", "model.norm.weight", DECODER_RTOL),
            (tiny_sequence_classifier(), classifier_loss, padded_classifier_batches(vocab=20),
             "bert.embeddings.word_embeddings.weight", "classifier.*", 1e-7)):
        model = model.double()
        reference, dense = copy.deepcopy(model), copy.deepcopy(model)
        trainer = et.compile(model, loss_fn, *batches[0], scheme={table: {"rows": "touched"}, also: "full"},
                             optimizer=OPTIMIZERS[optimizer][0])
        losses = [trainer.step(*batch) for batch in batches]
        assert losses == pytest.approx(lazy_reference(reference, loss_fn, batches, trainer, optimizer, table), rel=rtol)
        assert_models_match(model, reference, rtol=rtol, atol=rtol / 10)
        assert trainer.state[f"{table}:{OPTIMIZERS[optimizer][0].state_names[0]}"].shape == model.get_parameter(
            table).shape
        # The test can tell: a dense update of the same table ends elsewhere.
        lazy_reference(dense, loss_fn, batches, trainer, optimizer, table, lazy=False)
        assert not torch.allclose(dense.get_parameter(table), model.get_parameter(table), rtol=1e-3)


@pytest.mark.parametrize("scheme, message", [
    ({"model.embed_tokens.weight": {"rows": "touched"}}, "a 'touched' rows rule needs a table that one embedding "
                                                         "lookup alone reads.*vocab_log_prob"),
    ({"model.embed_tokens.weight": {"rows": [3, 128]}}, "row 128 is out of range, the table has 128 rows"),
    ({"model.norm.weight": {"rows": [1]}}, "a rows rule needs an embedding table.*is used by op"),
])
def test_rows_rules_that_cannot_hold_say_why(scheme, message):
    (ids, mask), targets = lm_batches()[0]
    with pytest.raises(et.schemes.SchemeError, match=message):
        et.compile(tiny_causal_lm("llama"), causal_lm_loss, (ids, mask), targets, scheme=scheme)


def test_mezo_on_a_decoder_equals_mezo_by_hand():
    # The zeroth-order step over a transformer (attention, rotary tables, the fused LM loss),
    # under a partial scheme, against MeZO written out in eager PyTorch.
    from tests.unit.test_zo import eager_mezo

    model = tiny_causal_lm("llama").double()
    reference = copy.deepcopy(model)
    batches = lm_batches()
    opt = et.MeZO(lr=1e-2, directions=2)
    trainer = et.compile(model, causal_lm_loss, *batches[0], optimizer=opt,
                         scheme={"model.layers.1.self_attn.q_proj.weight": 0.5, "model.layers.1.*norm.weight": "full"})
    losses = [trainer.step(*batch) for batch in batches]
    assert losses == pytest.approx(eager_mezo(reference, causal_lm_loss, batches, trainer, opt), rel=DECODER_RTOL)
    assert_models_match(model, reference, rtol=DECODER_RTOL, atol=DECODER_RTOL / 10)
