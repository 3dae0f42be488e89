import json
import os

import torch

from edgetune.cli import main


def test_plan_prints_the_per_layer_report(capsys):
    assert main(["plan", "--model", "resnet", "--scheme", "bias_only", "--size", "16", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "layer" in out and "predicted peak of one step" in out
    assert "fc " in out and "weight+bias" not in out.split("fc ")[1].splitlines()[0]


def test_plan_reads_a_json_scheme_file(tmp_path, capsys):
    path = tmp_path / "scheme.json"
    path.write_text(json.dumps({"fc.*": "full", "layer4.0.conv2.weight": {"ratio": 0.5, "select": "first"}}))
    assert main(["plan", "--model", "resnet", "--scheme", str(path), "--size", "16", "--batch", "2"]) == 0
    assert "weight@0.5" in capsys.readouterr().out


def test_bad_scheme_is_a_clear_error(capsys):
    assert main(["plan", "--model", "resnet", "--scheme", "{'oops'"]) == 2
    assert "unknown scheme" in capsys.readouterr().err
    assert main(["plan", "--model", "resnet", "--scheme", "no/such/scheme.json"]) == 2
    assert "scheme file no/such/scheme.json does not exist" in capsys.readouterr().err


def test_an_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    for command in (["finetune", "--data", "digits"], ["export"], ["finetune-lm", "--data", "sharegpt"]):
        assert main([*command, "--out", str(taken)]) == 2
        assert f"--out {taken} is a file, and {command[0]} writes a folder there" in capsys.readouterr().err
    assert taken.read_text() == "mine"


def test_ctrl_c_says_how_to_go_on_in_one_line(tmp_path, capsys, monkeypatch):
    import edgetune.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_finetune", interrupted)
    assert main(["finetune", "--data", "digits", "--out", str(tmp_path / "run")]) == 130
    assert capsys.readouterr().err == f"edgetune: interrupted; go on with: edgetune finetune --resume {tmp_path / 'run'}\n"


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--epochs", "1", "--size", "32", "--batch", "16", "--train-limit", "64",
                 "--val-limit", "50", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and "PyTorch eager, the same scheme" in out
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "curves.png").exists()


def test_finetune_writes_a_checkpoint_history_plot_and_reusable_scheme(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["finetune", "--model", "mobilenetv2-imagenet", "--data", "digits", "--size", "32", "--batch", "16",
            "--train-limit", "64", "--val-limit", "40", "--epochs", "1", "--scheme", "mbv2-49kb",
            "--no-progress", "--out", str(out)]
    assert main(args) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    assert {"model.safetensors", "history.json", "curves.png", "scheme.json", "report.txt"} <= set(os.listdir(out))
    scheme = json.loads((out / "scheme.json").read_text())
    assert scheme["classifier.1.weight"] == "full" and any(isinstance(r, dict) for r in scheme.values())
    again = args[:-1] + [str(tmp_path / "again")]
    again[again.index("mbv2-49kb")] = str(out / "scheme.json")
    assert main(again) == 0  # the saved scheme loads as --scheme FILE


def test_finetune_with_adafactor_trains_at_its_own_default_rate(tmp_path, capsys):
    args = ["finetune", "--model", "mobilenetv2-imagenet", "--data", "digits", "--size", "32", "--batch", "16",
            "--train-limit", "32", "--val-limit", "20", "--epochs", "1", "--scheme", "bias_only", "--optimizer",
            "adafactor", "--no-progress", "--out", str(tmp_path)]
    assert main(args) == 0
    history = json.loads((tmp_path / "history.json").read_text())
    assert max(history["lrs"]) == 0.003  # not AdamW's or SGD's default
    from safetensors import safe_open

    with safe_open(str(tmp_path / "checkpoint" / "state.safetensors"), "pt") as checkpoint:
        assert any(key.endswith(":variance") for key in checkpoint.keys())  # the biases' second moments


def test_finetune_rejects_text_data_for_an_image_model(capsys):
    assert main(["finetune", "--model", "mobilenetv2-imagenet", "--data", "rotten-tomatoes"]) == 2
    assert "takes images but data 'rotten-tomatoes' holds text" in capsys.readouterr().err


def test_search_reuses_measured_contributions_and_fits_the_budget(tmp_path, capsys):
    common = ["--model", "resnet", "--data", "digits", "--size", "16", "--batch", "16", "--train-limit", "200",
              "--search-steps", "2", "--search-ratios", "0,1", "--search-cache", str(tmp_path / "cache.json")]
    assert main(["search", *common, "--budget", "64MB", "--out", str(tmp_path / "a.json")]) == 0
    first = capsys.readouterr().out
    # finetune --scheme auto searches the same way, from the same cache, then trains. A tight
    # budget from this machine's own measurement: above the head alone by more than its
    # measurements spread (2.42-2.67 MB in six runs on a quiet machine; CI's load spreads them further).
    head_only = json.loads((tmp_path / "a.search.json").read_text())["history"][-1]["head_only_measured_bytes"]
    run = tmp_path / "run"
    assert main(["finetune", *common, "--scheme", "auto", "--budget", f"{int(head_only * 1.5)}B", "--epochs", "1",
                 "--val-limit", "40", "--no-progress", "--out", str(run)]) == 0
    second = capsys.readouterr().out
    assert "(cached)" not in first and second.count("(cached)") == first.count("accuracy")
    for scheme_file in (tmp_path / "a.json", run / "scheme.json"):  # the run keeps its search's figures beside
        meta = json.loads(scheme_file.with_suffix(".search.json").read_text())
        assert meta["measured_peak_bytes"] <= meta["budget_bytes"]
        trained = json.loads(scheme_file.read_text())  # the run writes each rule as it resolved
        assert trained.get("fc.*", trained.get("fc.weight")) == "full"  # the head always trains
    assert (run / "model.safetensors").exists()


def test_search_score_loss_reaches_the_search_and_its_gain_is_printed_as_a_loss(tmp_path, capsys, monkeypatch):
    import edgetune.apps.jobs
    from edgetune.apps.search import SearchResult

    given = {}

    def found(job, budget_bytes, settings):  # the search's result, without its short runs
        given["score"], given["head"] = settings.score, job.model.fc.weight.detach().clone()
        return SearchResult({"fc.*": "full"}, predicted_gain=0.25, predicted_peak_bytes=2**20,
                            budget_bytes=budget_bytes, measured_peak_bytes=2**21)

    monkeypatch.setattr(edgetune.apps.jobs, "search_job", found)
    common = ["search", "--model", "resnet", "--data", "digits", "--size", "16", "--train-limit", "40",
              "--budget", "64MB", "--out", str(tmp_path / "s.json")]
    assert main([*common, "--search-score", "loss"]) == 0
    assert given["score"] == "loss" and "predicted change -0.2500 in the held-back loss" in capsys.readouterr().out
    first_head = given["head"]
    torch.rand(10)  # whatever this process drew before, a search builds the same model for its seed
    assert main(common) == 0
    assert given["score"] == "accuracy" and "predicted gain +25.00 points" in capsys.readouterr().out
    assert torch.equal(given["head"], first_head)


def test_a_resumed_searched_run_trains_its_scheme_under_the_budget_its_search_fitted(tmp_path):
    import argparse

    from edgetune.apps.search import SearchResult
    from edgetune.cli import _resumed_or_searched_scheme

    args = argparse.Namespace(out=str(tmp_path / "run"))
    searches = []

    def search():
        searches.append(1)
        return SearchResult({"fc.*": "full"}, 0.1, 2**20, budget_bytes=2**22, measured_peak_bytes=2**21,
                            memory_budget=123456)

    assert _resumed_or_searched_scheme(args, False, "4MB", search) == ({"fc.*": "full"}, 123456)
    # resumed: the scheme file and the side file's budget, no search
    assert _resumed_or_searched_scheme(args, True, "4MB", search) == ({"fc.*": "full"}, 123456)
    assert len(searches) == 1
    os.remove(tmp_path / "run" / "scheme.search.json")  # a run from before the side file
    assert _resumed_or_searched_scheme(args, True, "4MB", search)[1] == "4MB" and len(searches) == 1


def test_plan_builds_token_inputs_for_a_text_classifier(capsys):
    assert main(["plan", "--model", "bert-tiny", "--size", "12", "--batch", "2", "--classes", "2",
                 "--scheme", "last:2"]) == 0
    assert "classifier" in capsys.readouterr().out
