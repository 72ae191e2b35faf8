"""A question's prediction from a confidence read without logprobs: the distribution and what the record keeps.

- **One answer with a confidence** (verbalized, P(True)): the chosen option gets the confidence ``c``, the
  other ``K - 1`` options share ``1 - c`` equally.  So ``conf`` is ``c`` whenever ``c >= 1/K``; a confidence
  below chance (the model doubts its own answer more than a guess) makes every other option more likely,
  and the prediction becomes the first of them; at exactly ``1/K`` every option ties and the prediction is
  option A.  Both are flagged (``below_chance`` in the record and the run's block: ``c <= 1/K``), since the
  prediction is then not the letter the model named.
- **Votes** (consistency): each option's share of the samples that named an option; options nobody chose
  have probability exactly 0 (``Prediction.from_probs``).
- **Unparseable** (after ``--max-parse-retries``): the uniform distribution ``1/K`` (no information, so
  ``conf`` is ``1/K`` and the prediction is option A by the argmax's first-index rule), the record's
  ``parse.status`` is ``unparseable`` with the last reason, and the run counts it; never left out, never
  given a confidence the model did not state.
"""
from __future__ import annotations

from typing import Any

from ..data.schema import LETTERS, Question
from ..predictions import Prediction
from .ask import Tally


def stated_distribution(k: int, choice: int, c: float) -> list[float]:
    rest = (1.0 - c) / (k - 1)
    return [c if j == choice else rest for j in range(k)]


def vote_distribution(k: int, votes: list[int]) -> list[float]:
    counts = [0] * k
    for j in votes:
        counts[j] += 1
    return [n / len(votes) for n in counts]


def uniform(k: int) -> list[float]:
    return [1.0 / k] * k


def parse_doc(tally: Tally, reason: str | None, stage: str | None = None) -> dict:
    """The record's ``parse``: ``ok`` or ``unparseable`` (with the last reason and the stage that failed)."""
    doc: dict[str, Any] = {"status": "ok" if reason is None else "unparseable", "retries": tally.retries,
                           "reasons": list(tally.reasons)}
    if reason is not None:
        doc["reason"] = reason
        if stage:
            doc["stage"] = stage
    return doc


def make_prediction(q: Question, source: str, probs: list[float], tally: Tally, parse: dict,
                    **fields: Any) -> Prediction:
    """The prediction with its extras in a fixed order (a resumed run rewrites the same bytes)."""
    extra = {"confidence": source, **fields, "parse": parse, "usage": tally.usage(),
             "responses": list(tally.responses)}
    return Prediction.from_probs(q.id, q.subject, q.answer, probs, extra=extra)


def letter(j: int | None) -> str | None:
    return None if j is None else LETTERS[j]
