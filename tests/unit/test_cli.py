import json

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


def test_demo_runs_end_to_end(capsys):
    assert main(["demo", "--epochs", "1", "--size", "16", "--batch", "128"]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and "trainable parameters" in out
