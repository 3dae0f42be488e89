"""experiments.web_accuracy's verdicts, from made-up runs (the experiment itself takes minutes)."""
from experiments.web_accuracy import section


def _results(page: list[float], python: list[float]) -> dict:
    run = lambda a: {"before": 0.1, "after": a}  # noqa: E731
    return {"meta": {"epochs": 5, "lr": 0.001, "schedule": "cosine", "seeds": [0, 1], "scheme": "mbv2-99kb",
                     "size": 96, "batch": 8, "date": "2026-12-02"},
            "runs": {"browser": {}, "browser_same_order": {str(k): run(a) for k, a in enumerate(page)},
                     "python": {str(k): run(a) for k, a in enumerate(python)}}}


def test_within_one_point_on_average_is_met():
    text = section(_results([0.90, 0.93], [0.91, 0.93]))
    assert "-0.50 points" in text and "**met**" in text
    assert "the page's own data order" not in text  # a side that did not run has no row


def test_a_larger_mean_gap_is_missed_even_if_one_seed_agrees():
    text = section(_results([0.90, 0.90], [0.90, 0.93]))
    assert "-1.50 points" in text and "**missed**" in text
