"""Few-shot examples (docs/reference.md#fewshot): N worked examples per subject from the ``train`` split.

The pool is the named ``train`` split of the same dataset (``splits.SPLITS``,
keyed by the same seed as ``--split``), taken before ``--limit``, so with
``--split test`` (or ``calib``) no example is ever one of the evaluated
questions.  For a question of subject s, the candidates are the pool's
questions of subject s (the same string; questions without a subject share one
pool), ranked by ``H(f"fewshot:{seed}", id)`` ascending (``splits.hash_unit``),
and its examples are the first N of them in that order, the question itself
left out.  So every question of a subject sees the same N examples in the same
order (the questions share one prompt prefix), except the evaluated questions
that are themselves among those N (only possible with ``--split train`` or
``all``): each of these takes the next candidate instead of itself.

The ranking depends on ids and the seed only: the same examples whatever else
is loaded, in whatever order.
"""
from __future__ import annotations

from typing import Annotated, Iterable, Sequence

from pydantic import Field

from ..errors import LlmcalError
from ..validation import Int, says, validated
from .schema import Question
from .splits import hash_unit

MAX_FEWSHOT = 64
NumFewshot = Annotated[Int, Field(ge=0, le=MAX_FEWSHOT), says(f"an integer from 0 to {MAX_FEWSHOT}")]


def _subject(q: Question) -> str:
    return q.subject or ""


@validated
def choose_shots(questions: Sequence[Question], pool: Iterable[Question], n: NumFewshot,
                 seed: int = 0) -> dict[str, tuple[Question, ...]]:
    """Question id -> its ``n`` examples from ``pool`` (see the module docstring); {} when ``n`` is 0.

    Raises LlmcalError naming the subject when its pool has too few questions.
    """
    if n == 0:
        return {}
    ranked: dict[str, list[Question]] = {}
    for q in pool:
        ranked.setdefault(_subject(q), []).append(q)
    key = f"fewshot:{seed}"
    for qs in ranked.values():
        qs.sort(key=lambda q: (hash_unit(q.id, key), q.id))
    out: dict[str, tuple[Question, ...]] = {}
    for q in questions:
        cands = ranked.get(_subject(q), [])
        head = cands[: n + 1]
        shots = tuple(c for c in head if c.id != q.id)[:n]
        if len(shots) < n:
            subject = repr(q.subject) if q.subject else "(no subject)"
            raise LlmcalError(
                f"--num-fewshot {n}: the train split has {len(cands)} question(s) of subject {subject} to "
                f"draw examples from{' (one is the question itself)' if any(c.id == q.id for c in head) else ''}; "
                f"use a smaller --num-fewshot or more data"
            )
        out[q.id] = shots
    return out
