import itertools
import json
import sys

import pytest
import torch.nn.functional as F

import edgetune as et
from edgetune.models import build
from edgetune.apps.search import BudgetError, PeakPredictor, SearchSpace, contributions, search, search_verified
from tests.unit.nets import ConvNet, batch

# A fake, additive evaluate: the accuracy a scheme would reach, from a known table.
BIAS_GAIN = {"bn.bias": 0.02, "bn2.bias": 0.03, "pw.bias": 0.05}
WEIGHT_GAIN = {"dw.weight": {0.125: 0.01, 0.25: 0.02, 0.5: 0.025, 1.0: 0.03},
               "pw.weight": {0.125: 0.04, 0.25: 0.06, 0.5: 0.07, 1.0: 0.09}}
BASE = 0.5


class FakeEvaluate:
    def __init__(self, fail_at: int | None = None) -> None:
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, scheme: dict) -> float:
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("interrupted mid-analysis")
        assert scheme["head.*"] == "full"
        acc = BASE + sum(g for name, g in BIAS_GAIN.items() if name in scheme)
        for name, table in WEIGHT_GAIN.items():
            if name in scheme:
                acc += table[1.0 if scheme[name] == "full" else scheme[name]]
        return acc


@pytest.fixture(scope="module")
def setup():
    model, data = ConvNet().eval(), batch()
    space = SearchSpace.from_model(model)
    predictor = PeakPredictor(model, F.cross_entropy, *data, et.SGD(lr=0.01, momentum=0.9))
    return model, data, space, predictor, contributions(space, FakeEvaluate())


def all_genomes(space):
    return itertools.product(range(len(space.bias_choices)), *[range(len(space.ratios))] * len(space.weight_units))


def test_search_space_of_a_small_net():
    space = SearchSpace.from_model(ConvNet())
    assert space.head == "head"
    assert space.bias_units == ("bn.bias", "bn2.bias", "pw.bias")
    assert space.bias_choices == (0, 1, 2, 3)
    assert space.weight_units == ("dw.weight", "pw.weight")  # the later half of stem, dw, pw
    assert space.scheme(2, {"pw.weight": 0.25, "dw.weight": 0.0}) == {
        "head.*": "full", "bn2.bias": "full", "pw.bias": "full", "pw.weight": 0.25}


def test_ratios_are_checked_and_a_space_of_biases_alone_is_searched(setup):
    with pytest.raises(ValueError, match=r"ratios must lie in \[0, 1\]"):
        SearchSpace.from_model(ConvNet(), ratios=(0, 2))
    _, _, _, predictor, gains = setup
    biases_only = SearchSpace.from_model(ConvNet(), ratios=(0,))  # weights frozen: only k is searched
    assert biases_only.ratios == (0.0,)
    result = search(biases_only, gains, predictor, 10 * predictor.predict(biases_only.scheme(0)), population=4,
                    generations=2)
    assert result.predicted_gain == pytest.approx(max(gains.bias.values()))


def test_pw1_filter_picks_the_first_pointwise_conv_of_the_later_mobilenetv2_blocks():
    space = SearchSpace.from_model(build("mobilenetv2-0.35", num_classes=10), weight_filter="pw1")
    # The TTE's published MobileNetV2 schemes choose among exactly these (conv indices 27..48 step 3).
    assert space.weight_units == tuple(f"features.{b}.conv.0.0.weight" for b in range(10, 18))
    assert space.head == "classifier.1" and not any(n.startswith("classifier") for n in space.bias_units)


def test_contributions_are_the_gains_over_head_only_and_over_all_biases(setup):
    gains = setup[-1]
    assert gains.baseline == pytest.approx(BASE)
    assert gains.bias == pytest.approx({0: 0, 1: 0.05, 2: 0.08, 3: 0.10})
    for name, table in WEIGHT_GAIN.items():
        assert gains.weight[name] == pytest.approx(table)


@pytest.fixture(scope="module")
def estimated(setup):
    """A predictor of the same step whose peaks come from the per-op estimates, every scheme's
    predicted once: the search is compared with an exhaustive one on the same predictions, and
    this machine's measured kernel scratch moves with its load (a near-tie then leads the
    search another way, which is not what the test is about)."""
    model, data, space, _, gains = setup
    predictor = PeakPredictor(model, F.cross_entropy, *data, et.SGD(lr=0.01, momentum=0.9))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("EDGETUNE_MEASURE_SCRATCH", "0")
        for genome in all_genomes(space):
            predictor.predict(space.scheme_of(genome))
    return space, predictor, gains


def test_search_finds_the_best_scheme_that_fits_and_never_exceeds_the_budget(estimated):
    space, predictor, gains = estimated
    genomes = [(g, gains.total(*space.decode(g)), predictor.predict(space.scheme_of(g))) for g in all_genomes(space)]
    peaks = sorted({p for _, _, p in genomes})
    for budget in (peaks[0], peaks[len(peaks) // 3], peaks[2 * len(peaks) // 3], peaks[-1]):
        best = max(gain for _, gain, peak in genomes if peak <= budget)
        result = search(space, gains, predictor, budget, population=8, generations=6, seed=1)
        assert result.predicted_peak_bytes <= budget
        assert predictor.predict(result.scheme) == result.predicted_peak_bytes
        assert result.predicted_gain == pytest.approx(best)


def test_search_is_reproducible_and_says_when_nothing_fits(setup):
    _, _, space, predictor, gains = setup
    head_only = predictor.predict(space.scheme(0))
    budget = 2 * head_only
    a, b = (search(space, gains, predictor, budget, population=6, generations=4, seed=3) for _ in range(2))
    assert (a.scheme, a.history) == (b.scheme, b.history)
    with pytest.raises(BudgetError, match=f"smallest achievable.*|{head_only} bytes"):
        search(space, gains, predictor, head_only - 1)


def test_a_second_analysis_reuses_every_measurement(tmp_path):
    space, cache = SearchSpace.from_model(ConvNet()), str(tmp_path / "contrib.json")
    first, again, other = FakeEvaluate(), FakeEvaluate(), FakeEvaluate()
    gains = contributions(space, first, cache=cache, context="convnet fake 10 steps")
    assert first.calls == 1 + 3 + 2 * 4  # head, k = 1..3, two weights at four ratios
    assert contributions(space, again, cache=cache, context="convnet fake 10 steps") == gains
    assert again.calls == 0
    contributions(space, other, cache=cache, context="convnet fake 20 steps")  # not comparable: measured anew
    assert other.calls == first.calls


def test_an_interrupted_analysis_resumes_where_it_stopped(tmp_path):
    space, cache = SearchSpace.from_model(ConvNet()), str(tmp_path / "contrib.json")
    with pytest.raises(KeyboardInterrupt):
        contributions(space, FakeEvaluate(fail_at=5), cache=cache, context="c")
    assert len(json.load(open(cache))["measurements"]["c"]) == 4
    resumed = FakeEvaluate()
    gains = contributions(space, resumed, cache=cache, context="c")
    assert resumed.calls == 12 - 4
    assert gains.weight["pw.weight"] == pytest.approx(WEIGHT_GAIN["pw.weight"])


def test_predictor_equals_the_compiled_report(setup):
    model, data, space, predictor, _ = setup
    for scheme in (et.schemes.full(), et.schemes.bias_only(), space.scheme(1, {"pw.weight": 0.5}),
                   {"dw.weight": {"ratio": 0.25, "select": "first"}, "head.*": "full"}):
        trainer = et.compile(model, F.cross_entropy, *data, scheme=scheme, optimizer=et.SGD(lr=0.01, momentum=0.9))
        assert predictor.predict(scheme) == trainer.report().predicted_peak_bytes, scheme


def test_saved_result_loads_as_a_scheme_file(setup, estimated, tmp_path, monkeypatch):
    model, data = setup[:2]
    space, predictor, gains = estimated  # measured peaks move with load: head-only could exceed full's
    monkeypatch.setenv("EDGETUNE_MEASURE_SCRATCH", "0")
    result = search(space, gains, predictor, predictor.predict(et.schemes.full()), population=6, generations=3)
    side = result.save(str(tmp_path / "scheme.json"))
    loaded = et.schemes.parse(str(tmp_path / "scheme.json"))
    assert loaded == result.scheme
    assert json.load(open(side))["predicted_peak_bytes"] == result.predicted_peak_bytes
    et.compile(model, F.cross_entropy, *data, scheme=loaded)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="measures through Linux's /proc")
def test_measured_peak_of_the_searched_scheme_fits_the_budget():
    model, data = ConvNet().eval(), batch(n=32, size=64)  # activations of a few MB, above the noise
    space = SearchSpace.from_model(model)
    predictor = PeakPredictor(model, F.cross_entropy, *data, et.SGD(lr=0.01, momentum=0.9))
    gains = contributions(space, FakeEvaluate())
    # The budget comes from measurements on this machine, not from what a CPU's kernels are
    # assumed to allocate: a margin above the measured peaks of the head alone and of the
    # cheapest scheme that trains more (a margin for the measurement's own repeatability), so
    # that one fits, and below full training's, so that not everything does.
    cheapest = min((space.scheme(k) for k in space.bias_choices[1:]), key=predictor.predict)
    budget = int(max(predictor.measure(space.scheme(0)), predictor.measure(cheapest)) * 1.25)
    assert budget < predictor.measure(et.schemes.full())
    result = search_verified(space, gains, predictor, budget, population=8, generations=4)
    assert result.measured_peak_bytes <= budget
    assert result.predicted_gain > 0


def test_a_space_no_larger_than_the_evolution_would_try_is_searched_whole(estimated):
    space, predictor, gains = estimated
    genomes = [(gains.total(*space.decode(g)), predictor.predict(space.scheme_of(g))) for g in all_genomes(space)]
    budget = sorted(p for _, p in genomes)[len(genomes) // 2]
    result = search(space, gains, predictor, budget, population=10, generations=space.size // 10)
    assert result.history[0]["exhaustive"] and result.predicted_peak_bytes <= budget
    assert result.predicted_gain == pytest.approx(max(gain for gain, peak in genomes if peak <= budget))


class NoisyPredictor:
    """Predicts every scheme's peak as the head's; measures the head within the budget and any
    other scheme far over it, as a loaded machine may."""

    def __init__(self, predictor, head_scheme, budget):
        self.predicted, self.head_scheme, self.budget = predictor.predict(head_scheme), head_scheme, budget

    def predict(self, scheme):
        return self.predicted

    def measure(self, scheme, steps=2):
        return self.predicted if scheme == self.head_scheme else 10 * self.budget


def test_when_every_other_scheme_measures_over_the_budget_the_head_alone_is_returned(estimated):
    space, predictor, gains = estimated
    budget = 2 * predictor.predict(space.scheme(0))
    noisy = NoisyPredictor(predictor, space.scheme(0), budget)
    result = search_verified(space, gains, noisy, budget, population=6, generations=2)
    assert result.scheme == space.scheme(0) and result.measured_peak_bytes <= budget


@pytest.mark.parametrize("content, says", [
    ('{"fc.*": "full"}', r"is not a search cache \(a JSON object with 'measurements'; a scheme file, say\)"),
    ("{\"version\": 1, \"meas", r"is not a search cache \(not JSON: .*delete this file to measure again"),
])
def test_a_file_that_is_not_a_search_cache_is_refused_by_name(tmp_path, content, says):
    from edgetune.apps.search import _Cache

    path = tmp_path / "cache.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"{path} {says}"):
        _Cache(str(path), "any")
    assert path.read_text() == content  # left as it was
