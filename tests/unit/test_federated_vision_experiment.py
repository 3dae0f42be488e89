"""experiments.federated_vision's report: the table and the goals' verdicts come from the numbers."""
from experiments import federated_vision as fv


def _run(accuracies, down=None, up=None, entries=490_634):
    rounds = [{"round": r, "accuracy": a, "loss": 1.0} for r, a in enumerate(accuracies)]
    if down is not None:
        for r in rounds:
            r.update(down_per_client=down if r["round"] else 0, up_per_client=up if r["round"] else 0, refused=0)
    return {"rounds": rounds, "seconds": 100.0, "trained_entries": entries}


def _results(fed_final, whole_bytes):
    return {"meta": {"settings": fv.SETTINGS, "cpu": "x86_64", "date": "2026-12-02"},
            "runs": {"federated-sparse": _run([0.05, 0.6, fed_final], 1_000, 1_000),
                     "centralized-sparse": _run([0.05, 0.8, 0.89]),
                     "federated-whole": _run([0.05, 0.3, 0.7], whole_bytes, whole_bytes, 2_236_682)}}


def test_the_goals_are_judged_from_the_numbers():
    text = fv.section(_results(0.88, 4_000))
    assert "`federated-sparse`: +1.00 points behind — met" in text
    assert "4.0x fewer — met" in text
    assert "| federated-sparse-14x4 | | not run |" in text
    text = fv.section(_results(0.85, 3_900))
    assert "+4.00 points behind — missed" in text and "3.9x fewer — missed" in text


def test_a_run_is_refused_when_a_round_lost_a_reply():
    import pytest

    fv._check_round(1, 10, fv.SETTINGS)
    with pytest.raises(RuntimeError, match="round 3 averaged 9 of 10 clients' replies"):
        fv._check_round(3, 9, fv.SETTINGS, ["OutOfMemoryError"])


def test_variants_keep_the_examples_in_all():
    base = fv.total_steps(fv.SETTINGS)
    for name in fv.VARIANTS:
        assert fv.total_steps(fv.settings_of(name, fv.SETTINGS)) == base, name
