"""experiments.finetune_table's protocol: the learning rate tuned off its grid's edge, the
searched rows' spelling, and how report.py prints several seeds."""
import math

import pytest

import edgetune as et

from experiments import report
from experiments.finetune_table import TASKS, Task, row_task, searched_row, tune_lr


def _task(lrs, max_extensions=2) -> Task:
    return Task("m", "d", "adamw", lrs, [], max_extensions=max_extensions)


def test_the_rate_is_tuned_inside_the_grid_or_grown_past_the_edge_best():
    tried = []

    def accuracy(peak):
        def at(lr):
            tried.append(lr)
            return 1 - abs(math.log10(lr) - math.log10(peak))
        return at

    assert tune_lr(_task([1e-4, 3e-4, 1e-3]), accuracy(3e-4))[0] == 3e-4 and len(tried) == 3
    tried.clear()
    best, tuning = tune_lr(_task([1e-4, 3e-4, 1e-3]), accuracy(3e-3))  # best above the grid
    assert best == pytest.approx(3e-3) and tried[3:] == [pytest.approx(3e-3), pytest.approx(9e-3)]
    assert len(tuning) == 5
    tried.clear()
    best, _ = tune_lr(_task([1e-4, 3e-4, 1e-3], max_extensions=1), accuracy(1e-6))  # far below: stops at the limit
    assert best == pytest.approx(1e-4 / 3) and len(tried) == 4


def test_a_diverged_rate_counts_as_the_worst():
    best, tuning = tune_lr(_task([1e-4, 3e-4, 1e-3]), lambda lr: {1e-4: 0.6, 3e-4: 0.7}.get(lr, float("nan")))
    assert best == 3e-4 and len(tuning) == 3


def test_searched_rows_name_their_fraction_and_space():
    text = TASKS["text"]
    assert searched_row(text, "auto:0.25") == (0.25, text.search_space, False)
    assert searched_row(text, "auto:0.5:layers") == (0.5, "layers", False)
    assert searched_row(text, "auto:0.25:blocks:recompute") == (0.25, "blocks", True)
    assert searched_row(text, "auto:0.25:recompute") == (0.25, text.search_space, True)


def test_a_row_may_name_its_own_optimizer_and_trains_over_that_ones_grid():
    text = TASKS["text"]
    task, scheme = row_task(text, "auto:0.25:blocks:recompute@adafactor")
    assert scheme == "auto:0.25:blocks:recompute" and searched_row(task, scheme) == (0.25, "blocks", True)
    assert task.optimizer == "adafactor" and task.lrs == text.optimizer_lrs["adafactor"]
    assert text.optimizer == "adamw"  # the task itself is unchanged
    assert row_task(text, "full") == (text, "full")
    with pytest.raises(ValueError, match="unknown optimizer"):
        row_task(text, "full@adam")
    with pytest.raises(ValueError, match="no rate grid for 'sgd'"):
        row_task(text, "full@sgd")
    assert report._row_name("full@adafactor", {}) == "full, adafactor"
    assert report._row_name("auto:0.25@adafactor", {"budget_bytes": 2**20}) == "searched, budget 1.0 MB, adafactor"


def test_the_report_prints_the_seeds_spread_and_the_rates_tried_beyond_the_grid():
    row = {"accuracy": 0.7812, "accuracies": [0.77, 0.78, 0.7936], "accuracy_std": 0.0118, "lr": 0.003,
           "tuning": {"0.0001": 0.6, "0.0003": 0.7, "0.001": 0.75, "0.003": 0.76, "0.009": 0.74}}
    assert report._accuracy(row) == "78.12 ± 1.18%"
    assert report._accuracy({"accuracy": 0.5}) == "50.00%"  # one seed: no spread
    assert report._rate(row, [1e-4, 3e-4, 1e-3]) == "0.003 (grid grown by 0.003, 0.009)"
    assert report._row_name("auto:0.25", {"budget_bytes": 2**20, "search_space": "blocks"}) == \
        "searched (blocks space), budget 1.0 MB"
    assert report._row_name("auto:0.25:blocks:recompute", {"budget_bytes": 2**20, "search_space": "blocks",
                                                          "memory_budget": 2**20 - 10}) == \
        "searched (blocks space), budget 1.0 MB, blocks recomputed to fit"


def test_a_lora_rows_accuracy_is_its_trained_adapters_not_the_bare_weights():
    """Each seed is scored with the adapters folded in; scoring job.model after training
    would see the pretrained weights plus a trained head (what the first text table did)."""
    from edgetune.apps.finetune import evaluate
    from edgetune.apps.peft import adapters_merged
    from experiments.finetune_table import run_row, train_once

    task = Task("vit", "digits", "adamw", [3e-2], [], epochs=1, batch=16, size=16, train_limit=64, test_limit=64,
                seeds=(0,), max_extensions=0)
    row = run_row(task, "lora:4:qkv,fc1,alpha=8", None, args=None)
    job, trainer, _ = train_once(task, et.schemes.parse("lora:4:qkv,fc1,alpha=8"), 3e-2, epochs=1, tuning=False)
    with adapters_merged(trainer) as model:
        folded = evaluate(model, job.val, job.prepare)
    bare = evaluate(job.model, job.val, job.prepare)
    assert row["accuracies"] == [folded.accuracy]
    assert bare.loss != pytest.approx(folded.loss, abs=1e-6)  # the adapters did change the model
