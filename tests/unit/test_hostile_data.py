"""Hostile data (issue 13, item 3): each bad input gives one line naming the file, line, field
or value and what to do, and changes nothing. An image folder's unreadable and non-image files
are skipped and counted once by default, and stop the load with strict=True (CLI --strict)."""
import re

import numpy as np
import pytest
from PIL import Image

import edgetune.data.images as images
from edgetune.apps.jobs import build_job
from edgetune.apps.lm import tiny_chat_tokenizer
from edgetune.cli import main
from edgetune.data import load_data, load_image_folder, load_text_csv
from edgetune.data.chat import load_lm_data


def png(path, shade=100, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (shade, shade, shade)).save(path)


def truncated_png(path):
    """A PNG cut off in its pixel data (noise does not compress, so the header stays whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.effect_noise((64, 64), 60).save(path)
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])


# Each kind of bad file in a class folder, and what its message says about it.
BAD_FILES = {
    "notes.txt": (lambda p: p.write_text("labels are the folder names"), r"not an image file \(suffix '\.txt'\)"),
    "empty.jpg": (lambda p: p.write_bytes(b""), r"empty file \(0 bytes\)"),
    "half.png": (truncated_png, "truncated"),
    "text.png": (lambda p: p.write_bytes(b"<html>not found</html>"), "not a known image format"),
}


def two_classes(root, per_class=2):
    for c in ("cat", "dog"):
        for i in range(per_class):
            png(root / c / f"{i}.png", shade=40 + 100 * (c == "dog"))
    return root


def snapshot(root):
    """Every file under root and its bytes: a failed or skipping load must change none."""
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- image folders ---------------------------------------------------------------------------

def test_bad_files_are_skipped_counted_once_and_left_in_place(tmp_path):
    root = two_classes(tmp_path)
    for name, (write, _) in BAD_FILES.items():
        write(root / "dog" / name)
    before, lines = snapshot(root), []
    data = load_image_folder(root, size=8, log=lines.append)
    assert len(data) == 4 and data.labels.tolist() == [0, 0, 1, 1]
    assert len(lines) == 1, lines
    # Sorted order: dog/empty.jpg is the first bad file.
    assert lines[0].startswith(f"skipped 4 unreadable or non-image file(s) in {root} "
                               f"(first: {root / 'dog' / 'empty.jpg'}: empty file (0 bytes))")
    assert lines[0].endswith("use --strict to stop on them")
    assert snapshot(root) == before


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_strict_stops_on_a_bad_file_and_names_it(tmp_path, name):
    root = two_classes(tmp_path)
    write, reason = BAD_FILES[name]
    write(root / "cat" / name)
    before = snapshot(root)
    with pytest.raises(ValueError) as err:
        load_image_folder(root, size=8, strict=True, log=pytest.fail)
    message = str(err.value)
    assert str(root / "cat" / name) in message and re.search(reason, message)
    assert ("move it out of the class folder" if name.endswith(".txt") else "remove or replace the file") in message
    assert "\n" not in message and snapshot(root) == before


def test_operating_system_files_are_ignored_even_when_strict(tmp_path):
    root = two_classes(tmp_path)
    for name in (".DS_Store", "._0.png", "Thumbs.db", "desktop.ini"):
        (root / "cat" / name).write_bytes(b"\x00\x05\x16\x07 bookkeeping")
    assert len(load_image_folder(root, size=8, strict=True, log=pytest.fail)) == 4


def test_each_image_is_decoded_once(tmp_path, monkeypatch):
    root = two_classes(tmp_path)
    truncated_png(root / "cat" / "half.png")
    reads = []

    def counted(file, size):
        reads.append(file.name)
        return read(file, size)

    read = images._read_image
    monkeypatch.setattr(images, "_read_image", counted)
    load_image_folder(root, size=8, log=lambda line: None)
    assert sorted(reads) == ["0.png", "0.png", "1.png", "1.png", "half.png"]


def test_a_folder_of_only_bad_files_says_so(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    (tmp_path / "cat" / "a.jpg").write_bytes(b"")
    (tmp_path / "dog" / "readme.md").write_text("#")
    with pytest.raises(ValueError, match=r"no images \(.*\) in the class folders of .*, only 2 skipped file\(s\) "
                                         r"\(first: .*a\.jpg: empty file \(0 bytes\)\): add images"):
        load_image_folder(tmp_path, size=8, log=pytest.fail)


def test_an_unreadable_held_out_split_names_the_split(tmp_path):
    two_classes(tmp_path / "train")
    (tmp_path / "val" / "cat").mkdir(parents=True)
    truncated_png(tmp_path / "val" / "cat" / "x.png")
    with pytest.raises(ValueError, match=r"class folders of .*val \(the 'test' split\), only 1 skipped"):
        load_data(str(tmp_path), split="test")


@pytest.mark.parametrize("layout", ["flat", "split"])
def test_a_class_with_no_item_at_all_is_named_before_any_split(tmp_path, layout):
    root = two_classes(tmp_path / "train" if layout == "split" else tmp_path)
    if layout == "split":
        two_classes(tmp_path / "val")
    for f in (root / "dog").iterdir():
        f.write_bytes(b"")  # every dog unreadable: the class is empty once they are skipped
    with pytest.raises(ValueError, match=r"class\(es\) \['dog'\] of .* have no items at all .*add items"):
        build_job("resnet", str(tmp_path), size=8)


# -- the command line ------------------------------------------------------------------------

def test_cli_strict_stops_before_anything_is_written(tmp_path, capsys):
    root = two_classes(tmp_path / "data", per_class=3)
    (root / "cat" / "notes.txt").write_text("not an image")
    argv = ["finetune", "--model", "resnet", "--size", "16", "--epochs", "1", "--no-progress", "--batch", "4",
            "--data", str(root), "--strict", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{root / 'cat' / 'notes.txt'}: not an image file" in err[0] and "--strict" in err[0]
    assert not (tmp_path / "run").exists()


def test_a_job_reports_skipped_files_once_and_trains_on_the_rest(tmp_path, capsys):
    root = two_classes(tmp_path, per_class=3)
    (root / "cat" / "notes.txt").write_text("not an image")
    job = build_job("resnet", str(root), size=16, val_fraction=0.5)
    assert len(job.train) + len(job.val) == 6
    assert capsys.readouterr().out.count("skipped 1 unreadable or non-image file(s)") == 1


# -- CSV files -------------------------------------------------------------------------------

@pytest.mark.parametrize("rows, message", [
    ("a,0\nb,1\nc,-1\n", r"line 4: label -1 is negative; integer labels are class indices 0\.\.K-1"),
    ("a,0\nb,1\nc,7\nd,0\n", r"line 4: label 7, but no row has label 2 \(5 of 0\.\.7 have none\); .*without gaps"),
    ("a,0\nb,1\nc,99999999999\n", r"line 4: label 99999999999, but no row has label 2"),  # no range(10**11) built
    ("a,0\nb,1\nc,pos\n", r"line 4: label 'pos' is a name but most labels are integers; write every label"),
    ("a,pos\nb,neg\nc,1\n", r"line 4: label '1' is an integer but most labels are class names"),
    ("a,pos\ntext,label\nb,neg\n", r"line 3 repeats the header \(files joined\?\): remove it"),
    ('"two\nlines",0\nb,1\n\nc,x\n', r"line 6: label 'x' is a name"),  # lines counted as in the file
    ("a,0\n\nb,\n", r"empty 'label' on line\(s\) \[4\]"),
])
def test_csv_labels_that_cannot_be_classes_are_named_by_line(tmp_path, rows, message):
    path = tmp_path / "data.csv"
    path.write_text("text,label\n" + rows)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}.*{message}"):
        load_text_csv(path)


def test_held_out_csv_is_read_against_the_training_classes(tmp_path):
    train, val = tmp_path / "train.csv", tmp_path / "val.csv"
    train.write_text("text,label\ngood,pos\nbad,neg\nfine,pos\nawful,neg\n")
    val.write_text("text,label\nnice,pos\nmeh,neutral\n")
    with pytest.raises(ValueError, match=r"val\.csv line 3: label 'neutral' is not a class of the training data "
                                         r"\(neg, pos\); fix the label or drop the row"):
        build_job("bert-tiny", str(train), val_data=str(val))
    val.write_text("text,label\nnice,pos\n")  # a held-out file may lack a class
    held = load_data(str(val), classes=["neg", "pos"])
    assert held.classes == ["neg", "pos"] and held.labels.tolist() == [1]


def test_an_npz_label_far_above_its_items_is_named_without_building_its_classes(tmp_path):
    path = tmp_path / "typo.npz"
    np.savez(path, x=np.zeros((3, 4, 4), np.uint8), y=np.array([0, 1, 10**12]))
    with pytest.raises(ValueError, match=r"typo\.npz: label 1000000000000 at index 2, but 3 items cannot fill"):
        load_data(str(path))


# -- language-model data ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return tiny_chat_tokenizer()


@pytest.mark.parametrize("record, message", [
    ('{"text": 5}', "line 2: field 'text' must be a string, got int"),
    ('{"messages": []}', "line 2: field 'messages' must be a non-empty list of turns"),
    ('{"messages": [{"content": "hi"}]}', "line 2 turn 1: a turn needs a role (system, user, human, assistant, gpt, "
     "chatgpt, bing, bard); found no 'role' (or 'from') field"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}',
     "line 2 turn 2: a turn needs a text content; found no 'content' (or 'value') field"),
    ('{"conversations": [{"from": "human", "value": ["x"]}]}', "line 2 turn 1: a turn needs a text content; found a list"),
    ('{"messages": ["hi"]}', "line 2 turn 1: a turn must be an object"),
    ('{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}',
     "line 2: a conversation must open with a system or user turn"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "line 2: a conversation without an assistant turn"),
])
def test_jsonl_records_name_the_line_and_the_field(tok, tmp_path, record, message):
    path = tmp_path / "chats.jsonl"
    path.write_text('{"text": "fine"}\n' + record + "\n")
    with pytest.raises(ValueError) as err:
        load_lm_data(str(path), tok, seq_len=16)
    assert str(err.value).startswith(f"{path} ") and message in str(err.value)


@pytest.mark.parametrize("name, content, message", [
    ("latin1.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1"), "not UTF-8 text (invalid continuation byte at byte 13)"),
    ("latin1.txt", "caf\xe9 au lait\n".encode("latin-1"), "not UTF-8 text"),
    ("broken.json", b'[{"text": "a"},\n {"text": }]', "is not JSON (Expecting value at line 2 column 11)"),
])
def test_lm_files_that_cannot_be_read_are_named(tok, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        load_lm_data(str(path), tok, seq_len=16)
    assert str(err.value).startswith(str(path)) and message in str(err.value)
