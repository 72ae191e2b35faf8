"""Tests for llmcal.conformal: sets against MAPIE and a loop from the papers' definitions, the guarantee, runs, CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from llmcal.conformal import (SplitConformal, conformal_predictions, conformal_quantile, conformal_run,
                              coverage_range, option_scores)
from llmcal.errors import LlmcalError
from llmcal.predictions import Prediction, softmax, write_predictions


def _probs(seed, n, k=4, scale=2.0):
    rng = np.random.default_rng(seed)
    p = softmax(rng.normal(size=(n, k)) * scale)
    y = np.array([rng.choice(k, p=row) for row in p])
    return p, y


# ---------------------------------------------------------------------------- against MAPIE

mapie = pytest.importorskip("mapie")


def _mapie_sets(score, xc, yc, xt, alpha, **params):
    from mapie.classification import SplitConformalClassifier
    from sklearn.base import BaseEstimator, ClassifierMixin

    class Identity(ClassifierMixin, BaseEstimator):  # the "model" returns the stored probabilities
        def fit(self, x, y):
            self.classes_ = np.arange(x.shape[1])
            self.n_features_in_ = x.shape[1]
            return self

        def predict_proba(self, x):
            return np.asarray(x)

        def predict(self, x):
            return np.argmax(x, axis=1)

    class NoRandomisation(np.random.RandomState):  # MAPIE's APS subtracts u * p_y; u = 0 is the plain score
        def uniform(self, low=0.0, high=1.0, size=None):
            return np.zeros(size)

    m = SplitConformalClassifier(estimator=Identity().fit(xc, yc), confidence_level=1 - alpha,
                                 conformity_score=score, prefit=True, random_state=NoRandomisation(0))
    m.conformalize(xc, yc)
    _, sets = m.predict_set(xt, conformity_score_params=params or None)
    return sets[:, :, 0]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.3])
def test_lac_sets_are_identical_to_mapie(seed, alpha):
    p, y = _probs(seed, 700)
    ours = SplitConformal(alpha, "lac").fit(p[:300], y[:300]).predict_sets(p[300:])
    assert np.array_equal(ours, _mapie_sets("lac", p[:300], y[:300], p[300:], alpha))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.3])
def test_aps_sets_are_mapies_without_randomisation_except_that_mapie_never_returns_an_empty_set(seed, alpha):
    p, y = _probs(seed, 700)
    ours = SplitConformal(alpha, "aps").fit(p[:300], y[:300]).predict_sets(p[300:])
    theirs = _mapie_sets("aps", p[:300], y[:300], p[300:], alpha, include_last_label=False)
    empty = ours.sum(axis=1) == 0
    assert np.array_equal(ours[~empty], theirs[~empty])
    top = np.eye(4, dtype=bool)[p[300:].argmax(axis=1)]
    assert np.array_equal(theirs[empty], top[empty])  # MAPIE keeps the most probable option
    assert 0 < empty.sum() or alpha < 0.1  # the case is exercised where sets get small


# ---------------------------------------------------------------------------- against the definitions

def _raps_loop(p_row, y_or_k, lam, k_reg):
    """RAPS score of option k as Angelopoulos et al. (2021) write it: options sorted by probability, cumulative
    mass up to and including k, plus lam * (rank - k_reg)^+."""
    order = sorted(range(len(p_row)), key=lambda j: -p_row[j])
    total = 0.0
    for rank, j in enumerate(order, 1):
        total += p_row[j]
        if j == y_or_k:
            return total + lam * max(0, rank - k_reg)
    raise AssertionError


@pytest.mark.parametrize("lam,k_reg", [(0.0, 1), (0.1, 1), (0.05, 2)])
def test_raps_sets_match_a_loop_over_the_definition(lam, k_reg):
    p, y = _probs(3, 500)
    cal = sorted(_raps_loop(p[i], y[i], lam, k_reg) for i in range(200))
    q = cal[math.ceil(201 * 0.9) - 1]
    expected = np.array([[_raps_loop(p[i], k, lam, k_reg) <= q for k in range(4)] for i in range(200, 500)])
    ours = SplitConformal(0.1, "raps", lam=lam, k_reg=k_reg).fit(p[:200], y[:200]).predict_sets(p[200:])
    assert np.array_equal(ours, expected)
    if lam == 0.0:  # no penalty: RAPS is APS
        assert np.array_equal(ours, SplitConformal(0.1, "aps").fit(p[:200], y[:200]).predict_sets(p[200:]))


def test_quantile_hand_cases():
    s = [0.5, 0.1, 0.9, 0.3]  # sorted 0.1 0.3 0.5 0.9; n = 4
    assert conformal_quantile(s, 0.4) == 0.5  # ceil(5 * 0.6) = 3rd smallest
    assert conformal_quantile(s, 0.2) == 0.9  # ceil(4) = 4th
    assert math.isinf(conformal_quantile(s, 0.1))  # ceil(4.5) = 5 > n: every set is full
    with pytest.raises(LlmcalError, match="alpha"):
        conformal_quantile(s, 1.0)


def test_aps_ties_count_each_other_not_above_and_padded_options_never_enter():
    s = option_scores([np.array([0.4, 0.4, 0.2]), np.array([0.5, 0.5])], "aps")
    assert s[0].tolist() == pytest.approx([0.4, 0.4, 1.0]) and s[1, :2].tolist() == pytest.approx([0.5, 0.5])
    assert math.isinf(s[1, 2])
    p = [np.array([0.5, 0.5]), np.array([0.2, 0.3, 0.5])] * 20
    sets = SplitConformal(0.01, "lac").fit(p, [0, 1] * 20).predict_sets(p)  # q = inf: the full sets
    assert sets[0].tolist() == [True, True, False] and sets[1].tolist() == [True, True, True]


def test_coverage_is_guaranteed_on_exchangeable_data_and_close_to_the_target():
    """Over many calibration/test draws the mean coverage is in [1 - alpha, 1 - alpha + 1/(n+1)]."""
    alpha, n = 0.1, 99
    covs = []
    for seed in range(300):
        p, y = _probs(seed, n + 200)
        sets = SplitConformal(alpha, "lac").fit(p[:n], y[:n]).predict_sets(p[n:])
        covs.append(sets[np.arange(200), y[n:]].mean())
    mean, se = float(np.mean(covs)), float(np.std(covs) / np.sqrt(len(covs)))
    assert 1 - alpha - 3 * se <= mean <= 1 - alpha + 1 / (n + 1) + 3 * se
    lo, hi = coverage_range(n, 200, alpha)
    inside = np.mean([(lo <= c <= hi) for c in covs])
    assert 0.9 <= inside <= 1.0  # the beta-binomial 95% range holds about 95% of the draws


def test_mondrian_thresholds_are_each_groups_own_and_an_unseen_group_gets_the_full_set():
    p, y = _probs(5, 600)
    g = np.array(["a", "b", "c"])[np.arange(600) % 3]
    cp = SplitConformal(0.2, "lac").fit(p[:400], y[:400], groups=g[:400])
    for name in ("a", "b", "c"):
        own = SplitConformal(0.2, "lac").fit(p[:400][g[:400] == name], y[:400][g[:400] == name])
        assert cp.qhat_by_group_[name] == own.qhat_
    test_groups = list(g[400:])
    test_groups[0] = "new"
    sets = cp.predict_sets(p[400:], test_groups)
    assert sets[0].all() and not sets[1:].all()
    with pytest.raises(LlmcalError, match="Mondrian"):
        cp.predict_sets(p[400:])


# ---------------------------------------------------------------------------- predictions and runs

def _preds(seed, n, subjects=("x", "y")):
    p, y = _probs(seed, n)
    return [Prediction.from_logits(f"q{i}", subjects[i % len(subjects)], int(y[i]), np.log(p[i])) for i in range(n)]


def test_conformal_predictions_summary_and_by_subject():
    preds = _preds(0, 500)
    res = conformal_predictions(preds[:200], preds[200:], alpha=0.1, by="subject")
    d = res.to_dict()
    assert d["n_calib"] == 200 and d["n"] == 300 and len(d["sets"]) == 300
    assert set(d["per_group"]) == {"x", "y"} and sum(v["n"] for v in d["per_group"].values()) == 300
    sizes = np.array([len(s["set"]) for s in d["sets"]])
    assert d["mean_size"] == pytest.approx(sizes.mean()) and d["empty_share"] == pytest.approx(np.mean(sizes == 0))
    covered = np.mean([p.answer in s["set"] for p, s in zip(preds[200:], d["sets"])])
    assert d["coverage"] == pytest.approx(covered) and d["coverage_ci"][0] <= covered <= d["coverage_ci"][1]
    assert len(d["sweep"]["alpha"]) == len(d["sweep"]["coverage"]) == 25
    assert d["sweep"]["coverage"][4] == pytest.approx(d["coverage"])  # alpha 0.10 is on the grid
    with pytest.raises(LlmcalError, match="--by subject"):
        conformal_predictions(preds[:200], preds[200:], mondrian=True)


def _make_run(path, preds, *, calib=None, method="none", meta=None):
    from llmcal.runs import RunDir, RunResult

    rd = RunDir(path)
    rd.start({"model": "fake", "seed": 0, "n_bins": 10, "template": "plain"})
    write_predictions(rd.file("predictions.jsonl"), preds)
    if calib is not None:
        write_predictions(rd.file("predictions-calib.jsonl"), calib)
    rd.finish(kind="eval", model="fake", results=[RunResult(label=method, method=method, dataset="mcq", split="all",
                                                            predictions="predictions.jsonl", metrics={})],
              meta={"template": "plain", **(meta or {})})
    return path


def test_conformal_run_uses_the_posthoc_calibration_slice_and_writes_its_files(tmp_path):
    from llmcal.posthoc.compare import posthoc_split

    preds = _preds(1, 400)
    run = _make_run(tmp_path / "run", preds)
    res, files = conformal_run(run, alpha=0.2, score="aps")
    calib, test = posthoc_split(preds, 0)
    assert res.calibration_ids == [p.id for p in calib] and [s["id"] for s in res.sets] == [p.id for p in test]
    doc = json.loads((run / "conformal" / "conformal.json").read_text())
    for key in ("alpha", "score", "qhat", "calibration_ids", "sets", "coverage", "coverage_ci", "mean_size",
                "singleton_share", "empty_share", "sweep"):
        assert key in doc
    assert doc["alpha"] == 0.2 and doc["score"] == "aps" and "hash_unit" in doc["source"]["split"]
    assert (run / "conformal" / "conformal-alpha.png").stat().st_size > 1000
    md = (run / "conformal" / "conformal.md").read_text()
    assert "## Conformal prediction sets" in md and "conformal-alpha.png" in md
    # the table is the report engine's: 3 significant digits, the coverage's interval after it
    from llmcal.report.tables import SIG, format_value

    cell = format_value(res.summary["coverage"], res.summary["coverage_ci"], sig=SIG)
    assert f"| {len(calib)} | {len(test)} | {format_value(res.qhat, sig=SIG)} | {cell} | \\[" in md  # [lo, hi], escaped
    assert "| result | n calib | n test | qhat | coverage | expected | mean size | singleton share | empty share |" in md
    assert str(tmp_path) not in (run / "conformal" / "conformal.json").read_text()


def test_conformal_run_on_a_ts_result_divides_the_calibration_logits_by_the_temperature(tmp_path):
    calib = _preds(2, 150)
    test = [Prediction.from_logits(p.id, p.subject, p.answer, np.asarray(p.logits) / 2.0) for p in _preds(3, 150)]
    run = _make_run(tmp_path / "r", test, calib=calib, method="ts", meta={"temperature": 2.0})
    res, _ = conformal_run(run, alpha=0.1)
    scaled = [Prediction.from_logits(p.id, p.subject, p.answer, np.asarray(p.logits) / 2.0) for p in calib]
    ref = SplitConformal(0.1, "lac").fit([np.asarray(p.probs) for p in scaled], [p.answer for p in scaled])
    assert res.qhat == pytest.approx(ref.qhat_) and "temperature 2" in res.source["split"]


def test_cli_conformal_writes_and_refuses_bad_input(tmp_path):
    from typer.testing import CliRunner

    from llmcal.cli import app

    run = _make_run(tmp_path / "r", _preds(4, 300))
    r = CliRunner().invoke(app, ["conformal", "--from", str(run), "--alpha", "0.1", "--score", "raps",
                                 "--by", "subject", "--mondrian"])
    assert r.exit_code == 0, r.output
    doc = json.loads((run / "conformal" / "conformal.json").read_text())
    assert doc["mondrian"] and set(doc["qhat_by_group"]) == {"x", "y"} and doc["params"] == {"lambda": 0.1, "k_reg": 1}
    for args, msg in ((["--score", "thr"], "unknown conformity score"), (["--alpha", "0"], "alpha"),
                      (["--by", "topic"], "the only grouping")):
        r = CliRunner().invoke(app, ["conformal", "--from", str(run), "--out", str(tmp_path / "x"), *args])
        assert r.exit_code == 2 and msg in r.output
