"""Option-order debiasing: the model's letter prior, and predictions with it taken out (docs/reference.md#debias).

Aligned models prefer some option letters whatever the options say (Zheng et
al., "Large Language Models Are Not Robust Multiple Choice Selectors", ICLR
2024). ``llmcal eval --permutations MODE`` scores the questions again with
their options cyclically shifted and reports the letter prior beside the
calibration with and without the bias removed.

Notation. A question has K options o_0..o_{K-1}. Shift s (s = 0..K-1) shows
option (i + s) mod K at letter position i, so option j sits at position
(j - s) mod K; shift 0 is the question as written. q_s(i) is the model's
probability of letter i under shift s (``observed``), and the probability it
gives option j under shift s, back in the original order, is

    p_s(j) = q_s((j - s) mod K)                    (``unshift``: numpy's roll by s)

**cyclic** (K forward passes per question): the debiased distribution is the
average over the K shifts in the original order,

    p(j) = (1/K) sum_s p_s(j).

Each option is shown once at every letter, so a model whose letter
probabilities do not depend on the content at all (q_s = pi for every s) gets
the uniform distribution: a pure position bias is averaged away exactly.

**pride** (Zheng et al.'s PriDe; K forward passes on a seeded subset, one on the
others). The observed distribution is modelled as a letter prior times an
intrinsic preference for the content shown at each letter,
q_s(i) ∝ pi(i) · r(o_{(i+s) mod K}). The log of the content term summed over
the K cyclic shifts is the same for every letter, so each subset question x
gives a prior estimate

    pi_x(i) = softmax_i( (1/K) sum_s log q_s(i) )

exactly (float rounding aside) when the model follows the decomposition; the
run's prior is their mean over the subset, pi = mean_x pi_x (one prior per
option count K). Every question's observed distribution (shift 0) then has the
prior divided out and is renormalised,

    p(j) ∝ q_0(j) / pi(j),   i.e. logits z_j - log pi(j).

The paper gives the subset questions their permutation-based prediction
instead; llmcal divides the prior out of every question so that one rule makes
the debiased result (the subset's permutations stay in the predictions file).
The subset holds, per option count, the max(1, round(f · n_K)) questions with
the smallest H(f"pride:{seed}", id) (the split hash of llmcal.data.splits), so it
depends on the ids and the seed only.

**The letter prior reported** (both modes, from the questions scored under every
shift): per letter position the mean probability (1/(n K)) sum_x sum_s q_s(i),
PriDe's estimate pi, and the share of (question, shift) pairs whose argmax is at
that letter, each with a 95% percentile bootstrap interval over questions.
An unbiased model has 1/K at every letter.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from .data.schema import LETTERS, Question
from .errors import LlmcalError
from .predictions import Prediction
from .validation import PositiveFraction, validated

__all__ = ["MODES", "SHIFT_SEP", "cyclic_shift", "shift_id", "permuted_questions", "unshift", "cyclic_average",
           "sample_prior", "estimate_prior", "divide_prior", "pride_subset", "letter_prior", "Debiased",
           "debias_predictions", "forward_passes", "debias_section"]

Mode = Literal["none", "cyclic", "pride"]  # EvalConfig.permutations
MODES = typing.get_args(Mode)
SHIFT_SEP = "#shift"
_LOG_FLOOR = 1e-300  # log of an averaged probability that underflowed to 0


# ---------------------------------------------------------------------------- the permutations
def shift_id(qid: str, s: int) -> str:
    return qid if s == 0 else f"{qid}{SHIFT_SEP}{s}"


def cyclic_shift(q: Question, s: int) -> Question:
    """``q`` with option (i + s) mod K at letter i; the answer moves to (answer - s) mod K."""
    k = q.k
    s %= k
    return Question(id=shift_id(q.id, s), question=q.question, choices=tuple(q.choices[(i + s) % k] for i in range(k)),
                    answer=(q.answer - s) % k, subject=q.subject, explanation=q.explanation)


def permuted_questions(questions: Sequence[Question]) -> tuple[list[Question], dict[str, tuple[Question, int]]]:
    """Shifts 1..K-1 of every question, and for each new id (original question, shift)."""
    ids = {q.id for q in questions}
    out, origin = [], {}
    for q in questions:
        for s in range(1, q.k):
            p = cyclic_shift(q, s)
            if p.id in ids or p.id in origin:
                raise LlmcalError(f"question id {p.id!r} exists already; --permutations names the shifted copies "
                                  f"<id>{SHIFT_SEP}<s>: rename that question")
            out.append(p)
            origin[p.id] = (q, s)
    return out, origin


def unshift(observed, s: int) -> np.ndarray:
    """Probabilities (or any per-letter values) under shift s, back in the original option order."""
    return np.roll(np.asarray(observed, dtype=np.float64), s, axis=-1)


def cyclic_average(observed) -> np.ndarray:
    """(K shifts, K letters) observed probabilities -> the K-option average in the original order."""
    q = np.asarray(observed, dtype=np.float64)
    return np.mean([unshift(q[s], s) for s in range(q.shape[0])], axis=0)


def _log_softmax(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    m = np.max(z, axis=-1, keepdims=True)
    return z - m - np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))


def sample_prior(observed_logits) -> np.ndarray:
    """One question's PriDe prior: softmax over letters of the mean over its K shifts of log q_s(letter).

    ``observed_logits``: (K shifts, K letters), in presented (letter) order; logits or log-probabilities.
    """
    lq = _log_softmax(observed_logits)
    if lq.shape[0] != lq.shape[1]:
        raise LlmcalError(f"PriDe needs all K cyclic shifts of a question (got {lq.shape[0]} of {lq.shape[1]})")
    return np.exp(_log_softmax(lq.mean(axis=0)))


def estimate_prior(per_question_logits: Sequence) -> np.ndarray:
    """The run's prior: the mean of :func:`sample_prior` over the subset questions (all with the same K)."""
    if not len(per_question_logits):
        raise LlmcalError("PriDe needs at least one question scored under every shift")
    return np.mean([sample_prior(x) for x in per_question_logits], axis=0)


def divide_prior(logits, prior) -> np.ndarray:
    """softmax(z - log prior): the observed distribution with the prior divided out, renormalised."""
    z = np.asarray(logits, dtype=np.float64) - np.log(np.asarray(prior, dtype=np.float64))
    return np.exp(_log_softmax(z))


@validated
def pride_subset(questions: Sequence[Question], fraction: PositiveFraction, seed: int) -> list[Question]:
    """Per option count K, the max(1, round(fraction * n_K)) questions with the smallest H(pride:seed, id)."""
    from .data.splits import hash_unit

    by_k: dict[int, list[Question]] = {}
    for q in questions:
        by_k.setdefault(q.k, []).append(q)
    chosen: set[str] = set()
    for k, qs in by_k.items():
        n = max(1, int(round(fraction * len(qs))))
        chosen |= {q.id for q in sorted(qs, key=lambda q: (hash_unit(q.id, f"pride:{seed}"), q.id))[:n]}
    return [q for q in questions if q.id in chosen]


def forward_passes(questions: Sequence[Question], mode: str, subset: Sequence[Question] = ()) -> int:
    """Scorings a mode costs: sum of K over questions (cyclic), N + sum of (K - 1) over the subset (pride)."""
    if mode == "cyclic":
        return sum(q.k for q in questions)
    if mode == "pride":
        return len(questions) + sum(q.k - 1 for q in subset)
    return len(questions)


# ---------------------------------------------------------------------------- the letter prior
def _boot(values: np.ndarray, n_bootstrap: int, seed: int) -> list[list[float]]:
    """95% percentile bootstrap interval over questions (rows) of the mean of ``values`` (n x K)."""
    n = len(values)
    rng = np.random.default_rng(seed)
    means = np.empty((n_bootstrap, values.shape[1]))
    step = max(1, 2_000_000 // max(1, n * values.shape[1]))
    for start in range(0, n_bootstrap, step):
        b = min(step, n_bootstrap - start)
        means[start:start + b] = values[rng.integers(0, n, size=(b, n))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5], axis=0)
    return [[float(a), float(b)] for a, b in zip(lo, hi)]


def letter_prior(observed_logits: Sequence, *, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """The letter prior of questions with K options scored under every shift (module docstring).

    ``observed_logits``: per question a (K, K) array, row s = the letter logits under shift s.
    """
    x = np.asarray([_log_softmax(o) for o in observed_logits], dtype=np.float64)  # (n, K, K) log q_s(i)
    if x.ndim != 3 or x.shape[1] != x.shape[2] or len(x) == 0:
        raise LlmcalError("the letter prior needs, per question, its K options' logits under all K shifts")
    n, k = x.shape[0], x.shape[2]
    q = np.exp(x)
    mean_prob = q.mean(axis=1)                                              # (n, K) per question
    priors = np.exp(_log_softmax(x.mean(axis=1)))                           # (n, K) PriDe per question
    picks = np.zeros((n, k))
    for i in range(n):
        picks[i] = np.bincount(np.argmax(q[i], axis=1), minlength=k) / k
    return {
        "k": int(k), "n_questions": int(n), "letters": list(LETTERS[:k]), "uniform": 1.0 / k,
        "mean_prob": [float(v) for v in mean_prob.mean(axis=0)], "mean_prob_ci": _boot(mean_prob, n_bootstrap, seed),
        "pride_prior": [float(v) for v in priors.mean(axis=0)], "pride_prior_ci": _boot(priors, n_bootstrap, seed),
        "pick_share": [float(v) for v in picks.mean(axis=0)], "pick_share_ci": _boot(picks, n_bootstrap, seed),
    }


# ---------------------------------------------------------------------------- a run's predictions
@dataclass(frozen=True)
class Debiased:
    """What :func:`debias_predictions` returns: the debiased predictions, their records, the letter prior."""

    predictions: list[Prediction]
    records: list[dict]                          # predictions.jsonl lines (with "permutations" where scored)
    priors: dict[str, dict]                      # per option count: letter_prior()
    prior_used: dict[str, list[float]] | None    # pride: the prior divided out, per option count
    subset_ids: list[str]                        # questions scored under every shift


@validated
def debias_predictions(plain: Sequence[Prediction], permuted: Sequence[Prediction],
                       origin: dict[str, tuple[Question, int]], mode: Literal["cyclic", "pride"], *,
                       n_bootstrap: int = 1000,
                       seed: int = 0) -> Debiased:
    """Debiased predictions of ``plain`` (shift 0, question order) from the shifted scorings ``permuted``.

    ``origin`` maps a shifted prediction's id to (original question, shift) (:func:`permuted_questions`);
    ``mode`` is ``cyclic`` (every question has its shifts) or ``pride`` (some do).
    """
    shifted: dict[str, dict[int, Prediction]] = {}
    for p in permuted:
        q, s = origin[p.id]
        shifted.setdefault(q.id, {})[s] = p
    full: dict[str, np.ndarray] = {}  # id -> (K, K) logits, row s in presented order
    for p in plain:
        have = shifted.get(p.id)
        if have is None:
            continue
        k = len(p.logits)
        if sorted(have) != list(range(1, k)):
            raise LlmcalError(f"question {p.id}: shifts {sorted(have)} scored, {list(range(1, k))} needed")
        full[p.id] = np.array([p.logits] + [have[s].logits for s in range(1, k)], dtype=np.float64)
    if mode == "cyclic" and len(full) != len(plain):
        missing = next(p.id for p in plain if p.id not in full)
        raise LlmcalError(f"--permutations cyclic: question {missing} was not scored under every shift")
    by_k: dict[int, list[np.ndarray]] = {}
    for lg in full.values():
        by_k.setdefault(lg.shape[1], []).append(lg)
    priors = {str(k): letter_prior(v, n_bootstrap=n_bootstrap, seed=seed) for k, v in sorted(by_k.items())}
    prior_used = None
    if mode == "pride":
        prior_used = {str(k): [float(x) for x in estimate_prior(v)] for k, v in sorted(by_k.items())}
        lacking = sorted({len(p.logits) for p in plain} - set(by_k))
        if lacking:
            raise LlmcalError(f"--permutations pride: no subset question has {lacking[0]} options, so there is no "
                              f"prior to divide out of those questions")
    preds, records = [], []
    for p in plain:
        lg = full.get(p.id)
        if mode == "cyclic":
            probs = cyclic_average(np.exp(_log_softmax(lg)))
            logits = np.log(np.maximum(probs, _LOG_FLOOR))
        else:
            logits = np.asarray(p.logits, dtype=np.float64) - np.log(prior_used[str(len(p.logits))])
        d = Prediction.from_logits(p.id, p.subject, p.answer, logits, letter_mass=p.letter_mass, missing=p.missing)
        rec = d.to_dict()
        if lg is not None:  # every shift's distribution in the original option order: nothing is lost
            rec["permutations"] = [[float(v) for v in unshift(np.exp(_log_softmax(lg[s])), s)]
                                   for s in range(lg.shape[0])]
        preds.append(d)
        records.append(rec)
    return Debiased(preds, records, priors, prior_used, [p.id for p in plain if p.id in full])


# ---------------------------------------------------------------------------- the report section
def debias_section(summary: dict, none_metrics: dict, deb_metrics: dict) -> str:
    """Markdown: cost, the letter prior per option count, and the metrics with and without debiasing (the report
    engine's tables: ``llmcal.report.tables.markdown_table``, numbers to 3 significant digits)."""
    from .report.tables import SIG, format_value, markdown_table

    mode = summary["mode"]
    how = ("the K cyclic shifts of every question's options, averaged in the original order" if mode == "cyclic"
           else f"PriDe: the letter prior estimated from the K cyclic shifts of {summary['n_subset']} questions "
                f"(--pride-fraction {summary['pride_fraction']:g}, seed {summary['seed']}), divided out of every "
                "question's observed distribution")
    lines = [f"Debiasing: {how} (docs/reference.md#debias). Cost: {summary['forward_passes']} forward passes for "
             f"{summary['n_questions']} questions ({summary['cost']}).", ""]
    for k, pr in summary["letter_prior"].items():
        used = (summary.get("prior_used") or {}).get(k)
        lines += [f"Letter prior, {k} options ({pr['n_questions']} questions under all {k} shifts; an unbiased model "
                  f"has {format_value(pr['uniform'], sig=SIG)} everywhere):", ""]
        rows = [{"letter": letter, **{key: pr[key][i] for key in ("mean_prob", "pride_prior", "pick_share")},
                 **{f"{key}_ci": pr[f"{key}_ci"][i] for key in ("mean_prob", "pride_prior", "pick_share")},
                 "divided_out": used[i] if used else None} for i, letter in enumerate(pr["letters"])]
        columns = ["letter", ("mean_prob", "mean probability"), ("pride_prior", "PriDe prior"),
                   ("pick_share", "argmax share")] + ([("divided_out", "divided out")] if used else [])
        lines += [markdown_table(rows, columns, sig=SIG)]
    rows = []
    for label, m in (("none", none_metrics), ("debiased", deb_metrics)):
        ci = m.get("ci") or {}
        rows.append({"result": label, **{key: m[key] for key in ("accuracy", "conf_ece", "brier", "nll")},
                     "accuracy_ci": ci.get("accuracy"), "conf_ece_ci": ci.get("conf_ece")})
    lines += [markdown_table(rows, ["result", "accuracy", "conf_ece", "brier", "nll"], sig=SIG)]
    ch = summary["change"]
    lines += [f"Debiased minus none, paired 95% bootstrap intervals: accuracy "
              f"{format_value(ch['accuracy'], ch['accuracy_ci'], signed=True, sig=SIG)}, conf-ECE "
              f"{format_value(ch['conf_ece'], ch['conf_ece_ci'], signed=True, sig=SIG)}.", ""]
    return "\n".join(lines)
