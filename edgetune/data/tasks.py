"""Short instructions with known answers, made here from a seed (nothing comes from a hub): a
task measure for a chat model beside its loss, by exact match of its greedy answers.

Eight kinds, each answered by one number, letter or word: sums and differences of small
numbers, the larger of two numbers, the letter after a letter, a word in capitals, a word
spelt backwards, the letters in a word, and the capital of a well-known country. They test
whether fine-tuning keeps (or improves) following an instruction and answering it, which
the loss on chats does not show. Two scores: exact (the reply's first line is the answer) and
contained (the reply says the answer as a word of its own, and none of the question's
distractors, e.g. the smaller number of "which is larger"): a small chat model seldom answers
with the answer alone (SmolLM2-135M-Instruct: "The capital of Canada is Ottawa.").
"""
from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

WORDS = ("apple", "river", "garden", "window", "planet", "silver", "forest", "candle", "rocket", "pencil",
         "bridge", "castle", "dragon", "summer", "orange", "basket", "guitar", "island", "marble", "jacket",
         "tiger", "cloud", "bread", "chair", "stone", "music", "light", "ocean", "green", "sugar")
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Germany": "Berlin", "Spain": "Madrid",
            "Egypt": "Cairo", "Canada": "Ottawa", "Russia": "Moscow", "China": "Beijing", "Greece": "Athens",
            "Portugal": "Lisbon", "Norway": "Oslo", "Sweden": "Stockholm", "Poland": "Warsaw", "Ireland": "Dublin",
            "Austria": "Vienna", "Kenya": "Nairobi", "Peru": "Lima", "Thailand": "Bangkok", "Cuba": "Havana"}


@dataclass(frozen=True)
class Question:
    prompt: str
    answer: str
    kind: str
    case_sensitive: bool = False
    distractors: tuple[str, ...] = ()  # words a right reply does not say

    def is_answered_by(self, reply: str) -> bool:
        """The reply's first line, without surrounding quotes or a final full stop, is the answer."""
        lines = reply.strip().splitlines()
        got = lines[0].strip().strip("\"'`*").rstrip(".").strip() if lines else ""
        return got == self.answer if self.case_sensitive else got.casefold() == self.answer.casefold()

    def is_said_in(self, reply: str) -> bool:
        """The answer is a word of the reply (not part of a longer word or number), and no distractor is."""
        return self._says(reply, self.answer) and not any(self._says(reply, d) for d in self.distractors)

    def _says(self, reply: str, word: str) -> bool:
        flags = 0 if self.case_sensitive else re.IGNORECASE
        return re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", reply, flags) is not None


def _number_only(text: str) -> str:
    return f"{text} Answer with the number only."


def _kinds(rng: random.Random):
    """(kind, prompt, answer, case-sensitive, distractors) of one question of each kind."""
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    small, large = sorted((a, b + 61))
    word = rng.choice(WORDS)
    letter = rng.choice(string.ascii_uppercase[:-1])
    country = rng.choice(sorted(CAPITALS))
    return [
        ("sum", _number_only(f"What is {a} plus {b}?"), str(a + b), False, ()),
        ("difference", _number_only(f"What is {max(a, b)} minus {min(a, b)}?"), str(abs(a - b)), False, ()),
        ("larger", _number_only(f"Which is larger, {a} or {b + 61}?"), str(large), False, (str(small),)),
        ("next letter", f"Which letter comes right after {letter} in the English alphabet? Answer with the letter only.",
         chr(ord(letter) + 1), True, ()),
        ("capitals", f"Write the word \"{word}\" in capital letters. Answer with that word only.", word.upper(), True,
         ()),
        ("backwards", f"Spell the word \"{word}\" backwards. Answer with the reversed word only.", word[::-1], False,
         ()),
        ("letters", _number_only(f"How many letters are in the word \"{word}\"?"), str(len(word)), False, ()),
        ("capital city", f"What is the capital of {country}? Answer with the city's name only.", CAPITALS[country],
         False, ()),
    ]


def instruction_questions(n: int = 80, seed: int = 0) -> list[Question]:
    """`n` questions, the kinds taking turns, drawn from `seed`: the same list for the same arguments."""
    if n < 1:
        raise ValueError(f"ask at least one question, got n={n}")
    rng, out = random.Random(seed), []
    while len(out) < n:
        out += [Question(prompt, answer, kind, case, distractors) for kind, prompt, answer, case, distractors in _kinds(rng)]
    return out[:n]
