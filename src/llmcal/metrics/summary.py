"""Every metric of a run in one JSON-serialisable dict (``metrics.json``), with the estimator of each."""
from __future__ import annotations

import functools
from collections import defaultdict
from typing import Sequence

import numpy as np

from ..errors import LlmcalError
from ..validation import NonNegativeInt, check_value
from ..predictions import Prediction, stack_probs
from .bootstrap import bootstrap_ci
from .core import (_check_inputs, _check_n_bins, _conf_correct, accuracy, auroc, brier, classwise_ece, conf_ece,
                   equal_mass_ece, mce, mean_confidence, nll, reliability_bins)
from .estimators import debiased_l2_ce
from .harness import harness_estimators, harness_metrics
from .selective import aurc, selective_accuracy
from .smooth import smooth_ece_fixed_point

__all__ = ["estimator_descriptions", "compute_metrics", "letter_coverage", "metrics_from_predictions"]

DEBIASED_L2_BINS = 15  # Kumar et al.'s default: 15 equal-mass bins


def estimator_descriptions(n_bins: int = 10, n_bootstrap: int = 1000) -> dict[str, str]:
    """How each number of :func:`compute_metrics` is estimated, in words (stored beside the numbers)."""
    return {
        "accuracy": "fraction of questions whose argmax option is the answer",
        "conf_ece": f"top-label ECE, {n_bins} equal-width bins [m/M, (m+1)/M), last bin closed",
        "cw_ece": f"classwise ECE: mean over option positions of the ECE of p_k vs 1{{y=k}}, {n_bins} equal-width bins",
        "em_ece": f"top-label ECE, {n_bins} equal-mass bins (sorted confidences cut into runs of equal size)",
        "mce": f"max over non-empty bins of |accuracy - confidence|, {n_bins} equal-width bins",
        "brier": "mean over questions of sum_k (p_k - 1{y=k})^2",
        "nll": "mean of -log p_y (p_y floored at 1e-12)",
        "auroc": "Mann-Whitney AUROC of confidence for correctness (ties: average ranks)",
        "mean_conf": "mean of max_k p_k",
        "smece": "smooth ECE (Blasiok & Nakkiran 2024): reflected-Gaussian kernel at the fixed-point bandwidth",
        "l2_ce_debiased": f"debiased top-label L2 calibration error (Kumar et al. 2019), {DEBIASED_L2_BINS} "
                          "equal-mass bins",
        "aurc": "area under the risk-coverage curve, (1/N) sum_k risk of the k most confident (ties: expectation)",
        "acc_at_80": "accuracy on the 80% most confident questions",
        "acc_at_50": "accuracy on the 50% most confident questions",
        **harness_estimators(n_bins),
        "ci": f"95% percentile bootstrap, {n_bootstrap} resamples of the questions",
    }


def compute_metrics(probs, answers, n_bins: int = 10, n_bootstrap: int = 1000, seed: int = 0,
                    subjects: Sequence[str | None] | None = None) -> dict:
    """Every metric as a JSON-serialisable dict of plain Python values.

    Keys: n, accuracy, conf_ece, cw_ece, em_ece, mce, brier, nll, auroc (NaN
    when all answers are right or all wrong), mean_conf, smece and
    smece_sigma (smooth ECE and its bandwidth), l2_ce_debiased, aurc,
    acc_at_80, acc_at_50, the harnesses' numbers (rms_ce, ece_1_bin,
    platt_ece_1_bin, platt_ece_10_bin, platt_coef, platt_intercept,
    selective_acc_at_10: :mod:`llmcal.metrics.harness`), ci ({"accuracy", "conf_ece", "aurc"} -> [lo, hi],
    percentile bootstrap with ``n_bootstrap`` resamples; values None when
    ``n_bootstrap`` is 0), reliability (:func:`reliability_bins`), per_subject
    (subject -> {n, accuracy, conf_ece}; None subjects under "(none)"; {} when
    ``subjects`` is None), n_bins, estimators (:func:`estimator_descriptions`).
    """
    m = _check_n_bins(n_bins)
    p, a = _check_inputs(probs, answers)
    n_bootstrap = check_value(NonNegativeInt, n_bootstrap, "n_bootstrap")
    conf, correct = _conf_correct(p, a)

    if n_bootstrap > 0:
        def ci_of(fn):
            return list(bootstrap_ci(fn, p, a, n_resamples=int(n_bootstrap), seed=seed))

        ci = {"accuracy": ci_of(accuracy), "conf_ece": ci_of(functools.partial(conf_ece, n_bins=m)),
              "aurc": ci_of(aurc)}
    else:
        ci = {"accuracy": None, "conf_ece": None, "aurc": None}

    per_subject: dict = {}
    if subjects is not None:
        subj = list(subjects)
        if len(subj) != len(a):
            raise LlmcalError(f"subjects has {len(subj)} entries but there are {len(a)} questions")
        groups: dict[str, list[int]] = defaultdict(list)
        for i, s in enumerate(subj):
            groups["(none)" if s is None else str(s)].append(i)
        for name in sorted(groups):
            rows = np.asarray(groups[name])
            per_subject[name] = {
                "n": int(len(rows)),
                "accuracy": accuracy(p[rows], a[rows]),
                "conf_ece": conf_ece(p[rows], a[rows], m),
            }

    smece, sigma = smooth_ece_fixed_point(conf, correct)
    return {
        "n": int(len(a)),
        "accuracy": accuracy(p, a),
        "conf_ece": conf_ece(p, a, m),
        "cw_ece": classwise_ece(p, a, m),
        "em_ece": equal_mass_ece(p, a, m),
        "mce": mce(p, a, m),
        "brier": brier(p, a),
        "nll": nll(p, a),
        "auroc": auroc(conf, correct),
        "mean_conf": mean_confidence(p),
        "smece": smece,
        "smece_sigma": sigma,
        "l2_ce_debiased": debiased_l2_ce(p, a, DEBIASED_L2_BINS),
        "aurc": aurc(p, a),
        "acc_at_80": selective_accuracy(p, a, 0.8),
        "acc_at_50": selective_accuracy(p, a, 0.5),
        **harness_metrics(p, a, m),
        "ci": ci,
        "reliability": reliability_bins(p, a, m),
        "per_subject": per_subject,
        "n_bins": m,
        "estimators": estimator_descriptions(m, int(n_bootstrap)),
    }


COVERAGE_ESTIMATOR = (
    "served models: letter_mass = sum over the option letters found among the endpoint's top-N first-token "
    "log-probabilities of exp(logprob) (both spellings of a letter added); a letter not found gets the upper bound "
    "min(smallest returned logprob, log of the mass outside the returned tokens) before the softmax over the "
    "options; missing_share = share of questions with at least one such letter, none_found_share = with none found")


def letter_coverage(preds: Sequence[Prediction]) -> dict | None:
    """How much of a served model's next-token probability the option letters carried (None for local models).

    (Not the *coverage* of selective prediction, which is the share of questions answered.)

    ``mean_letter_mass`` / ``min_letter_mass``: mean and minimum over questions of
    the probability the option letters carried among the endpoint's top-N
    log-probabilities; ``missing_share``: share of questions with at least one
    option letter outside the top N; ``none_found_share``: share with no option
    letter in the top N at all (their distribution over the options is
    uniform); ``missing_letters``: number of (question, option) pairs missing.
    The estimator is docs/reference.md, "Served models".
    """
    served = [p for p in preds if p.letter_mass is not None]
    if not served:
        return None
    if len(served) != len(preds):
        raise LlmcalError(f"{len(preds) - len(served)} of {len(preds)} predictions have no letter_mass: a served "
                          f"model's predictions mixed with a local model's")
    mass = np.array([p.letter_mass for p in served], dtype=np.float64)
    n_missing = np.array([len(p.missing) for p in served])
    k = np.array([len(p.probs) for p in served])
    return {
        "n": int(len(served)),
        "mean_letter_mass": float(mass.mean()),
        "min_letter_mass": float(mass.min()),
        "missing_share": float(np.mean(n_missing > 0)),
        "none_found_share": float(np.mean(n_missing == k)),
        "missing_letters": int(n_missing.sum()),
    }


def metrics_from_predictions(preds: Sequence[Prediction], **kw) -> dict:
    """:func:`compute_metrics` on predictions (zero-padded probs, their answers and subjects).

    Predictions of a served model add a ``letter_coverage`` block (:func:`letter_coverage`)
    and its estimator; a local model's metrics are unchanged.
    """
    probs, answers = stack_probs(preds)
    kw.setdefault("subjects", [p.subject for p in preds])
    m = compute_metrics(probs, answers, **kw)
    cov = letter_coverage(preds)
    if cov is not None:
        m["letter_coverage"] = cov
        m["estimators"]["letter_coverage"] = COVERAGE_ESTIMATOR
    return m
