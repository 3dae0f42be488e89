"""experiments.mezo_vs_backprop end to end on the tiny random LM, in this process: every
measurement its children make, the equal-wall-time step counts and the RESULTS section."""
import math

import pytest
import torch

from experiments import mezo_vs_backprop as exp

TINY = dict(exp.SETTINGS, model="tiny-llama", scheme="lm-sparse:2", max_chars=256, seq_len=32, test=8, val=8,
            timing_rounds=3, timing_warmup=1, mezo_lrs=[1e-2], budget_steps=4, memory_steps=1)


# One xdist worker runs this module (make test: --dist loadgroup), so that its module fixture
# (results, the costly part) runs once, not once a worker.
pytestmark = pytest.mark.xdist_group("test_mezo_vs_backprop_experiment")


@pytest.fixture(scope="module")
def results():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the experiment's children; tiny steps gain nothing from a second thread
    try:
        yield _measured()
    finally:
        torch.set_num_threads(threads)


def _measured() -> dict:
    r = {"meta": {"settings": TINY, "cpu": "x86_64", "commit": "abc1234", "date": "2026-12-02"},
         "before": exp.losses_before(TINY), "memory": {k: exp.measure_memory(k, TINY) for k in exp.KINDS},
         "timing": exp.time_in_turns(TINY), "runs": {}}
    budget = exp.equal_wall_time(r)
    r["runs"]["backprop@0.003"] = exp.run_one("backprop", 3e-3, budget["steps"]["backprop"], TINY)
    for lr in TINY["mezo_lrs"]:
        r["runs"][f"mezo@{lr:g}"] = exp.run_one("mezo", lr, budget["steps"]["mezo"], TINY)
    return r


def test_equal_wall_time_gives_each_optimizer_the_budget_over_its_own_step_time(results):
    med, budget = results["timing"]["median"], exp.equal_wall_time(results)
    assert budget["wall"] == pytest.approx(TINY["budget_steps"] * med["backprop"])
    assert budget["steps"]["backprop"] == TINY["budget_steps"]
    assert budget["steps"]["mezo"] == max(1, round(budget["wall"] / med["mezo"]))
    assert all(len(results["timing"]["seconds"][k]) == TINY["timing_rounds"] for k in exp.KINDS)


def test_runs_train_and_memory_is_measured(results):
    bp = results["runs"]["backprop@0.003"]
    assert bp["steps"] == TINY["budget_steps"] and len(bp["losses"]) == bp["steps"]
    assert math.isfinite(bp["test"]) and bp["test"] < results["before"]["test"]  # backprop learns on 4 steps
    assert results["memory"]["backprop"]["predicted_peak"] > results["memory"]["mezo"]["predicted_peak"]
    assert all(results["memory"][k]["steps_peak"] >= 0 for k in exp.KINDS)


def test_section_is_computed_from_the_results(results):
    text = exp.section(results)
    assert text.startswith(exp.TITLE)
    assert "`python -m experiments.mezo_vs_backprop`" in text
    best = exp.best_mezo(results)
    assert f"| MeZO | " in text and f"{best['test']:.4f}" in text
    assert f"{results['runs']['backprop@0.003']['test']:.4f}" in text
    assert "goal <= 1.1x" in text and "goal >= 0.45x" in text


def test_a_diverged_run_is_left_out_of_the_choice(results):
    r = dict(results, runs={**results["runs"], "mezo@1": {"kind": "mezo", "lr": 1.0, "steps": 1, "val": None,
                                                          "test": None, "diverged": "nan"}})
    assert exp.best_mezo(r) is exp.best_mezo(results) or exp.best_mezo(r)["lr"] != 1.0
    assert "1: diverged" in exp.section(r)
