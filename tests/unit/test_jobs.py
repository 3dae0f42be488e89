"""Jobs: model + data + preprocessing, as `edgetune finetune` and `search` build them."""
import numpy as np
import pytest
import torch
from PIL import Image

from edgetune.apps.jobs import SearchSettings, _scoring_split, _short_run, build_job, measure_contributions


def _image_folder(root, layout_split: bool):
    for split in (["train", "val"] if layout_split else [""]):
        for cls, value in (("cats", 40), ("dogs", 200)):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(6):
                Image.fromarray(np.full((12, 12, 3), value + i, np.uint8)).save(folder / f"{i}.png")
    return root


def test_a_folder_with_train_and_val_holds_out_val(tmp_path):
    job = build_job("resnet", str(_image_folder(tmp_path, layout_split=True)), size=16)
    assert len(job.train) == 12 and len(job.val) == 12 and job.train.classes == ["cats", "dogs"]
    assert job.head == "fc" and job.model.fc.out_features == 2 and not job.model.training
    (x,), (y,) = job.example(4)
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.shape == (4,)


def test_a_flat_folder_is_split_stratified(tmp_path):
    job = build_job("resnet", str(_image_folder(tmp_path, layout_split=False)), size=16, val_fraction=0.5)
    assert len(job.train) == len(job.val) == 6
    assert job.val.labels.bincount().tolist() == [3, 3]


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="pretrained: .*mobilenetv2-imagenet"):
        build_job("alexnet", "digits")


def test_a_short_run_restores_the_weights_it_trained(tmp_path):
    job = build_job("resnet", "digits", size=16, train_limit=200)
    before = {k: v.clone() for k, v in job.model.state_dict().items()}
    settings = SearchSettings(batch=16, steps=3, score_items=50, lr=0.05)
    train, score = _scoring_split(job, settings)
    run = _short_run(job, settings, train.take(48), score, batch=16)
    accuracy = run({"fc.*": "full", "*.bias": "full"})
    assert 0.0 <= accuracy <= 1.0
    for k, v in job.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_short_run_scored_by_loss_returns_minus_the_held_back_cross_entropy(tmp_path, monkeypatch):
    import edgetune.apps.finetune
    import edgetune.apps.search
    from edgetune.apps.finetune import evaluate

    job = build_job("resnet", "digits", size=16, train_limit=200)
    by_loss = SearchSettings(batch=16, steps=3, score_items=50, lr=0.05, score="loss")
    train, score = _scoring_split(job, by_loss)
    # The trained model's metrics on the scoring items, kept as the run computes them.
    scored = []
    monkeypatch.setattr(edgetune.apps.finetune, "evaluate",
                        lambda model, data, prepare, **kw: scored.append(evaluate(model, data, prepare, **kw)) or scored[-1])
    loss_run = _short_run(job, by_loss, train.take(48), score, batch=16)({"fc.*": "full", "*.bias": "full"})
    assert len(score) == 50 and loss_run == -scored[-1].loss and loss_run < 0
    assert len(scored) == 1  # the epoch's end evaluation is the score: the items are run through once
    # Loss scores are cached apart from accuracies, and the log names what they are.
    seen = {}

    def one_candidate(space, evaluate, cache, context, progress):
        seen["context"], seen["metric"] = context, space.metric
        return "gains"

    monkeypatch.setattr(edgetune.apps.search, "contributions", one_candidate)
    measure_contributions(job, by_loss, log=lambda line: None)
    assert seen["context"].endswith("50 scored by minus the loss | seed 0") and seen["metric"].startswith("score")
    with pytest.raises(ValueError, match="unknown contribution score 'f1'"):
        measure_contributions(job, SearchSettings(score="f1"))


def test_a_short_runs_score_depends_on_its_scheme_and_seed_not_on_the_runs_before_it():
    job = build_job("resnet", "digits", size=16, train_limit=200)  # augmented: its generator draws
    settings = SearchSettings(batch=16, steps=3, score_items=50, lr=0.05, score="loss")
    train, score = _scoring_split(job, settings)
    run = _short_run(job, settings, train.take(48), score, batch=16)
    augment = job.prepare.generators["augment"]
    states = (augment.get_state(), torch.get_rng_state())
    biases, lora = {"fc.*": "full", "*.bias": "full"}, {"fc.bias": "full", "fc.weight": {"lora": 4}}
    alone = run(lora)
    after_another = (run(biases), run(lora))[1]
    assert after_another == alone  # its augmentation drawn the same way
    assert torch.equal(augment.get_state(), states[0]) and torch.equal(torch.get_rng_state(), states[1])
    other_seed = _short_run(job, SearchSettings(**{**settings.__dict__, "seed": 1}), train.take(48), score, batch=16)
    assert other_seed(lora) != alone


def test_a_batch_larger_than_the_training_split_is_a_clear_error_not_stop_iteration(tmp_path):
    job = build_job("resnet", str(_image_folder(tmp_path, layout_split=True)), size=16)
    with pytest.raises(ValueError, match="a batch of 32 needs that many training items, and there are 12"):
        job.example(32)


def test_one_class_or_a_class_with_no_training_item_is_refused(tmp_path):
    folder = _image_folder(tmp_path, layout_split=False)
    for f in (folder / "dogs").iterdir():
        f.unlink()
    (folder / "dogs").rmdir()
    with pytest.raises(ValueError, match="single class .*at least two"):
        build_job("resnet", str(folder), size=16)
    (folder / "dogs").mkdir()
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(folder / "dogs" / "only.png")
    # 7 items at 0.5 hold out 4: 3.43 of cats and 0.57 of dogs, rounded by largest remainder to 3 and 1,
    # so the only dog is held out.
    with pytest.raises(ValueError, match=r"\['dogs'\] .* no training item"):
        build_job("resnet", str(folder), size=16, val_fraction=0.5)


def test_an_image_size_the_model_cannot_take_is_named(tmp_path):
    folder = str(_image_folder(tmp_path, layout_split=False))
    with pytest.raises(ValueError, match="cannot take images 2x2 .*larger --size"):
        build_job("vit", folder, size=2)
    (x,), _ = build_job("vit", folder, size=48).example(2)  # a ViT is built for the side it is given
    assert x.shape == (2, 3, 48, 48)


def test_the_search_needs_two_training_items_to_score_on(tmp_path):
    job = build_job("resnet", str(_image_folder(tmp_path, layout_split=False)), size=16)
    job.train = job.train.take(1)
    with pytest.raises(ValueError, match="at least 2 training items"):
        _scoring_split(job, SearchSettings())


def test_the_search_clips_its_batch_to_the_items_left_for_its_short_runs(tmp_path, monkeypatch):
    import edgetune.apps.search

    job = build_job("resnet", str(_image_folder(tmp_path, layout_split=False)), size=16)
    seen = {}

    def one_candidate(space, evaluate, cache, context, progress):  # one short run instead of all of them
        seen["context"], seen["accuracy"] = context, evaluate({"fc.*": "full", "*.bias": "full"})
        return "gains"

    monkeypatch.setattr(edgetune.apps.search, "contributions", one_candidate)
    said = []
    assert measure_contributions(job, SearchSettings(batch=32, steps=1), log=said.append)[1] == "gains"
    # 10 training items: 5 score the candidates, the short runs train on the other 5.
    assert "note: only 5 training items left for the search's short runs, so the batch is 5 instead of 32" in said
    assert "| batch 5 |" in seen["context"] and 0 <= seen["accuracy"] <= 1


def test_a_search_with_two_seeds_averages_their_contributions_and_caches_each_like_a_one_seed_search(
        tmp_path, monkeypatch):
    import edgetune.apps.lm_search
    import edgetune.apps.search
    from edgetune.apps.search import Contributions

    job = build_job("resnet", str(_image_folder(tmp_path, layout_split=False)), size=16)
    contexts = []

    def per_seed(space, evaluate, cache, context, progress):  # a made-up gain per seed, no short runs
        contexts.append(context)
        seed = int(context.rsplit("seed ", 1)[1])
        return Contributions(0.5, {0: 0.0, 1: 0.1 * (seed + 1)}, {"fc.weight": {1.0: 0.2 + 0.1 * seed}})

    monkeypatch.setattr(edgetune.apps.search, "contributions", per_seed)
    monkeypatch.setattr(edgetune.apps.lm_search, "contributions", per_seed)
    said = []
    gains = measure_contributions(job, SearchSettings(batch=4, steps=1, seed=3, seeds=2), log=said.append)[1]
    assert [c.rsplit("| ", 1)[1] for c in contexts] == ["seed 3", "seed 4"]
    assert gains.bias[1] == pytest.approx((0.4 + 0.5) / 2) and gains.weight["fc.weight"][1.0] == pytest.approx(0.55)
    assert any(line.startswith("contributions over seeds [3, 4]: median |gain|") for line in said)
    one_seed = measure_contributions(job, SearchSettings(batch=4, steps=1, seed=3), log=said.append)[1]
    assert contexts[-1] == contexts[0]  # seed 3 alone reads the same cache entry
    assert one_seed.bias[1] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="at least one seed"):
        measure_contributions(job, SearchSettings(seeds=0))
