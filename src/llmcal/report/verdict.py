"""The verdict a report opens with: how miscalibrated the model is, and which method to use.

For one set of questions, the *base* is the uncalibrated model and the *options* are the methods measured
on the same questions (temperature scaling, the post-hoc calibrators, CFT, RCFT, ...).

- **Confidence.** ``gap = mean confidence − accuracy`` of the base, with its 95% bootstrap interval when
  the predictions are at hand: above 0 overconfident, below 0 underconfident, an interval across 0
  neither, as far as these questions can tell.
- **Which method.** A method may be picked only when it does not cost accuracy: its paired accuracy
  change (method − base, on the same questions) has an interval that lies above 0 or has 0 inside it.  An
  interval that *ends* at 0 (``-0.140 [-0.30, 0.00]``) counts as a loss: all but the top 2.5% of the
  resamples lost accuracy.  A method that keeps every answer (change exactly 0, interval ``[0, 0]``:
  temperature scaling, Platt, isotonic, histogram binning) keeps accuracy.  Without an interval the point
  change must be at least 0.  Among the methods that keep accuracy (and the base itself, "keep the model
  as it is"), the one with the lowest conf-ECE is the pick.
- **The Pareto front** of accuracy (higher is better) against conf-ECE (lower is better): the methods no
  other method beats on both.  The report draws it so that the trade the pick makes, and the methods left
  out for their accuracy, are visible.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .tables import SIG, format_value



@dataclass(frozen=True)
class Option:
    """One method's numbers on the base's questions (the base itself is an Option too)."""

    label: str
    kind: str = ""
    n: int | None = None
    accuracy: float | None = None
    accuracy_ci: tuple | None = None
    conf_ece: float | None = None
    conf_ece_ci: tuple | None = None
    mean_conf: float | None = None
    accuracy_change: float | None = None
    accuracy_change_ci: tuple | None = None
    metrics: dict | None = field(default=None, compare=False, repr=False)  # for the reliability diagram


@dataclass(frozen=True)
class Verdict:
    scope: str  # what the questions are ("in-domain", "qwen · in-domain", a dataset name)
    base: Option
    gap: float | None
    gap_ci: tuple | None
    options: tuple[Option, ...]  # every method but the base
    pick: Option | None  # None: no method beats the base without costing accuracy (or there is none)
    front: tuple[Option, ...]  # the Pareto front over the base and the options

    @property
    def costly(self) -> tuple[Option, ...]:
        """The options left out because they cost accuracy."""
        return tuple(o for o in self.options if o.conf_ece is not None and not keeps_accuracy(o))


def keeps_accuracy(o: Option) -> bool:
    """True when ``o``'s accuracy change lies above 0 or has 0 strictly inside its interval, or is exactly 0
    (``[0, 0]``); without an interval, when the change is at least 0 (module docstring)."""
    change = o.accuracy_change
    if change is None:
        return False
    ci = o.accuracy_change_ci
    if ci is None or len(ci) != 2 or None in ci:
        return change >= 0
    lo, hi = float(ci[0]), float(ci[1])
    return hi > 0 or (lo == hi == 0 and change == 0)


def pareto_front(options: Sequence[Option]) -> tuple[Option, ...]:
    """The options no other option beats on both accuracy (higher) and conf-ECE (lower), by accuracy."""
    pts = [o for o in options if o.accuracy is not None and o.conf_ece is not None]

    def beaten(o: Option) -> bool:
        return any(p.accuracy >= o.accuracy and p.conf_ece <= o.conf_ece
                   and (p.accuracy > o.accuracy or p.conf_ece < o.conf_ece) for p in pts)

    return tuple(sorted((o for o in pts if not beaten(o)), key=lambda o: (o.accuracy, -o.conf_ece)))


def decide(scope: str, base: Option, options: Sequence[Option], gap_ci: Sequence[float] | None = None) -> Verdict:
    """The verdict for ``base`` and the ``options`` measured on its questions (module docstring)."""
    options = tuple(o for o in options if o.label != base.label)
    gap = (base.mean_conf - base.accuracy) if base.mean_conf is not None and base.accuracy is not None else None
    pick = None
    kept = [o for o in options if o.conf_ece is not None and keeps_accuracy(o)]
    if kept:
        best = min(kept, key=lambda o: o.conf_ece)
        if base.conf_ece is None or best.conf_ece < base.conf_ece:
            pick = best
    return Verdict(scope=scope, base=base, gap=gap, gap_ci=tuple(gap_ci) if gap_ci is not None else None,
                   options=options, pick=pick, front=pareto_front((base, *options)))


def overconfidence(probs, answers) -> float:
    """Mean confidence (the top probability) minus accuracy: > 0 overconfident, < 0 underconfident."""
    import numpy as np

    p = np.asarray(probs, dtype=float)
    a = np.asarray(answers)
    return float(p.max(axis=1).mean() - (p.argmax(axis=1) == a).mean())


def gap_interval(probs, answers, *, n_bootstrap: int = 1000, seed: int = 0) -> tuple[float, float] | None:
    """The 95% bootstrap interval of :func:`overconfidence` (None without questions or resamples)."""
    from ..metrics import bootstrap_ci

    if n_bootstrap < 1 or len(answers) == 0:
        return None
    return tuple(bootstrap_ci(overconfidence, probs, answers, n_resamples=int(n_bootstrap), seed=seed))


# ---- words -----------------------------------------------------------------------------------
def _num(x: float | None, ci=None, *, signed: bool = False) -> str:
    if x is None:
        return "—"
    return format_value(float(x), ci, signed=signed, sig=SIG)


def confidence_text(v: Verdict) -> str:
    """"Overconfident by 0.0776 [0.02, 0.13]: mean confidence 0.581 against accuracy 0.503 on 300 questions;
    conf-ECE 0.0862 [0.06, 0.15]." (or under-, or neither when the interval has 0 inside)."""
    b = v.base
    ece = f"conf-ECE {_num(b.conf_ece, b.conf_ece_ci)}"
    if v.gap is None:
        return f"Accuracy {_num(b.accuracy, b.accuracy_ci)}, {ece}."
    nums = f"mean confidence {_num(b.mean_conf)} against accuracy {_num(b.accuracy)}" + (
        f" on {b.n} questions" if b.n else "")
    ci = v.gap_ci
    if ci is not None and ci[0] <= 0 <= ci[1]:
        return (f"Neither over- nor underconfident beyond chance (mean confidence − accuracy "
                f"{_num(v.gap, ci, signed=True)}): {nums}; {ece}.")
    word = "Overconfident" if v.gap > 0 else "Underconfident"
    return f"{word} by {_num(abs(v.gap), _abs_ci(ci))}: {nums}; {ece}."


def _abs_ci(ci):
    if ci is None:
        return None
    lo, hi = abs(ci[0]), abs(ci[1])
    return (min(lo, hi), max(lo, hi))


def advice_text(v: Verdict) -> str:
    """Which method to use and what it buys, or why none: "Use **ts**: conf-ECE 0.0862 [0.06, 0.15] → 0.0501
    [0.04, 0.11] at accuracy change 0 [0.00, 0.00]."."""
    b = v.base
    if not v.options:
        return "No calibration method was measured on these questions."
    costly = [o for o in v.costly if b.conf_ece is not None and o.conf_ece < b.conf_ece
              and (v.pick is None or o.conf_ece < v.pick.conf_ece)]
    left_out = ("" if not costly else " Left out for costing accuracy although their conf-ECE is lower: "
                + "; ".join(f"{o.label} ({_num(o.conf_ece)} at accuracy change "
                            f"{_num(o.accuracy_change, o.accuracy_change_ci, signed=True)})" for o in costly) + ".")
    if v.pick is None:
        return (f"Keep the model as it is: no method lowers its conf-ECE without costing accuracy.{left_out}")
    p = v.pick
    return (f"Use **{p.label}**: conf-ECE {_num(b.conf_ece, b.conf_ece_ci)} → {_num(p.conf_ece, p.conf_ece_ci)} at "
            f"accuracy change "
            f"{_num(p.accuracy_change, p.accuracy_change_ci, signed=True)}.{left_out}")


RULE_TEXT = ("The pick is the lowest conf-ECE among the methods whose paired accuracy change has an interval "
             "above 0 or with 0 inside it (an interval ending at 0 counts as a loss); the plot marks the Pareto "
             "front of accuracy against conf-ECE, methods left out for their accuracy hollow.")
