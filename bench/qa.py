"""A small bundled QA set scored by normalised match, and its fabrication rate.

Half the questions have short factual answers; the other half have none, and the right
reply is "unknown". The share of those that get an answer anyway is the *fabrication
rate*: a cheap stand-in for PalmBench's hallucination measure, not a replacement for it.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from importlib import resources
from typing import Any

QA_FILE = "qa.json"
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ABSTAIN = ("unknown", "i dont know", "i do not know", "not known", "no answer", "cannot be known",
            "cannot know", "cant know", "impossible to know", "no way to know")


@dataclass(frozen=True)
class QAItem:
    question: str
    answers: tuple[str, ...] | None  # None: no answer exists, "unknown" is right


@dataclass(frozen=True)
class QAScore:
    answerable: int
    correct: int
    unanswerable: int
    abstained: int  # said "unknown" where that was right
    fabricated: int  # answered where "unknown" was right

    @property
    def accuracy(self) -> float:
        """Right answers plus right abstentions, over all questions."""
        total = self.answerable + self.unanswerable
        return (self.correct + self.abstained) / total if total else 0.0

    @property
    def fabrication_rate(self) -> float:
        return self.fabricated / self.unanswerable if self.unanswerable else 0.0


def load_items(data: dict[str, Any] | None = None) -> tuple[str, list[QAItem]]:
    """(instruction, items) from the bundled set, or from ``data`` in the same shape."""
    if data is None:
        data = json.loads(resources.files("bench").joinpath("data", QA_FILE).read_text(encoding="utf-8"))
    items = [QAItem(d["q"], tuple(d["answers"]) if d.get("answers") else None) for d in data["items"]]
    return data["instruction"], items


def normalise(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's normalisation)."""
    text = text.lower().replace("’", "'").replace("'", "")
    text = text.translate(str.maketrans({c: " " for c in string.punctuation}))
    return " ".join(_ARTICLES.sub(" ", text).split())


def abstains(answer: str) -> bool:
    norm = normalise(answer)
    return any(phrase in norm for phrase in _ABSTAIN)


def is_correct(answer: str, references: tuple[str, ...]) -> bool:
    """Exact normalised match, or a reference as whole words inside a short answer."""
    norm = normalise(answer)
    if abstains(answer):
        return False
    padded = f" {norm} "
    return any(norm == normalise(r) or f" {normalise(r)} " in padded for r in references)


def score(items: list[QAItem], answers: list[str]) -> QAScore:
    if len(items) != len(answers):
        raise ValueError(f"{len(answers)} answers for {len(items)} questions")
    correct = fabricated = abstained = answerable = 0
    for item, answer in zip(items, answers):
        if item.answers is None:
            if abstains(answer):
                abstained += 1
            else:
                fabricated += 1
        else:
            answerable += 1
            correct += is_correct(answer, item.answers)
    return QAScore(answerable, correct, len(items) - answerable, abstained, fabricated)
