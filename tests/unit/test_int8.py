"""Frozen linear weights held as int8 (compile(..., frozen_weights="int8")): the step equals
PyTorch eager run on the dequantized weights, the float storage is really released, and
evaluation, checkpoints and the report see the right weights."""
import copy

import pytest
import torch
import torch.nn.functional as F

import edgetune as et
from edgetune.compiler.ir.ops.quant import dequantize, quantize_per_channel
from edgetune.models.hf import causal_lm_loss, tiny_causal_lm
from tests.reference import assert_models_match, train_eager


def test_quantization_error_is_at_most_half_a_step_per_row():
    w = torch.randn(6, 40, dtype=torch.float64) * torch.tensor([1e-3, 1, 10, 0, 5, 1e3], dtype=torch.float64)[:, None]
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (6, 1)
    assert ((dequantize(q, scale) - w).abs() <= scale / 2 + 1e-12).all()
    assert torch.equal(dequantize(q, scale)[3], torch.zeros(40, dtype=torch.float64))  # a zero row stays zero


def test_gradients_through_an_int8_linear():
    # Layer 1 is frozen and held as int8: the gradient of layer 0 flows through its
    # linear_int8 (grad input), and its own bias trains (grad bias). float64 against eager.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    reference = copy.deepcopy(model)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    trainer = et.compile(model, F.cross_entropy, (x,), (y,), scheme={"0.weight": "full", "2.bias": "full"},
                         optimizer=et.SGD(lr=0.5), frozen_weights="int8")
    assert list(trainer.int8) == ["2.weight"]
    assert "linear_int8_grad_input" in {n.op for n in trainer.graph.nodes}
    reference = _dequantized_copy(reference, trainer.int8)
    want = train_eager(reference, F.cross_entropy, [((x,), (y,))] * 2, trainer.trained_masks(),
                       lambda ps: torch.optim.SGD(ps, lr=0.5))
    assert [trainer.step((x,), (y,)) for _ in range(2)] == pytest.approx(want, rel=1e-12)
    with trainer.dequantized() as plain:
        assert_models_match(plain, reference, rtol=1e-12, atol=1e-14)


def _dequantized_copy(model, names):
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name in names:
                p.copy_(dequantize(*quantize_per_channel(p)))
    return reference


SCHEMES = {
    "partial": {"model.layers.1.self_attn.q_proj.weight": 0.5, "model.layers.1.*norm.weight": "full"},
    "qlora": {"model.layers.*.self_attn.v_proj.weight": {"lora": 4, "alpha": 8}},
    "bias-of-frozen": {"model.layers.*.self_attn.k_proj.bias": "full"},
}


def _batches():
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 128, (2, 12), generator=g) for _ in range(3)]
    return [((x, torch.ones_like(x)), (x.clone(),)) for x in ids]


@pytest.mark.parametrize("scheme", ["partial", "bias-of-frozen"])
def test_step_equals_eager_on_the_dequantized_weights(scheme):
    model = tiny_causal_lm("qwen2" if scheme == "bias-of-frozen" else "llama").double()
    batches = _batches()
    reference = copy.deepcopy(model)  # before the compile releases the float weights
    trainer = et.compile(model, causal_lm_loss, *batches[0], scheme=SCHEMES[scheme],
                         optimizer=et.SGD(lr=0.1, momentum=0.9), frozen_weights="int8")
    assert trainer.int8, "no frozen linear was quantized"
    reference = _dequantized_copy(reference, trainer.int8)
    losses = [trainer.step(*b) for b in batches]
    want = train_eager(reference, causal_lm_loss, batches, trainer.trained_masks(),
                       lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    assert losses == pytest.approx(want, rel=1e-5)
    with trainer.dequantized() as plain:
        assert_models_match(plain, reference, rtol=1e-5, atol=1e-7)


def test_lora_on_int8_base_weights_equals_lora_on_their_dequantized_values():
    # QLoRA's arrangement; float LoRA itself is checked against PEFT in test_lora.py.
    model = tiny_causal_lm("llama").double()
    batches = _batches()
    optimizer = et.AdamW(lr=1e-2, eps=1e-4)
    original = copy.deepcopy(model)
    int8 = et.compile(model, causal_lm_loss, *batches[0], scheme=SCHEMES["qlora"], optimizer=optimizer,
                      frozen_weights="int8")
    floats = et.compile(_dequantized_copy(original, int8.int8), causal_lm_loss, *batches[0],
                        scheme=SCHEMES["qlora"], optimizer=optimizer)
    assert "model.layers.0.self_attn.v_proj.weight" in int8.int8
    assert [int8.step(*b) for b in batches] == pytest.approx([floats.step(*b) for b in batches], rel=1e-6)
    for name, adapter in int8.adapters.items():
        torch.testing.assert_close(adapter, floats.adapters[name], rtol=1e-5, atol=1e-8)


def test_float_storage_is_released_and_lent_back():
    model = tiny_causal_lm("llama")
    batches = _batches()
    before = sum(p.nbytes for p in model.parameters())
    trainer = et.compile(model, causal_lm_loss, *batches[0], scheme={"model.norm.weight": "full"},
                         frozen_weights="int8")
    weight = model.model.layers[0].mlp.up_proj.weight
    assert weight.numel() == 0  # the float copy is gone
    report = trainer.report()
    assert report.int8_bytes > 0 and report.weight_bytes < before
    assert report.int8_float_bytes == pytest.approx(4 * (report.int8_bytes - sum(s.nbytes for _, s in trainer.int8.values())))
    ids, mask = batches[0][0]
    with trainer.dequantized() as plain:
        assert weight.shape == (64, 32)
        logits = plain(ids, mask).logits
    assert weight.numel() == 0 and torch.isfinite(logits).all()
    assert report.total_params == sum(p.numel() for p in tiny_causal_lm("llama").parameters())


def test_checkpoint_round_trip(tmp_path):
    batches = _batches()
    scheme = {"model.layers.1.*": "full"}
    first = et.compile(tiny_causal_lm("llama"), causal_lm_loss, *batches[0], scheme=scheme,
                       optimizer=et.AdamW(lr=1e-2), frozen_weights="int8")
    first.step(*batches[0])
    first.save(tmp_path / "step.pt")
    second = et.compile(tiny_causal_lm("llama"), causal_lm_loss, *batches[0], scheme=scheme,
                        optimizer=et.AdamW(lr=1e-2), frozen_weights="int8")
    second.load(tmp_path / "step.pt")
    assert first.step(*batches[1]) == second.step(*batches[1])


def test_bad_option():
    with pytest.raises(ValueError, match="frozen_weights must be 'float' or 'int8'"):
        et.compile(tiny_causal_lm("llama"), causal_lm_loss, *_batches()[0], frozen_weights="int4")
