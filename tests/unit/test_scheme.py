import pytest
import torch

from edgetune import schemes
from edgetune.compiler.scheme import Rule, SchemeError, choose_channels, resolve
from tests.unit.nets import ConvNet


def test_first_matching_pattern_decides_and_unmatched_are_frozen():
    rules = resolve({"head.bias": "frozen", "head.*": "full", "pw.weight": 0.25}, ConvNet())
    assert set(rules) == {"head.weight", "pw.weight"}
    assert rules["pw.weight"] == Rule(0.25, "magnitude")


def test_dict_rule_with_selection():
    rules = resolve({"pw.weight": {"ratio": 0.5, "select": "first"}}, ConvNet())
    assert rules["pw.weight"] == Rule(0.5, "first")


@pytest.mark.parametrize("scheme, message", [
    ({"nope.*": "full"}, "'nope.*' matches no parameter"),
    ({"pw.weight": 0.0}, "ratio for 'pw.weight' must be a number in \\(0, 1\\]"),
    ({"pw.weight": 1.5}, "ratio for 'pw.weight'"),
    ({"pw.weight": "half"}, "unknown rule 'half' for 'pw.weight'"),
    ({"pw.weight": {"ratio": 0.5, "select": "random"}}, "select for 'pw.weight'"),
    ({"pw.weight": {"fraction": 0.5}}, "rule for 'pw.weight'"),
    ({"pw.weight": {"rows": []}}, "rows for 'pw.weight' must be 'touched' or a non-empty list"),
    ({"pw.weight": {"rows": [1, -2]}}, "rows for 'pw.weight'"),
    ({"pw.weight": {"rows": "all"}}, "rows for 'pw.weight'"),
    ({"pw.weight": {"rows": [1], "ratio": 0.5}}, "rows rule for 'pw.weight': expected"),
])
def test_bad_schemes_name_the_culprit(scheme, message):
    with pytest.raises(SchemeError, match=message):
        resolve(scheme, ConvNet())


def test_rows_rules_are_sorted_token_ids_or_touched_and_round_trip():
    rules = resolve({"pw.weight": {"rows": [7, 1, 7]}, "head.weight": {"rows": "touched"}}, ConvNet())
    assert rules["pw.weight"] == Rule(rows=(1, 7)) and rules["pw.weight"].partial
    assert rules["head.weight"].touched and not rules["head.weight"].partial
    assert resolve(schemes.as_mapping(rules), ConvNet()) == rules


def test_presets():
    model = ConvNet()
    assert set(resolve(schemes.full(), model)) == {n for n, _ in model.named_parameters()}
    assert set(resolve(schemes.bias_only(), model)) == {"bn.bias", "bn2.bias", "pw.bias", "head.bias"}
    assert set(resolve(schemes.last(2), model)) == {"pw.weight", "pw.bias", "head.weight", "head.bias"}


def test_bias_only_finds_every_bias_at_any_depth_and_refuses_a_model_without_one():
    attention = torch.nn.Sequential(torch.nn.MultiheadAttention(8, 2), torch.nn.LayerNorm(8))
    assert set(resolve(schemes.bias_only(), attention)) == {"0.in_proj_bias", "0.out_proj.bias", "1.bias"}
    assert set(resolve(schemes.bias_only(), torch.nn.Linear(3, 2))) == {"bias"}  # a bare layer's
    recurrent = torch.nn.GRU(3, 4, bidirectional=True)  # the recurrent layers' bias_ih_l0, bias_hh_l0_reverse, ...
    assert set(resolve(schemes.bias_only(), recurrent)) == {n for n, _ in recurrent.named_parameters() if "bias" in n}
    assert len(resolve(schemes.bias_only(), recurrent)) == 4
    with pytest.raises(SchemeError, match=r"the model has no bias.*norms_only\(\)"):
        resolve(schemes.bias_only(), torch.nn.Linear(3, 2, bias=False))


def test_tte_keys_map_onto_convs_and_norm_biases():
    scheme = schemes.tte(n_bias_update=2, manual_weight_idx=[1, 2], weight_update_ratio="0.5-1",
                         weight_select_criteria="first")
    rules = resolve(scheme, ConvNet())
    # convs: 0 stem, 1 dw, 2 pw; the last 2 biases are dw's (its BN's) and pw's own.
    assert rules == {"bn2.bias": Rule(), "dw.weight": Rule(0.5, "first"), "pw.weight": Rule(),
                     "pw.bias": Rule(), "head.weight": Rule(), "head.bias": Rule()}


def test_tte_rejects_mismatched_ratio_list():
    with pytest.raises(SchemeError, match="weight_update_ratio has 1 entries for 2"):
        resolve(schemes.tte(1, [1, 2], [0.5]), ConvNet())


def test_magnitude_picks_largest_norm_channels_sorted():
    w = torch.zeros(4, 6, 1, 1)
    w[:, 4] = 3.0
    w[:, 1] = 2.0
    w[:, 5] = 1.0
    assert choose_channels(w, 1, Rule(0.5)).tolist() == [1, 4, 5]
    assert choose_channels(w, 1, Rule(0.34, "first")).tolist() == [0, 1, 2]
