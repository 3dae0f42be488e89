"""The onnxruntime backend against the torch backend, behind one Trainer.

Each case compiles once with backend="onnxruntime", trains 5 steps, then puts the model,
optimizer state and step count back where they started, swaps in the torch backend's step
for the same graph and trains the same 5 steps again. Losses, every parameter, buffer and
optimizer state must agree (1e-5 relative in float32); frozen weights and untrained entries
stay bitwise as they were under both.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import edgetune as et  # noqa: E402
from edgetune.compiler.backends.torch import CompiledStep  # noqa: E402
from edgetune.models import build  # noqa: E402
from tests.e2e.test_models import next_token_loss  # noqa: E402

STEPS = 5
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-9, atol=1e-12)}


def images(size, dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    return [((torch.randn(2, 3, size, size, generator=g, dtype=dtype),), (torch.randint(0, 10, (2,), generator=g),))
            for _ in range(STEPS)]


def tokens(length, dtype=None, vocab=256):
    g = torch.Generator().manual_seed(2)
    ids = [torch.randint(0, vocab, (2, length + 1), generator=g) for _ in range(STEPS)]
    return [((x[:, :-1],), (x[:, 1:],)) for x in ids]


# id: (model, train mode, dtype, image size or sequence length, scheme, optimizer, compile options)
CASES = {
    # Eval mode for the CNNs: train-mode batch norm amplifies rounding so that two float32
    # eager runs differ by 1e-3 (tests/e2e/test_models.py), and onnxruntime's CPU Conv has no
    # float64 kernel to check it in. A train-mode ConvNet is checked in test_onnx_export.py.
    # The TTE scheme trains biases of frozen convs and channel slices: bias-only's case and more
    # (a MobileNetV2 compile costs seconds; one case).
    "mobilenetv2-tte-eval": ("mobilenetv2", False, torch.float32, 40, et.schemes.published("mbv2-99kb"),
                             et.SGD(lr=0.05, momentum=0.9), {}),
    # AdamW steps by ~lr on a gradient that is zero up to rounding; eps=1e-4 keeps that under the
    # tolerance (as in tests/e2e/test_models.py).
    "resnet-full-eval-adamw": ("resnet", False, torch.float32, 32, et.schemes.full(), et.AdamW(lr=1e-3, eps=1e-4), {}),
    "vit-partial-int8-raise": ("vit", True, torch.float32, 32,
                               {"blocks.1.attn.qkv.weight": 0.5, "blocks.1.mlp.fc1.weight": 0.25, "*.bias": "full",
                                "head.*": "full"},
                               et.AdamW(lr=1e-3, eps=1e-4), dict(frozen_weights="int8", on_nonfinite="raise")),
    "vit-lora": ("vit", True, torch.float32, 32, {"blocks.*.attn.qkv.weight": {"lora": 4}, "head.*": "full"},
                 et.SGD(lr=0.05), {}),
    # The fused vocabulary loss (vocab_log_prob and its gradients) and the attention ops.
    "llama-lm-sparse": ("llama", True, torch.float32, 16, et.schemes.lm_sparse(1), et.AdamW(lr=1e-3, eps=1e-4), {}),
}


def snapshot(trainer):
    return copy.deepcopy(trainer.state_dict()), {k: v.clone() for k, v in trainer.model.state_dict().items()}


def train(trainer, batches):
    losses = [trainer.step(*b) for b in batches]
    return losses, snapshot(trainer)


@pytest.mark.parametrize("case", list(CASES))
def test_onnxruntime_backend_matches_torch_backend(case, monkeypatch):
    monkeypatch.setenv("EDGETUNE_MEASURE_SCRATCH", "0")
    name, train_mode, dtype, size, scheme, optimizer, options = CASES[case]
    lm = name == "llama"
    model = build(name, num_classes=256 if lm else 10).train(train_mode).to(dtype)
    batches = tokens(size) if lm else images(size, dtype)
    trainer = et.compile(model, next_token_loss if lm else F.cross_entropy, *batches[0], scheme=scheme,
                         optimizer=optimizer, backend="onnxruntime", **options)
    if lm:
        assert "vocab_log_prob" in {n.op for n in trainer.graph.nodes}, "the case no longer covers the fused loss"
    check_backends_agree(trainer, batches, dtype)


HF_CASES = {
    # A padded batch (attention mask as an input), the fused vocabulary loss, rotary tables; a
    # ratio on the tied embedding: the head's gradient for chosen hidden columns, and the table's.
    "hf-llama-partial": ("llama", {"model.layers.1.self_attn.q_proj.weight": 0.5, "model.layers.1.*norm.weight": "full",
                                   "model.layers.1.mlp.up_proj.weight": 0.25, "model.embed_tokens.weight": 0.25}),
    "hf-bert-partial-biases": ("bert", {"classifier.*": "full", "*.bias": "full",
                                        "bert.encoder.layer.1.attention.self.query.weight": 0.5}),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_onnxruntime_backend_matches_torch_backend_on_transformers_models(case, monkeypatch):
    pytest.importorskip("transformers")
    from edgetune.models.hf import causal_lm_loss, tiny_causal_lm, tiny_sequence_classifier
    from tests.e2e.test_hf_models import classifier_batches, classifier_loss, lm_batches

    monkeypatch.setenv("EDGETUNE_MEASURE_SCRATCH", "0")
    kind, scheme = HF_CASES[case]
    if kind == "llama":
        model, loss_fn, batches = tiny_causal_lm("llama"), causal_lm_loss, lm_batches()
    else:
        model, loss_fn, batches = tiny_sequence_classifier(), classifier_loss, classifier_batches()
    trainer = et.compile(model, loss_fn, *batches[0], scheme=scheme, optimizer=et.AdamW(lr=1e-3, eps=1e-4),
                         backend="onnxruntime")
    check_backends_agree(trainer, batches, torch.float32)


def check_backends_agree(trainer, batches, dtype):
    assert trainer.backend.name == "onnxruntime" and "onnxruntime" in str(trainer.report())
    model, train_mode = trainer.model, trainer.model.training
    start, start_weights = snapshot(trainer)

    ort_losses, (ort_state, ort_weights) = train(trainer, batches)
    trainer.load_state_dict(start)
    trainer.compiled = CompiledStep(trainer.graph, trainer.device)
    torch_losses, (torch_state, torch_weights) = train(trainer, batches)

    tol = TOLERANCE[dtype]
    torch.testing.assert_close(torch.tensor(ort_losses), torch.tensor(torch_losses), **tol)
    for key in torch_weights:
        torch.testing.assert_close(ort_weights[key], torch_weights[key], **tol, msg=lambda m: f"{key}: {m}")
    for group in ("optimizer", "adapters"):
        assert set(ort_state[group]) == set(torch_state[group])
        for key in torch_state[group]:
            torch.testing.assert_close(ort_state[group][key], torch_state[group][key], **tol,
                                       msg=lambda m: f"{group} {key}: {m}")
    masks = trainer.trained_masks()
    # A tied weight is in the state dict under each of its names, and in the masks under one.
    by_storage = {model.state_dict()[k].data_ptr(): m for k, m in masks.items()}
    for key, before in start_weights.items():
        mask = by_storage.get(model.state_dict()[key].data_ptr())
        untouched = ~mask if mask is not None else torch.ones_like(before, dtype=torch.bool)
        if key in dict(model.named_buffers()) and train_mode:
            continue  # a train-mode norm's statistics are written by both, compared above
        assert torch.equal(ort_weights[key][untouched], before[untouched]), f"{key} changed outside its scheme"
