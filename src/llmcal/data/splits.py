"""Deterministic splits: which questions a split or a held-out slice holds depends on ids and the seed only.

Every question id gets a number in [0, 1)::

    H(key, id) = int.from_bytes(sha256(f"{key}:{id}")[:8], "big") / 2**64

Two uses, two keys, so that they are independent of each other:

**Named splits** (``train``, ``calib``, ``test``): consecutive intervals of
``u = H(seed + SPLIT_SALT, id)`` in the order of ``SPLITS``: ``train`` is
u < 0.6, ``calib`` 0.6 <= u < 0.8, ``test`` u >= 0.8.  The same name means the
same questions everywhere: ``llmcal eval --split``, ``llmcal calibrate
--train-split/--eval-split`` and a study's ``split:``.  A study may give its own
``fractions`` (same key, intervals in the order given).

**Held-out slice** (:func:`split_heldout`): the questions fine-tuning keeps out
of training (RCFT's E-step, the ``auto`` regime check, the training curve),
the questions temperature scaling is fitted on in ``calibrate --method ts``,
and the held-out side of ``llmcal regime``.  A question is held out when
``H(seed, id) >= 1 - fraction``.

Properties: the same (id, seed) always lands on the same side, whatever else is
in the dataset and in whatever order (so subject filters and ``limit`` never
move a question between splits); splits are disjoint and cover every question;
each holds about its fraction (a binomial spread around it).
"""
from __future__ import annotations

import hashlib
import math
from typing import Callable, Iterable, Literal, Mapping, Sequence, TypeVar

from ..errors import LlmcalError
from ..validation import Fraction, NonNegativeNumber, check_value, validated
from .schema import Question

T = TypeVar("T")

SPLITS: dict[str, float] = {"train": 0.6, "calib": 0.2, "test": 0.2}
# Added to the seed for named splits, so that they are independent of held-out slices (keyed by the seed).
SPLIT_SALT = 7919
NO_SPLIT = ("all",)
# The split names as the configs' types (--train-split and --eval-split; --split, which may also be all)
Split = Literal[tuple(SPLITS)]
SplitOrAll = Literal[(*NO_SPLIT, *SPLITS)]


def hash_unit(qid: str, key: int | str) -> float:
    """H(key, id) in [0, 1): ``sha256(f"{key}:{qid}")``, first 8 bytes big-endian, / 2**64."""
    digest = hashlib.sha256(f"{key}:{qid}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def check_fractions(fractions: Mapping[str, float]) -> None:
    if not fractions:
        raise LlmcalError("split fractions are empty; give e.g. {'train': 0.6, 'calib': 0.2, 'test': 0.2}")
    for name in fractions:
        if not isinstance(name, str) or not name or name in NO_SPLIT:
            raise LlmcalError(f"split name {name!r} is not allowed")
    check_value(dict[str, NonNegativeNumber], dict(fractions), "split fractions")
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6:
        raise LlmcalError(f"split fractions must sum to 1, got {total:g} ({dict(fractions)})")


def _bounds(fractions: Mapping[str, float]) -> list[tuple[str, float]]:
    """(name, upper end of its interval) in dict order; the last non-empty one reaches +inf (no rounding gap)."""
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


def split_of(qid: str, seed: int, fractions: Mapping[str, float] = SPLITS) -> str:
    """The named split of question ``qid`` (see the module docstring)."""
    check_fractions(fractions)
    return _lookup(hash_unit(qid, seed + SPLIT_SALT), _bounds(fractions))


def apply_split(
    questions: Iterable[Question],
    split: str | None,
    seed: int = 0,
    fractions: Mapping[str, float] | None = None,
) -> tuple[Question, ...]:
    """The questions of named split ``split`` (in their original order); None or "all" keeps every question.

    ``fractions`` defaults to ``SPLITS``.
    """
    questions = tuple(questions)
    if split is None or split in NO_SPLIT:
        return questions
    fractions = SPLITS if fractions is None else fractions
    check_fractions(fractions)
    if split not in fractions:
        raise LlmcalError(f"unknown split {split!r}; choose one of {', '.join((*fractions, 'all'))}")
    bounds = _bounds(fractions)
    return tuple(q for q in questions if _lookup(hash_unit(q.id, seed + SPLIT_SALT), bounds) == split)


@validated
def split_heldout(items: Sequence[T], fraction: Fraction, seed: int = 0, *,
                  id_of: Callable[[T], str] = lambda q: q.id) -> tuple[tuple[T, ...], tuple[T, ...]]:
    """(kept, held out): ``items`` split by ``H(seed, id) >= 1 - fraction``, each side in the original order.

    ``fraction`` 0 holds nothing out.  ``id_of`` reads an item's id (questions and
    predictions both have ``.id``).
    """
    items = tuple(items)
    if fraction == 0:
        return items, ()
    held = [hash_unit(id_of(x), seed) >= 1.0 - float(fraction) for x in items]
    return (tuple(x for x, h in zip(items, held) if not h), tuple(x for x, h in zip(items, held) if h))
