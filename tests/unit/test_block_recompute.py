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


EVERY_BLOCK = with_blocks_recomputed_to_fit(FORWARD_PIPELINE + PIPELINE, 0)  # 0 B: every block it can


def predictor(model, batch, **options):
    from edgetune.apps.search import PeakPredictor

    return PeakPredictor(model, causal_lm_loss, *batch, et.AdamW(lr=1e-2), **options)


# One xdist worker runs this module (make test: --dist loadgroup), so that its module fixture
# (bounds, the costly part) runs once, not once a worker.
pytestmark = pytest.mark.xdist_group("test_block_recompute")


@pytest.fixture(scope="module")
def bounds():
    """(the step's predicted peak as it is, with every block recomputed): one export for both."""
    model = lm()
    batch = lm_batch(model)
    return predictor(model, batch).predict(SCHEME), predictor(model, batch, passes=EVERY_BLOCK).predict(SCHEME)


def test_a_budget_recomputes_the_fewest_first_blocks_and_changes_no_number(bounds):
    plain_model, fitted_model = lm(), lm()
    high, low = bounds
    assert low < 0.8 * high  # what the backward keeps of a block is most of this step's peak
    budget = (high + low) // 2
    plain, fitted = compiled(plain_model), compiled(fitted_model, budget)
    assert plain.report().predicted_peak_bytes == high
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
    # the search's predictor fits a scheme to the budget as compile does (the kernels' measured
    # scratch, which both plans count, may differ a little between two measurements)
    predicted = predictor(plain_model, lm_batch(plain_model), memory_budget=budget).predict(SCHEME)
    assert predicted <= budget and predicted == pytest.approx(fitted.report().predicted_peak_bytes, rel=0.05)


def test_a_step_that_fits_its_budget_is_left_as_it_is_and_one_that_cannot_fit_is_refused(bounds):
    high, low = bounds
    trainer = compiled(lm(), budget=high)
    assert not recomputed_blocks(trainer)
    assert trainer.report().predicted_peak_bytes == high
    with pytest.raises(BudgetError, match="over the memory budget"):
        compiled(lm(), budget=low // 2)


def test_recomputed_blocks_lower_the_measured_peak():
    """Measured in fresh processes (edgetune.apps.measure), a model whose blocks keep a few MB."""
    from edgetune.apps.measure import measure_peak

    model = lm(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=4)
    batch, optimizer = lm_batch(model, size=8, length=128), et.AdamW(lr=1e-2)
    plain = predictor(model, batch)
    plain_predicted, low = plain.predict(SCHEME), predictor(model, batch, passes=EVERY_BLOCK).predict(SCHEME)
    budget = (plain_predicted + low) // 2
    fitted_predicted = predictor(model, batch, memory_budget=budget).predict(SCHEME)
    assert fitted_predicted <= budget < plain_predicted
    plain_peak = measure_peak(model, causal_lm_loss, *batch, SCHEME, optimizer)
    fitted_peak = measure_peak(model, causal_lm_loss, *batch, SCHEME, optimizer, memory_budget=budget)
    # the drop the plan predicts shows in the process, within a fifth
    assert plain_peak - fitted_peak >= 0.8 * (plain_predicted - fitted_predicted), (plain_peak, fitted_peak)


def test_the_search_reaches_the_first_blocks_when_it_may_recompute_blocks():
    """LoRA on the q of blocks 0-1 gains most, but its backward crosses every block: over the budget as
    the step is, within it with blocks recomputed, so only a fitting predictor lets it be chosen."""
    from edgetune.apps.lm_search import LMSearchSpace, seeded_contributions
    from edgetune.apps.search import search
    from tests.unit.test_lm_search import additive_score

    model = lm()
    # 8 schemes (each unit frozen or LoRA, norms of no block or all): each fitting prediction compiles a few times
    space = LMSearchSpace.from_model(model, bands=2, ratios=(), lora_ranks=(4,), kinds=["self_attn.q_proj"],
                                     norm_steps=1)
    assert space.size == 8
    first, *later = space.weight_units
    gains = {first: {"lora:4": 0.1}, **{u: {"lora:4": 0.01} for u in later}}
    seeded = seeded_contributions(space, additive_score(space, gains), (0,), cache=None, context="fake")
    batch = lm_batch(model)
    deep = space.scheme(0, {first: "lora:4"})
    plain = predictor(model, batch)
    budget = (plain.predict(deep) + predictor(model, batch, passes=EVERY_BLOCK).predict(deep)) // 2
    fitting = predictor(model, batch, memory_budget=budget)
    block0_q = space.members[first][0]
    assert block0_q == "model.layers.0.self_attn.q_proj.weight"
    assert block0_q not in search(space, seeded.mean, plain, budget).scheme
    chosen = search(space, seeded.mean, fitting, budget)
    assert chosen.scheme[block0_q] == {"lora": 4, "alpha": 8} and chosen.predicted_peak_bytes <= budget
