"""The MCQ schema (docs/reference.md, "Data schema"): one frozen dataclass per question."""
from __future__ import annotations

import string
from dataclasses import dataclass

LETTERS = string.ascii_uppercase  # A..Z: at most 26 options
MIN_CHOICES = 2
MAX_CHOICES = 26


@dataclass(frozen=True)
class Question:
    """One multiple-choice question. ``answer`` indexes ``choices``; letters follow choice order."""

    id: str
    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str | None = None
    explanation: str | None = None

    @property
    def k(self) -> int:
        return len(self.choices)

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]

    def to_dict(self) -> dict:
        d = {
            "id": self.id,
            "question": self.question,
            "choices": list(self.choices),
            "answer": self.answer,
        }
        if self.subject is not None:
            d["subject"] = self.subject
        if self.explanation is not None:
            d["explanation"] = self.explanation
        return d
