"""Recomputing transformer blocks under a memory budget (edgetune.compiler.passes.blocks): the
fewest first blocks that fit, the same numbers, less memory measured, and the search using it."""
import pytest
import torch

import edgetune as et
from edgetune.compiler.memory import BudgetError
from edgetune.compiler.passes import FORWARD_PIPELINE, PIPELINE, with_blocks_recomputed_to_fit

pytest.importorskip("transformers")
from edgetune.models.hf import causal_lm_loss, tiny_causal_lm  # noqa: E402

LAYERS = 4
# LoRA on q and v in every block and the last block's MLP: the backward crosses every block.
SCHEME = {"model.layers.*.self_attn.q_proj.weight": {"lora": 4}, "model.layers.*.self_attn.v_proj.weight": {"lora": 4},
          f"model.layers.{LAYERS - 1}.mlp.*.weight": "full", "model.layers.*.input_layernorm.weight": "full"}


def lm(**config):
    return tiny_causal_lm("llama", num_hidden_layers=LAYERS, **config)


def lm_batch(model, size=4, length=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (size, length), generator=g)
    return (ids,), (ids,)


def compiled(model, budget=None, passes=None, scheme=SCHEME):
    return et.compile(model, causal_lm_loss, *lm_batch(model), scheme=scheme, optimizer=et.AdamW(lr=1e-2),
                      memory_budget=budget, passes=passes)


def recomputed_blocks(trainer) -> set[int]:
    """The blocks whose forward nodes run again in the backward."""
    return {int(n.meta["recomputed_block"].rpartition(".")[2]) for n in trainer.graph.nodes
            if "recomputed_block" in n.meta}


def peaks(model):
    """(the step's predicted peak as it is, with every block recomputed)."""
    every = with_blocks_recomputed_to_fit(FORWARD_PIPELINE + PIPELINE, 0)  # 0 B: every block it can
    return compiled(model).report().predicted_peak_bytes, compiled(model, passes=every).report().predicted_peak_bytes


def test_a_budget_recomputes_the_fewest_first_blocks_and_changes_no_number():
    plain_model, fitted_model = lm(), lm()
    high, low = peaks(lm())
    assert low < 0.8 * high  # what the backward keeps of a block is most of this step's peak
    budget = (high + low) // 2
    plain, fitted = compiled(plain_model), compiled(fitted_model, budget)
    assert fitted.report().predicted_peak_bytes <= budget
    blocks = recomputed_blocks(fitted)
    assert blocks and blocks == set(range(len(blocks))) and len(blocks) < LAYERS  # the first k, not all
    assert not recomputed_blocks(plain)
    for seed in range(3):
        batch = lm_batch(plain_model, seed=seed)
        assert fitted.step(*batch) == plain.step(*batch)  # the same kernels on the same inputs
    for (name, a), (_, b) in zip(plain_model.named_parameters(), fitted_model.named_parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    for name, a in plain.adapters.items():
        torch.testing.assert_close(fitted.adapters[name], a, rtol=0, atol=0, msg=name)


def test_a_step_that_fits_its_budget_is_left_as_it_is():
    high, _ = peaks(lm())
    trainer = compiled(lm(), budget=high)
    assert not recomputed_blocks(trainer)
    assert trainer.report().predicted_peak_bytes == high


def test_a_budget_below_every_block_recomputed_is_refused():
    _, low = peaks(lm())
    with pytest.raises(BudgetError, match="over the memory budget"):
        compiled(lm(), budget=low // 2)


def test_recomputed_blocks_lower_the_measured_peak():
    """Measured in fresh processes (edgetune.apps.measure), a model whose blocks keep a few MB."""
    model = lm(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=4)
    batch = lm_batch(model, size=8, length=128)
    every = with_blocks_recomputed_to_fit(FORWARD_PIPELINE + PIPELINE, 0)
    low = et.compile(model, causal_lm_loss, *batch, scheme=SCHEME, optimizer=et.AdamW(lr=1e-2),
                     passes=every).report().predicted_peak_bytes
    plain_peak, plain_predicted = _measured(model, batch, None)
    budget = (plain_predicted + low) // 2
    fitted_peak, fitted_predicted = _measured(model, batch, budget)
    assert fitted_predicted <= budget < plain_predicted
    # the drop the plan predicts shows in the process, within a fifth
    assert plain_peak - fitted_peak >= 0.8 * (plain_predicted - fitted_predicted), (plain_peak, fitted_peak)


def _measured(model, batch, budget):
    """(measured, predicted) peak of the step compiled under `budget`."""
    from edgetune.apps.measure import measure_peak

    optimizer = et.AdamW(lr=1e-2)
    predicted = et.compile(model, causal_lm_loss, *batch, scheme=SCHEME, optimizer=optimizer,
                           memory_budget=budget).report().predicted_peak_bytes
    return measure_peak(model, causal_lm_loss, *batch, SCHEME, optimizer, memory_budget=budget), predicted


def test_the_peak_predictor_fits_a_scheme_to_its_budget_as_compile_does():
    from edgetune.apps.search import PeakPredictor

    model = lm()
    high, low = peaks(model)
    budget = (high + low) // 2
    inputs, targets = lm_batch(model)
    assert PeakPredictor(model, causal_lm_loss, inputs, targets, et.AdamW(lr=1e-2)).predict(SCHEME) == high
    fitting = PeakPredictor(model, causal_lm_loss, inputs, targets, et.AdamW(lr=1e-2), memory_budget=budget)
    assert fitting.predict(SCHEME) == compiled(model, budget).report().predicted_peak_bytes <= budget
