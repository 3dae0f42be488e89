"""The language-model search (edgetune.apps.lm_search): its space over bands of blocks with
channel ratios and LoRA as options, contributions over seeds with their spread, short runs
that leave the weights as they were, and the search-lm / finetune-lm --scheme auto commands."""
import json
import os

import pytest
import torch

from edgetune.apps.lm import load_lm
from edgetune.apps.lm_search import LMSearchSettings, LMSearchSpace, seeded_contributions, short_lm_run
from edgetune.apps.search import search
from edgetune.cli import main
from edgetune.compiler.scheme import SchemeError
from edgetune.data.chat import tokenize_records

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def lm():
    return load_lm("tiny-llama")


def chats(n):
    return [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "abc" * (1 + i % 3)}]
            for i in range(n)]


def test_the_space_covers_every_block_in_bands_with_ratios_and_lora(lm):
    space = LMSearchSpace.from_model(lm.model, bands=2, ratios=(0.25, 1), lora_ranks=(4,))
    assert space.blocks == ("model.layers.0", "model.layers.1")
    assert space.floor == ("model.norm.weight",)
    assert space.ratios == (0.0, 0.25, 1.0, "lora:4")
    assert len(space.weight_units) == 14  # 2 bands x q, k, v, o, gate, up, down
    assert space.members["model.layers.0.self_attn.q_proj.weight"] == ("model.layers.0.self_attn.q_proj.weight",)
    scheme = space.scheme(1, {"model.layers.0.self_attn.q_proj.weight": 0.25,
                              "model.layers.1.mlp.up_proj.weight": "lora:4",
                              "model.layers.1.mlp.down_proj.weight": 1.0,
                              "model.layers.0.self_attn.v_proj.weight": 0.0})
    assert scheme == {"model.norm.weight": "full",
                      "model.layers.1.input_layernorm.weight": "full",
                      "model.layers.1.post_attention_layernorm.weight": "full",
                      "model.layers.0.self_attn.q_proj.weight": 0.25,
                      "model.layers.1.mlp.up_proj.weight": {"lora": 4, "alpha": 8},
                      "model.layers.1.mlp.down_proj.weight": "full"}
    one_band = LMSearchSpace.from_model(lm.model, bands=1, kinds=["mlp.up_proj"])
    assert one_band.weight_units == ("model.layers.{0-1}.mlp.up_proj.weight",)
    assert one_band.members[one_band.weight_units[0]] == ("model.layers.0.mlp.up_proj.weight",
                                                          "model.layers.1.mlp.up_proj.weight")
    assert one_band.bias_choices[0] == 0 and one_band.bias_choices[-1] == 2


def test_bad_spaces_are_refused_with_what_to_do(lm):
    with pytest.raises(ValueError, match="bands must be at least 1"):
        LMSearchSpace.from_model(lm.model, bands=0)
    assert len(LMSearchSpace.from_model(lm.model, bands=6, kinds=["mlp.up_proj"]).weight_units) == 2  # a band a block
    with pytest.raises(ValueError, match="not linear layers of a block"):
        LMSearchSpace.from_model(lm.model, kinds=["attn.qkv"])
    with pytest.raises(ValueError, match="at least one way to train a weight"):
        LMSearchSpace.from_model(lm.model, ratios=(), lora_ranks=())
    with pytest.raises(ValueError, match="not parameters"):
        LMSearchSpace.from_model(lm.model, floor=["lm_head.bias"])
    with pytest.raises(SchemeError, match="the LM search: found no transformer blocks"):
        LMSearchSpace.from_model(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def additive_score(space, gains):
    """A fake evaluate: minus a loss that each trained unit lowers by its known gain, plus a noise per seed."""
    def for_seed(seed):
        def evaluate(scheme):
            loss = 3.0 - 0.01 * seed
            for unit, by_option in gains.items():
                first = space.members[unit][0]
                if first in scheme:
                    rule = scheme[first]
                    option = f"lora:{rule['lora']}" if isinstance(rule, dict) else (1.0 if rule == "full" else rule)
                    loss -= by_option[option] * (1 + 0.1 * seed)
            return -loss
        return evaluate
    return for_seed


def test_contributions_are_averaged_over_seeds_with_their_spread_and_cached_per_seed(lm, tmp_path):
    space = LMSearchSpace.from_model(lm.model, bands=1, ratios=(1,), lora_ranks=(4,),
                                     kinds=["self_attn.q_proj", "mlp.up_proj"])
    q, up = space.weight_units
    gains = {q: {1.0: 0.02, "lora:4": 0.05}, up: {1.0: 0.10, "lora:4": 0.01}}
    calls = []

    def counting(seed):
        evaluate = additive_score(space, gains)(seed)
        return lambda scheme: calls.append(seed) or evaluate(scheme)

    cache = str(tmp_path / "cache.json")
    seeded = seeded_contributions(space, counting, (0, 1), cache=cache, context="fake")
    assert seeded.mean.weight[q]["lora:4"] == pytest.approx(0.05 * 1.05)
    assert seeded.spread.weight[up][1.0] == pytest.approx(0.10 * 0.1)
    assert seeded.mean.bias == {k: pytest.approx(0.0) for k in space.bias_choices}
    assert seeded.table()[0]["candidate"].startswith(up) and "spread" in seeded.table()[0]
    assert "median spread across 2 seeds" in seeded.noise_summary()
    runs = len(calls)
    assert runs == 2 * (len(space.bias_choices) + 4)  # per seed: floor, each k > 0, two units x two options
    again = seeded_contributions(space, counting, (0, 1), cache=cache, context="fake")
    assert len(calls) == runs and again.mean.weight == seeded.mean.weight  # all from the cache


class SizePredictor:
    """The peak a scheme would have: trained entries' bytes, a LoRA adapter counting as `lora_bytes`."""

    def __init__(self, model, lora_bytes):
        self.params, self.lora_bytes = dict(model.named_parameters()), lora_bytes

    def predict(self, scheme):
        size = 0
        for name, rule in scheme.items():
            if isinstance(rule, dict):
                size += self.lora_bytes
            else:
                size += self.params[name].numel() * 4 * (1.0 if rule == "full" else rule)
        return int(size)


def test_the_search_picks_lora_where_it_gains_more_for_the_memory(lm):
    space = LMSearchSpace.from_model(lm.model, bands=1, ratios=(0.5, 1), lora_ranks=(4,),
                                     kinds=["self_attn.q_proj", "mlp.up_proj"])
    q, up = space.weight_units
    gains = {q: {0.5: 0.01, 1.0: 0.02, "lora:4": 0.05}, up: {0.5: 0.03, 1.0: 0.04, "lora:4": 0.0}}
    seeded = seeded_contributions(space, additive_score(space, gains), (0,), cache=None, context="fake")
    predictor = SizePredictor(lm.model, lora_bytes=100)
    up_half = sum(p.numel() * 2 for n, p in lm.model.named_parameters() if n.endswith("up_proj.weight"))
    floor = predictor.predict(space.scheme(space.bias_choices[-1]))
    result = search(space, seeded.mean, predictor, budget_bytes=floor + 100 + up_half)
    assert result.scheme["model.layers.0.self_attn.q_proj.weight"] == {"lora": 4, "alpha": 8}
    assert result.scheme["model.layers.1.mlp.up_proj.weight"] == 0.5  # the whole of it does not fit
    assert result.predicted_gain == pytest.approx(0.08)


def test_a_short_run_scores_minus_the_held_out_loss_and_restores_the_weights(lm):
    data = tokenize_records(chats(12), lm.tokenizer, seq_len=24)
    train, score = data.split(val_count=4, seed=0)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    settings = LMSearchSettings(steps=3, batch=2, seq_len=24, lr=1e-2)
    run = short_lm_run(lm.model, train, score, settings, seed=0)
    space = LMSearchSpace.from_model(lm.model, bands=1, ratios=(1,), lora_ranks=(2,), kinds=["mlp.up_proj"])
    from edgetune.apps.lm import evaluate_lm

    untrained = -evaluate_lm(lm.model, score, 2)
    floor, full, lora = (run(space.scheme(2, w)) for w in
                         ({}, {space.weight_units[0]: 1.0}, {space.weight_units[0]: "lora:2"}))
    for name, value in lm.model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed"
    assert len({untrained, floor, full, lora}) == 4  # each scheme trained something of its own
    assert all(s > untrained for s in (floor, full, lora))  # lr 1e-2 on 3 steps of a tiny set lowers the loss
    assert run(space.scheme(2, {space.weight_units[0]: 1.0})) == full  # the same seed, the same run


def write_chats(path, n=24):
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats(n)))
    return str(path)


def test_search_lm_writes_a_scheme_that_finetune_lm_takes_and_auto_searches_from_the_cache(tmp_path, capsys):
    common = ["--model", "tiny-llama", "--data", write_chats(tmp_path / "c.jsonl"), "--seq-len", "24",
              "--batch", "2", "--lr", "0.01", "--search-steps", "2", "--search-bands", "1",
              "--search-ratios", "1", "--search-lora", "none", "--search-score-items", "6",
              "--search-kinds", "self_attn.v_proj,mlp.up_proj", "--search-seeds", "1",
              "--search-cache", str(tmp_path / "cache.json")]
    assert main(["search-lm", *common, "--budget", "64MB", "--out", str(tmp_path / "s.json")]) == 0
    first = capsys.readouterr().out
    assert "one seed: no spread measured" in first and "(cached)" not in first
    scheme = json.loads((tmp_path / "s.json").read_text())
    meta = json.loads((tmp_path / "s.search.json").read_text())
    assert scheme["model.norm.weight"] == "full" and meta["measured_peak_bytes"] <= meta["budget_bytes"]
    assert {"candidate", "gain", "spread"} <= set(meta["history"][-1]["contributions"][0])
    run = tmp_path / "run"
    assert main(["finetune-lm", *common, "--scheme", "auto", "--budget", "64MB", "--steps", "2", "--no-progress",
                 "--out", str(run)]) == 0
    second = capsys.readouterr().out
    assert second.count("(cached)") == first.count("score (minus the loss)")
    assert json.loads((run / "scheme.json").read_text()) == scheme
    assert json.loads((run / "scheme.search.json").read_text())["memory_budget"] is None
    assert (run / "trained.safetensors").exists()
    # --search-recompute: the scheme comes with the budget to compile it under, which the
    # command to train it names. (finetune-lm --scheme auto runs the same search and keeps the
    # side file beside its scheme, as above; a resumed run reads it.)
    assert main(["search-lm", *common, "--search-recompute", "--budget", "64MB", "--out", str(tmp_path / "r.json")]) == 0
    fitted = json.loads((tmp_path / "r.search.json").read_text())["memory_budget"]
    assert 0 < fitted <= 64 * 2**20 and f"--budget {fitted // 2**10}KB" in capsys.readouterr().out


def test_finetune_lm_fits_a_given_scheme_to_its_budget_or_refuses_it(tmp_path, capsys):
    """--budget with a given scheme: a step over it recomputes blocks until it fits, or is refused."""
    import edgetune as et
    from edgetune.apps.lm import compile_lm

    plain = compile_lm(load_lm("tiny-llama", seq_len=24).model, et.schemes.parse("lora:4"), 2, 24,
                       et.AdamW(lr=1e-3)).report().predicted_peak_bytes
    common = ["finetune-lm", "--model", "tiny-llama", "--data", write_chats(tmp_path / "c.jsonl", 8), "--seq-len", "24",
              "--batch", "2", "--scheme", "lora:4", "--steps", "1", "--no-progress"]
    # a byte under the step as it is: only recomputed blocks make it fit
    assert main([*common, "--budget", f"{plain - 1}B", "--out", str(tmp_path / "fitted")]) == 0
    assert (tmp_path / "fitted" / "adapter").is_dir()
    assert main([*common, "--budget", "1KB", "--out", str(tmp_path / "refused")]) == 2
    assert "over the memory budget of 1.0 KB" in capsys.readouterr().err


def test_auto_and_budget_go_together(tmp_path, capsys):
    data = write_chats(tmp_path / "c.jsonl", 8)
    assert main(["finetune-lm", "--model", "tiny-llama", "--data", data, "--scheme", "auto"]) == 2
    assert "--scheme auto needs --budget" in capsys.readouterr().err
    assert main(["finetune-lm", "--model", "tiny-llama", "--data", data, "--budget", "10MB", "--lisa-layers", "1"]) == 2
    assert "LISA's steps are not fitted to a memory budget" in capsys.readouterr().err
    assert main(["finetune-lm", "--model", "tiny-llama", "--data", data, "--scheme", "auto", "--budget", "10MB",
                 "--optimizer", "mezo"]) == 2
    assert "does not take --optimizer mezo" in capsys.readouterr().err
    assert main(["search-lm", "--model", "tiny-llama", "--data", data, "--budget", "10MB",
                 "--search-lora", "x"]) == 2
    assert "--search-lora takes LoRA ranks" in capsys.readouterr().err


def test_a_classifier_job_searches_its_transformer_blocks_with_its_head_as_the_floor():
    from edgetune.apps.jobs import SearchSettings, build_job, search_space
    from edgetune.apps.search import SearchSpace

    vit = build_job("vit", "digits", size=16, train_limit=40)
    space = search_space(vit, SearchSettings(ratios=(0.0, 0.5, 1.0), lora_ranks=(2,), bands=1))
    assert isinstance(space, LMSearchSpace) and space.metric == "accuracy"
    assert space.floor == ("head.weight", "head.bias") and space.blocks == ("blocks.0", "blocks.1")
    assert space.ratios == (0.0, 0.5, 1.0, "lora:2")
    assert "blocks.{0-1}.attn.qkv.weight" in space.weight_units  # early blocks too
    layers = search_space(vit, SearchSettings(space="layers"))
    assert isinstance(layers, SearchSpace) and layers.head == "head"
    resnet = build_job("resnet", "digits", size=16, train_limit=40)
    assert isinstance(search_space(resnet, SearchSettings()), SearchSpace)  # no blocks: the layers space
    with pytest.raises(ValueError, match="unknown search space"):
        search_space(resnet, SearchSettings(space="everything"))
