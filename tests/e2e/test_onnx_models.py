"""Whole models' training steps exported as ONNX and stepped by onnxruntime (edgetune.runtime's
StepRunner), against the same steps on the torch backend: the losses of three steps, then every
tensor the runner carries (trained parameters, optimizer state) against the trainer's.

A tiny Llama under a sparse scheme exports the fused LM loss (vocab_log_prob and both its
gradients: the tied embedding trains), and again with only a few token rows training; a BERT
classifier trains the embedding rows each batch looks up; the Llama's zeroth-order (MeZO) step
regenerates the same directions from the same seeds; the model zoo has no group norm or transposed
convolution, so a small decoder-style net here exercises them with pooling and upsampling; a
ViT under a partial-channel scheme. The Llama runs in float64; the conv nets in float32
(onnxruntime has no float64 Conv).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import edgetune as et  # noqa: E402
from edgetune.models import build  # noqa: E402
from edgetune.runtime import StepRunner, put_part  # noqa: E402
from tests.e2e.test_models import image_batches, next_token_loss, token_batches  # noqa: E402
from tests.ops.test_onnx_lowering import single_threaded  # noqa: E402
from tests.reference import padded_classifier_batches  # noqa: E402

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-9, atol=1e-12)}


class Decoder(nn.Module):
    """Conv, group norm, a transposed conv back up, resampling and pooling, a linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.up = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1)
        self.up_norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4 * 2 * 2, num_classes)

    def forward(self, x):
        h = F.elu(self.norm(self.stem(x)))
        h = F.silu(self.up_norm(self.up(h)))
        h = F.interpolate(h, scale_factor=0.5, mode="bilinear")
        h = F.avg_pool2d(h, 3, stride=2, padding=1, count_include_pad=False)
        return self.head(F.adaptive_max_pool2d(h, (2, 2)).flatten(1))


def llama():
    model = build("llama", num_classes=256).double()
    scheme = {"layers.1.self_attn.q_proj.weight": 0.5, "layers.1.mlp.down_proj.weight": 0.25, "*norm.weight": "full",
              "embed_tokens.weight": "full"}  # tied to lm_head: the fused loss's weight gradient too
    return model, next_token_loss, token_batches(), scheme, et.AdamW(lr=1e-3, eps=1e-4, weight_decay=0.01)


def llama_rows():
    model = build("llama", num_classes=256).double()
    scheme = {"embed_tokens.weight": {"rows": [2, 9, 40, 41, 200]}, "norm.weight": "full"}  # new tokens, tied head
    return model, next_token_loss, token_batches(), scheme, et.AdamW(lr=1e-3, eps=1e-4, weight_decay=0.01)


def llama_mezo():
    model = build("llama", num_classes=256).double()
    scheme = {"layers.1.self_attn.q_proj.weight": 0.5, "layers.1.mlp.up_proj.weight": "full", "*norm.weight": "full"}
    return model, next_token_loss, token_batches(), scheme, et.MeZO(lr=1e-3, directions=2, weight_decay=0.01)


def bert_touched():
    pytest.importorskip("transformers")
    from edgetune.models.hf import tiny_sequence_classifier

    scheme = {"bert.embeddings.word_embeddings.weight": {"rows": "touched"}, "classifier.*": "full"}
    return (tiny_sequence_classifier(), lambda outputs, labels: F.cross_entropy(outputs.logits, labels),
            padded_classifier_batches(vocab=20), scheme, et.SGD(lr=0.1, momentum=0.9, weight_decay=0.01))


def decoder():
    return Decoder(), F.cross_entropy, image_batches(n=4, size=16), et.schemes.full(), et.SGD(lr=0.05, momentum=0.9)


def vit():
    scheme = {"patch_embed.proj.weight": 0.5, "blocks.1.attn.qkv.weight": 0.5, "blocks.1.mlp.fc1.weight": 0.25,
              "*.bias": "full", "head.*": "full"}
    return (build("vit", num_classes=10), F.cross_entropy, image_batches(), scheme,
            et.AdamW(lr=1e-3, eps=1e-4, weight_decay=0.01))


MODELS = {  # name: (maker, the ops its exported step must hold)
    "llama-sparse": (llama, {"vocab_log_prob", "vocab_log_prob_grad_h", "vocab_log_prob_grad_w", "sdpa_grad"}),
    "llama-rows": (llama_rows, {"embedding_rows_grad", "vocab_log_prob_grad_w"}),
    "llama-mezo": (llama_mezo, {"zo_perturb_inplace", "zo_update"}),
    "bert-touched": (bert_touched, {"embedding_touched_grad", "sgd_update"}),
    "decoder-full": (decoder, {"group_norm", "gn_grad_input", "gn_grad_weight", "conv_transpose",
                               "conv_transpose_grad_input", "conv_transpose_grad_weight", "elu_grad",
                               "upsample2d_grad", "avg_pool2d_grad", "adaptive_max_pool2d_grad"}),
    "vit-partial": (vit, {"sdpa_grad", "ln_grad_input", "gelu_grad", "conv_grad_weight"}),
}


@pytest.mark.parametrize("name", MODELS)
def test_exported_step_matches_the_trainer(name, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETUNE_MEASURE_SCRATCH", "0")  # the plan's estimates: compiles faster
    make, ops = MODELS[name]
    torch.manual_seed(0)
    model, loss_fn, batches, scheme, optimizer = make()
    trainer = et.compile(model, loss_fn, *batches[0], scheme=scheme, optimizer=optimizer)
    assert ops <= {n.op for n in trainer.graph.nodes}, "the step no longer holds the ops this test is for"
    trainer.export_onnx(tmp_path)
    runner = StepRunner(tmp_path, session_options=single_threaded())

    dtype = next(model.parameters()).dtype
    for inputs, targets in batches:
        want = trainer.step(inputs, targets)
        got = runner.step(*(t.numpy() for t in (*inputs, *targets)))
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), **TOLERANCE[dtype])
        assert runner.last_skipped == 0

    held = {**dict(model.named_parameters()), **dict(model.named_buffers()), **trainer.state}
    state = runner.state()
    assert {u.name for u in trainer.updates} | set(trainer.state) <= set(state)
    for key, value in state.items():
        if key in runner.parts:  # its trained channels alone: put them into the trainer's weight
            value = put_part(held[key].detach().numpy(), value, runner.parts[key])
        torch.testing.assert_close(torch.from_numpy(value), held[key].detach(), **TOLERANCE[dtype],
                                   msg=lambda m, key=key: f"{key}: {m}")
