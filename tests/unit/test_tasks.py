"""Task measures of a language model beside its loss: next-token accuracy on held-out answers,
and replies to the packaged questions with known answers (edgetune.data.tasks)."""
import json
import os
import re

import pytest
import torch

from edgetune.apps.lm import lm_metrics, load_lm
from edgetune.cli import main
from edgetune.data.chat import IGNORE, tokenize_records
from edgetune.data.tasks import Question, instruction_questions

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_the_questions_are_seeded_take_turns_and_their_answers_are_right():
    questions = instruction_questions(24, seed=3)
    assert questions == instruction_questions(24, seed=3) and questions != instruction_questions(24, seed=4)
    assert [q.kind for q in questions[:8]] == ["sum", "difference", "larger", "next letter", "capitals", "backwards",
                                               "letters", "capital city"]
    for q in questions:
        numbers = [int(n) for n in re.findall(r"\d+", q.prompt)]
        word = re.search(r'"(\w+)"', q.prompt)
        expected = {"sum": lambda: str(sum(numbers)), "difference": lambda: str(numbers[0] - numbers[1]),
                    "larger": lambda: str(max(numbers)), "capitals": lambda: word.group(1).upper(),
                    "backwards": lambda: word.group(1)[::-1], "letters": lambda: str(len(word.group(1))),
                    "next letter": lambda: chr(ord(re.search(r"after ([A-Z])", q.prompt).group(1)) + 1)}
        if q.kind in expected:
            assert q.answer == expected[q.kind](), q
    with pytest.raises(ValueError, match="at least one question"):
        instruction_questions(0)


def test_a_reply_is_scored_exactly_and_by_what_it_says():
    larger = Question("Which is larger, 18 or 95?", "95", "larger", distractors=("18",))
    assert larger.is_answered_by(" 95.\nBecause...") and larger.is_said_in("It is 95")
    assert not larger.is_said_in("18 is 95.")  # says the distractor too
    assert not larger.is_said_in("It is 950") and not larger.is_answered_by("The answer is 95")
    city = Question("What is the capital of Canada?", "Ottawa", "capital city")
    assert city.is_said_in("The capital of Canada is Ottawa.") and city.is_answered_by('"ottawa"')
    capitals = Question('Write "stone" in capital letters.', "STONE", "capitals", case_sensitive=True)
    assert capitals.is_answered_by("STONE") and not capitals.is_answered_by("stone")
    assert not capitals.is_said_in("the word stone")


def test_token_accuracy_counts_the_learned_tokens_the_model_predicts_first():
    lm = load_lm("tiny-llama")
    chats = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "abc" * (i + 1)}] for i in range(5)]
    data = tokenize_records(chats, lm.tokenizer, seq_len=30)
    got = lm_metrics(lm.model, data, batch_size=2)
    hits = count = 0
    with torch.no_grad():
        for ids, mask, labels in data.batches(5):
            predicted = lm.model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(-1)
            learned = labels[:, 1:] != IGNORE
            hits += int((predicted == labels[:, 1:])[learned].sum())
            count += int(learned.sum())
    assert count > 0 and got["token_accuracy"] == pytest.approx(hits / count)


def test_finetune_lm_scores_the_packaged_questions_before_and_after(tmp_path, capsys):
    chats = tmp_path / "c.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                      {"role": "assistant", "content": "abc"}]}) + "\n"
                             for i in range(12)))
    out = tmp_path / "run"
    assert main(["finetune-lm", "--model", "tiny-llama", "--data", str(chats), "--scheme", "norms", "--steps", "2",
                 "--batch", "4", "--seq-len", "32", "--qa-eval", "8", "--no-progress", "--out", str(out)]) == 0
    assert "8 packaged questions" in capsys.readouterr().out
    answers = json.loads((out / "answers.json").read_text())
    questions = instruction_questions(8)
    assert [q["answer"] for q in answers["questions"]] == [q.answer for q in questions]
    for when in ("before", "after"):
        said = [q.is_said_in(a[when]) for q, a in zip(questions, answers["questions"])]
        assert answers[when]["contained"] == pytest.approx(sum(said) / len(said))
    history = json.loads((out / "history.json").read_text())
    assert 0 <= history["evals"][-1]["token_accuracy"] <= 1
