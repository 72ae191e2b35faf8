"""Deterministic splits: a question's split is a function of its id and the seed only.

Each question id gets a number u in [0, 1): the first 8 bytes of
``sha256(f"{seed}:{qid}")`` read as a big-endian integer, divided by 2**64.
The split fractions are taken *in their dict order* as consecutive intervals
of [0, 1): with ``{"calib": 0.2, "test": 0.8}`` a question is in ``calib`` when
u < 0.2 and in ``test`` otherwise.  So:

- the same (id, seed) always lands in the same split, whatever else is in the
  dataset, in whatever order, and whatever ``limit`` or subject filter is used;
- splits are disjoint and together cover every question;
- each split holds about its fraction of the questions (exactly in expectation;
  a binomial spread around it for a finite dataset);
- fractions must be >= 0 and sum to 1; a zero fraction is an empty split.

``DEFAULT_SPLITS`` is for evaluation (a calibration split for post-hoc
calibrators, a test split for the numbers); ``TRAINING_SPLITS`` is for
fine-tuning (train, a held-out slice for the regime diagnosis and RCFT's
E-step, and test).  Because ``test`` is the last interval in both, the training
``test`` split (u >= 0.8) is a subset of the evaluation ``test`` split (u >= 0.2).
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterable, Mapping

from ..errors import LlmcalError
from .schema import Question

DEFAULT_SPLITS: dict[str, float] = {"calib": 0.2, "test": 0.8}
TRAINING_SPLITS: dict[str, float] = {"train": 0.6, "heldout": 0.2, "test": 0.2}
NO_SPLIT = ("all",)


def hash_unit(qid: str, seed: int) -> float:
    """u in [0, 1) from ``sha256(f"{seed}:{qid}")`` (first 8 bytes, big-endian, / 2**64)."""
    digest = hashlib.sha256(f"{seed}:{qid}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def check_fractions(fractions: Mapping[str, float]) -> None:
    if not fractions:
        raise LlmcalError("split fractions are empty; give e.g. {'calib': 0.2, 'test': 0.8}")
    for name, f in fractions.items():
        if not isinstance(name, str) or not name or name in NO_SPLIT:
            raise LlmcalError(f"split name {name!r} is not allowed")
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not math.isfinite(f) or f < 0:
            raise LlmcalError(f"split fraction for {name!r} must be a number >= 0, got {f!r}")
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6:
        raise LlmcalError(f"split fractions must sum to 1, got {total:g} ({dict(fractions)})")


def _bounds(fractions: Mapping[str, float]) -> list[tuple[str, float]]:
    """(name, upper end of its interval) in dict order.

    The last non-empty split's interval is extended to +inf so that rounding in
    the cumulative sum never leaves a question without a split.
    """
    out, cum = [], 0.0
    for name, f in fractions.items():
        cum += f
        out.append((name, cum))
    last = max(i for i, (name, _) in enumerate(out) if fractions[name] > 0)
    out[last] = (out[last][0], math.inf)
    return out


def _lookup(u: float, bounds: list[tuple[str, float]]) -> str:
    for name, upper in bounds:
        if u < upper:
            return name
    raise AssertionError("unreachable: the last bound is +inf")


def split_of(qid: str, seed: int, fractions: Mapping[str, float] = DEFAULT_SPLITS) -> str:
    """The split of question ``qid``: the interval of ``fractions`` that ``hash_unit(qid, seed)`` falls in."""
    check_fractions(fractions)
    return _lookup(hash_unit(qid, seed), _bounds(fractions))


def fractions_for(split: str) -> dict[str, float]:
    """The default fraction set that defines ``split``: DEFAULT_SPLITS first, then TRAINING_SPLITS."""
    for fractions in (DEFAULT_SPLITS, TRAINING_SPLITS):
        if split in fractions:
            return dict(fractions)
    known = sorted(set(DEFAULT_SPLITS) | set(TRAINING_SPLITS) | set(NO_SPLIT))
    raise LlmcalError(f"unknown split {split!r}; choose one of {', '.join(known)}")


def apply_split(
    questions: Iterable[Question],
    split: str | None,
    seed: int = 0,
    fractions: Mapping[str, float] | None = DEFAULT_SPLITS,
) -> tuple[Question, ...]:
    """The questions of ``split`` (in their original order); ``None`` or ``"all"`` keeps every question.

    ``fractions`` None means ``fractions_for(split)``: ``calib``/``test`` from
    DEFAULT_SPLITS, ``train``/``heldout`` from TRAINING_SPLITS.
    """
    questions = tuple(questions)
    if split is None or split in NO_SPLIT:
        return questions
    if fractions is None:
        fractions = fractions_for(split)
    check_fractions(fractions)
    if split not in fractions:
        raise LlmcalError(f"unknown split {split!r}; the fractions define {', '.join(fractions)} (or 'all')")
    bounds = _bounds(fractions)
    return tuple(q for q in questions if _lookup(hash_unit(q.id, seed), bounds) == split)
