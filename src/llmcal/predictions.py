"""Predictions: the scoring engine's output and every later stage's input."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .errors import LlmcalError

PROB_FLOOR = 1e-12  # a zero probability's logit is log(PROB_FLOOR) (as NLL floors p_y)
# The keys every record has (and a served model's coverage); anything else in a record is ``extra``.
RECORD_KEYS = ("id", "subject", "answer", "probs", "pred", "conf", "logits", "letter_mass", "missing")


@dataclass(frozen=True)
class Prediction:
    """The model's distribution over one question's options.

    ``logits`` are the K letter-token logits at the answer position (float32 or
    better); ``probs`` is their softmax; ``pred`` = argmax, ``conf`` = max prob.

    A served model (``--backend openai``) returns only its top-N log-probabilities,
    so its records also say how much of the next-token probability the option
    letters carried (``letter_mass``) and which options were not among the top N
    (``missing``, option indices); see docs/reference.md, "Served models".  Both
    are written only when set, so a local model's records are unchanged.

    A confidence read without logprobs (``--confidence verbalized|ptrue|consistency``, llmcal.confidence)
    is a distribution given as probabilities, which may hold exact zeros (no sample chose that option):
    ``from_probs`` keeps them as given, and its ``logits`` are ``log(max(p, PROB_FLOOR))`` (finite, so
    every logit-based calibrator runs; softmax of them equals ``probs`` up to ``PROB_FLOOR`` per zero).
    Such a record carries ``extra``: the source (key ``confidence``, which marks the record as read from
    its ``probs``), the raw replies and the parse outcome, written after the usual keys.
    """

    id: str
    subject: str | None
    answer: int
    logits: tuple[float, ...]
    probs: tuple[float, ...]
    pred: int
    conf: float
    letter_mass: float | None = None
    missing: tuple[int, ...] = ()
    extra: Mapping[str, Any] | None = field(default=None, hash=False)

    @classmethod
    def from_probs(cls, id: str, subject: str | None, answer: int, probs: Sequence[float], *,
                   extra: Mapping[str, Any] | None = None) -> "Prediction":
        """A distribution given as probabilities (zeros allowed): kept exactly; logits floored (class docstring)."""
        p = np.asarray(probs, dtype=np.float64)
        pred = int(np.argmax(p))
        return cls(id=id, subject=subject, answer=int(answer), logits=tuple(float(v) for v in
                                                                            np.log(np.maximum(p, PROB_FLOOR))),
                   probs=tuple(float(v) for v in p), pred=pred, conf=float(p[pred]),
                   extra=dict(extra) if extra is not None else None)

    @classmethod
    def from_logits(cls, id: str, subject: str | None, answer: int, logits: Sequence[float], *,
                    letter_mass: float | None = None, missing: Sequence[int] = ()) -> "Prediction":
        z = np.asarray(logits, dtype=np.float64)
        p = softmax(z)
        pred = int(np.argmax(p))
        return cls(id=id, subject=subject, answer=int(answer), logits=tuple(float(v) for v in z),
                   probs=tuple(float(v) for v in p), pred=pred, conf=float(p[pred]),
                   letter_mass=None if letter_mass is None else float(letter_mass),
                   missing=tuple(int(j) for j in missing))

    @property
    def correct(self) -> bool:
        return self.pred == self.answer

    def to_dict(self) -> dict:
        d = {"id": self.id, "subject": self.subject, "answer": self.answer, "probs": list(self.probs),
             "pred": self.pred, "conf": self.conf, "logits": list(self.logits)}
        if self.letter_mass is not None:  # served models only: local records stay byte for byte as before
            d["letter_mass"] = self.letter_mass
            d["missing"] = list(self.missing)
        if self.extra:  # llmcal.confidence's records: the source, raw replies, parse outcome
            d.update((k, v) for k, v in self.extra.items() if k not in RECORD_KEYS)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Prediction":
        if "confidence" in d:  # a distribution given as probabilities (llmcal.confidence): read back as written
            return cls.from_probs(d["id"], d.get("subject"), d["answer"], d["probs"],
                                  extra={k: v for k, v in d.items() if k not in RECORD_KEYS})
        return cls.from_logits(d["id"], d.get("subject"), d["answer"], d["logits"],
                               letter_mass=d.get("letter_mass"), missing=d.get("missing") or ())


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    z = z - np.max(z, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


def stack_probs(preds: Sequence[Prediction]) -> tuple[np.ndarray, np.ndarray]:
    """(N x Kmax) probabilities (zero-padded for questions with fewer options) and answers."""
    if not preds:
        raise LlmcalError("no predictions to compute metrics on")
    kmax = max(len(p.probs) for p in preds)
    probs = np.zeros((len(preds), kmax), dtype=np.float64)
    for i, p in enumerate(preds):
        probs[i, : len(p.probs)] = p.probs
    answers = np.array([p.answer for p in preds], dtype=np.int64)
    return probs, answers


def read_records(path: str | Path, read: Callable[[dict], Any]) -> list:
    """``read(record)`` for each record of a predictions file (blank lines skipped); a line that is no JSON, or that
    ``read`` refuses with a KeyError or TypeError, raises ``LlmcalError`` naming the file and the line."""
    import json

    path = Path(path)
    if not path.exists():
        raise LlmcalError(f"{path}: no predictions file")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(read(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise LlmcalError(f"{path}:{lineno}: bad prediction record ({e})") from e
    return out


def load_predictions(path: str | Path) -> list[Prediction]:
    return read_records(path, Prediction.from_dict)


def write_predictions(path: str | Path, preds: Iterable[Prediction]) -> None:
    from .io import atomic_write_jsonl

    atomic_write_jsonl(path, (p.to_dict() for p in preds))
