"""The CLI on tiny, odd and empty inputs: a run that can work runs (the batch clipped to the
data, said in one line); one that cannot ends in one `edgetune: error:` line and exit 2."""
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from edgetune.cli import main

FAST = ["--model", "resnet", "--size", "16", "--epochs", "1", "--no-progress"]


def image_folder(root, counts: dict[str, int]):
    """Class folders of small PNGs in varied sizes and modes (grey, RGBA, palette, RGB)."""
    modes = ("L", "RGBA", "P", "RGB")
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            mode, size = modes[i % 4], (5 + 7 * i, 9 + 3 * c)
            Image.fromarray(np.full((size[1], size[0], 3), 40 + 90 * c + i, np.uint8)).convert(mode) \
                .save(root / name / f"{i}.png")
    return str(root)


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgetune: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def few_shot(tmp_path_factory):
    """The issue's case: 24 images in two classes, so 19 train, under the default batch of 32."""
    return image_folder(tmp_path_factory.mktemp("few-shot"), {"cats": 12, "dogs": 12})


def test_a_batch_larger_than_the_training_split_is_clipped_and_said(few_shot, tmp_path, capsys):
    assert main(["finetune", *FAST, "--data", few_shot, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "only 19 training items, so the batch is 19 instead of 32" in out
    assert "(19 train / 5 held-out" in out
    assert (tmp_path / "model.safetensors").exists()
    assert len(json.loads((tmp_path / "history.json").read_text())["losses"]) == 1  # one full batch of 19


@pytest.mark.parametrize("counts, message", [
    ({}, "has no class sub-folders"),
    ({"cats": 0, "dogs": 0}, "no images"),
    ({"cats": 6}, r"holds a single class \(\['cats'\]\): a classifier needs at least two"),
    ({"cats": 1, "dogs": 1}, r"class\(es\) \['cats'\] .* have no training item .*at least 2 items"),
])
def test_folders_that_cannot_train_are_one_line_errors(tmp_path, capsys, counts, message):
    data = image_folder(tmp_path / "data", counts) if counts else str(tmp_path)
    assert main(["finetune", *FAST, "--data", data]) == 2
    assert re.search(message, error_line(capsys))


def test_an_undecodable_image_is_named_with_strict(tmp_path, capsys):
    data = image_folder(tmp_path, {"cats": 2, "dogs": 2})
    (tmp_path / "cats" / "broken.png").write_bytes(b"not a png")
    assert main(["finetune", *FAST, "--data", data, "--strict"]) == 2
    assert "cannot read image" in (line := error_line(capsys)) and "broken.png" in line and "remove" in line


def test_hidden_files_beside_images_are_skipped(tmp_path, capsys):
    data = image_folder(tmp_path, {"cats": 3, "dogs": 3})
    (tmp_path / "cats" / "._0.png").write_bytes(b"macOS metadata, not an image")
    assert main(["finetune", *FAST, "--data", data, "--batch", "4", "--out", str(tmp_path / "run")]) == 0
    assert "(5 train / 1 held-out" in capsys.readouterr().out


@pytest.mark.parametrize("name, content, message", [
    ("empty.csv", "text,label\n", "no rows after the header"),
    ("columns.csv", "a,b\nx,1\n", r"no column\(s\) \['text', 'label'\]; the header has \['a', 'b'\]"),
    ("blank.csv", "", "the file is empty"),
    ("latin1.csv", "text,label\ncaf\xe9,1\n".encode("latin-1"), "not UTF-8"),
    ("nothing.npz", dict(a=np.zeros(3)), r"needs arrays 'x' and 'y'"),
    ("none.npz", dict(x=np.zeros((0, 8, 8), np.uint8), y=np.zeros(0, np.int64)), "holds no images"),
    ("fake.npz", b"not a zip", "not a readable .npz file"),
])
def test_files_that_cannot_train_are_one_line_errors(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if isinstance(content, dict):
        np.savez(path, **content)
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    model = "bert-tiny" if name.endswith(".csv") else "resnet"
    assert main(["finetune", *FAST, "--model", model, "--data", str(path)]) == 2
    assert re.search(message, error_line(capsys))


@pytest.mark.parametrize("flags, message", [
    (["--data", "no/such/folder"], "unknown data 'no/such/folder' (no such file or folder)"),
    (["--data", "missing.npz"], "unknown data 'missing.npz' (no such file or folder)"),
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--batch", "0"], "--batch must be at least 1, got 0"),
    (["--lr", "-0.1"], "--lr must be positive, got -0.1"),
    (["--size", "0"], "--size must be at least 1, got 0"),
    (["--train-limit", "-1"], "--train-limit must be at least 1, got -1"),
    (["--warmup", "-1"], "--warmup must be at least 0, got -1"),
    (["--model", "vit", "--size", "2"], "the model cannot take images 2x2"),
    (["--scheme", "last:x"], "last:K needs a whole number K"),
    (["--scheme", "auto", "--budget", "64MB", "--search-ratios", "0,2"], "--search-ratios takes channel ratios"),
    (["--scheme", "auto", "--budget", "64MB", "--search-ratios", "0"], "at least one above 0"),
    (["--scheme", "full", "--budget", "1KB"], "over the memory budget of 1.0 KB"),
])
def test_finetune_flags_that_cannot_work_are_one_line_errors(few_shot, tmp_path, capsys, flags, message):
    argv = ["finetune", *FAST, "--data", few_shot, *flags]
    assert main(argv) == 2
    assert message in error_line(capsys)


def test_val_data_with_other_classes_is_refused(few_shot, tmp_path, capsys):
    other = image_folder(tmp_path, {"cats": 2, "birds": 2})
    assert main(["finetune", *FAST, "--data", few_shot, "--val-data", other]) == 2
    assert "must have the same classes" in error_line(capsys)


@pytest.mark.parametrize("flags, message", [
    (["--batch", "0"], "--batch must be at least 1"),
    (["--size", "-3"], "--size must be at least 1"),
    (["--classes", "0"], "--classes must be at least 1"),
    (["--model", "alexnet"], "unknown model 'alexnet'; plan takes a built-in model"),
    (["--model", "vit", "--size", "2"], "the model cannot take inputs of size 2"),
])
def test_plan_flags_that_cannot_work_are_one_line_errors(capsys, flags, message):
    assert main(["plan", "--model", "resnet", "--size", "16", "--batch", "2", *flags]) == 2
    assert message in error_line(capsys)


def test_a_scheme_file_that_is_not_a_json_object_is_named(tmp_path, capsys):
    for text in ('{"fc.*": "full"}\n{"x": 1}\n', '["fc.*"]', '{"tte": {"n_bias": 3}}'):
        path = tmp_path / "scheme.json"
        path.write_text(text)
        assert main(["plan", "--model", "resnet", "--size", "16", "--batch", "2", "--scheme", str(path)]) == 2
        assert f"scheme file {path}" in error_line(capsys)


def test_demo_clips_its_batch_to_a_small_train_limit(tmp_path, capsys):
    assert main(["demo", "--epochs", "1", "--size", "32", "--batch", "64", "--train-limit", "20", "--val-limit", "10",
                 "--no-compare", "--out", str(tmp_path)]) == 0
    assert "only 20 training items, so the batch is 20 instead of 64" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "model.safetensors")
