"""Tests for the post-hoc calibrators beyond temperature scaling (llmcal.posthoc.scaling, label_free, topconf)."""
from __future__ import annotations

import numpy as np
import pytest

from llmcal.errors import LlmcalError
from llmcal.posthoc import (BatchCalibrator, BiasCorrector, ContextualCalibrator, HistogramBinning,
                            IsotonicCalibrator, MatrixScaler, PlattScaler, VectorScaler)
from llmcal.predictions import softmax


def log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def draw(rng, p):
    u = rng.uniform(size=(len(p), 1))
    return np.minimum((np.cumsum(p, axis=1) < u).sum(axis=1), p.shape[1] - 1)


# ---------------------------------------------------------------------------- vector / bias / matrix

def test_vector_scaling_recovers_a_known_per_class_scale():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(30000, 4)) * 2.0
    w = np.array([0.5, 1.0, 2.0, 1.5])
    b = np.array([0.3, 0.0, -0.2, 0.1])
    y = draw(rng, softmax(log_softmax(z) * w + b))
    vs = VectorScaler().fit(z, y)
    assert vs.scale_ == pytest.approx(w, rel=0.07)  # sampling noise at N = 30,000: a few percent
    assert vs.bias_ == pytest.approx(b - b.mean(), abs=0.08)
    assert vs.nll_after_ < vs.nll_before_
    # the identity is the start: data drawn from the model itself leaves w near 1
    y0 = draw(rng, softmax(z))
    assert VectorScaler().fit(z, y0).scale_ == pytest.approx(np.ones(4), abs=0.06)


def test_bias_correction_recovers_a_letter_bias_and_handles_mixed_k():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(20000, 4)) * 1.5
    bias = np.array([1.0, 0.0, -0.5, -0.5])  # the model over-weights "A": the data do not
    y = draw(rng, softmax(z))
    fitted = BiasCorrector().fit(z + bias, y)
    assert fitted.bias_ == pytest.approx(-(bias - bias.mean()), abs=0.05)
    # ragged input: 3- and 4-option questions, output ragged too
    rows = [z[i, : 3 + i % 2] for i in range(2000)]
    ans = [int(min(y[i], len(rows[i]) - 1)) for i in range(2000)]
    bc = BiasCorrector().fit(rows, ans)
    out = bc.transform(rows[:5])
    assert [len(r) for r in out] == [len(r) for r in rows[:5]]
    probs = bc.predict_proba(rows[:5])
    assert probs.sum(axis=1) == pytest.approx(np.ones(5))
    assert probs[0, 3] == 0.0  # padding of a 3-option question


def test_matrix_scaling_refuses_mixed_k_and_regularises_off_diagonal():
    rng = np.random.default_rng(2)
    with pytest.raises(LlmcalError, match="mixes K = 3, 4"):
        MatrixScaler().fit([np.zeros(3), np.ones(4), np.zeros(3)], [0, 1, 2])
    z = rng.normal(size=(20000, 3)) * 2.0
    true_w = np.array([[1.2, 0.3, 0.0], [0.0, 0.8, 0.0], [0.2, 0.0, 1.0]])
    y = draw(rng, softmax(log_softmax(z) @ true_w.T))
    free = MatrixScaler(off_diagonal=0.0, bias=0.0).fit(z, y)
    # log-probabilities sum-normalise each row, so W is identified up to adding a constant to each column
    centred = free.weights_ - free.weights_.mean(axis=0)
    assert centred == pytest.approx(true_w - true_w.mean(axis=0), abs=0.08)
    strong = MatrixScaler(off_diagonal=1e4, bias=1e4).fit(z, y)
    off = ~np.eye(3, dtype=bool)
    assert np.abs(strong.weights_[off]).max() < 0.02 < np.abs(free.weights_[off]).max()
    with pytest.raises(LlmcalError, match="fitted on 3-option"):
        strong.transform(np.zeros((2, 4)))


def test_scalers_need_answers_and_a_fit():
    with pytest.raises(LlmcalError, match="not fitted"):
        VectorScaler().transform(np.zeros((2, 3)))
    with pytest.raises(LlmcalError, match="needs the answers"):
        VectorScaler().fit(np.zeros((2, 3)))
    with pytest.raises(LlmcalError, match="out of range"):
        BiasCorrector().fit(np.zeros((2, 3)), [0, 3])


# ---------------------------------------------------------------------------- batch / contextual

def test_batch_calibration_removes_a_constant_letter_bias():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(4000, 4)) * 2.0
    y = draw(rng, softmax(z))
    biased = z + np.array([2.0, 0.0, 0.0, 0.0])
    share_a = np.mean(biased.argmax(axis=1) == 0)
    bc = BatchCalibrator().fit(biased)  # label-free
    q = bc.predict_proba(biased)
    share_true = np.mean(z.argmax(axis=1) == 0)
    assert share_a > share_true + 0.25
    # most of the excess of "A" answers goes (an estimate from the batch mean, not an exact inverse)
    assert np.mean(q.argmax(axis=1) == 0) - share_true < 0.5 * (share_a - share_true)
    acc_biased = np.mean(biased.argmax(axis=1) == y)
    acc_true = np.mean(z.argmax(axis=1) == y)
    assert np.mean(q.argmax(axis=1) == y) > acc_biased + 0.05
    assert np.mean(q.argmax(axis=1) == y) == pytest.approx(acc_true, abs=0.03)
    # the formula: log p - log mean p, renormalised
    p = softmax(biased)
    want = softmax(np.log(p) - np.log(p.mean(axis=0)))
    assert q == pytest.approx(want, abs=1e-12)


def test_batch_calibration_keeps_one_prior_per_k():
    rows = [np.array([2.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0, 0.0]), np.array([1.0, 0.0, 0.0])]
    bc = BatchCalibrator().fit(rows)
    assert set(bc.priors_) == {3, 4}
    assert bc.priors_[3] == pytest.approx((softmax(rows[0]) + softmax(rows[2])) / 2)
    with pytest.raises(LlmcalError, match="no prior for 2-option"):
        bc.transform([np.zeros(2)])


def test_contextual_calibration_divides_by_the_prior():
    prior = np.array([0.5, 0.2, 0.2, 0.1])
    cc = ContextualCalibrator({4: prior}).fit()
    z = np.array([[1.0, 0.5, 0.0, -1.0]])
    p = softmax(z[0])
    want = (p / prior) / (p / prior).sum()
    assert cc.predict_proba(z)[0] == pytest.approx(want)
    with pytest.raises(LlmcalError, match="no content-free prior for K = 3"):
        ContextualCalibrator({4: prior}).fit([np.zeros(3)])
    with pytest.raises(LlmcalError, match="positive probabilities"):
        ContextualCalibrator([0.5, 0.6]).fit()


def test_content_free_distribution_scores_content_free_questions_and_caches(tiny_model_dir, tmp_path, monkeypatch):
    import llmcal.scoring as scoring
    from llmcal.data.schema import Question
    from llmcal.models import load_model, resolve_model
    from llmcal.posthoc import content_free_distribution
    from llmcal.prompts import encode_questions

    lm = load_model(resolve_model(str(tiny_model_dir)), dtype="float32", device="cpu")
    priors = content_free_distribution(lm, "plain", [3, 4], cache=tmp_path)
    assert set(priors) == {3, 4}
    assert priors[4].sum() == pytest.approx(1.0) and priors[4].shape == (4,)
    qs = [Question(id=f"cf{j}", question=s, choices=(s,) * 4, answer=0) for j, s in enumerate(("N/A", "", "[MASK]"))]
    preds = scoring.score(lm.model, lm.tokenizer, encode_questions(qs, lm.tokenizer, "plain"),
                          options=scoring.ScoreOptions(progress=False))
    assert priors[4] == pytest.approx(np.mean([p.probs for p in preds], axis=0), abs=1e-6)
    assert len(list(tmp_path.rglob("*.jsonl"))) == 2  # one store entry per K

    def no_scoring(*a, **k):
        raise AssertionError("a cached prior was scored again")

    monkeypatch.setattr(scoring, "score", no_scoring)
    again = content_free_distribution(lm, "plain", 4, cache=tmp_path)
    assert again[4] == pytest.approx(priors[4])


# ---------------------------------------------------------------------------- top-label recalibrators

def overconfident(rng, n, k=4):
    z = rng.normal(size=(n, k)) * 3.0
    y = draw(rng, softmax(z / 2.5))
    return z, y


def conf_correct(z, y):
    p = softmax(z)
    return p.max(axis=1), (p.argmax(axis=1) == y).astype(float)


def test_platt_matches_scikit_learn_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(4)
    z, y = overconfident(rng, 3000)
    c, r = conf_correct(z, y)
    ps = PlattScaler().fit(z, y)
    x = np.log(np.clip(c, 1e-12, 1 - 1e-12)) - np.log1p(-np.clip(c, 1e-12, 1 - 1e-12))
    lr = LogisticRegression(C=np.inf, tol=1e-10, max_iter=10000).fit(x[:, None], r)
    assert ps.slope_ == pytest.approx(lr.coef_[0, 0], abs=1e-4)
    assert ps.intercept_ == pytest.approx(lr.intercept_[0], abs=1e-4)


def test_isotonic_matches_scikit_learn():
    from sklearn.isotonic import IsotonicRegression

    rng = np.random.default_rng(5)
    z, y = overconfident(rng, 2000)
    c, r = conf_correct(z, y)
    c = np.minimum(np.round(c, 3), 0.999)  # ties in x, merged the same way
    z_tied = np.log(np.stack([c, (1 - c) / 3, (1 - c) / 3, (1 - c) / 3], axis=1))
    y_tied = np.where(r == 1, 0, 1)
    iso = IsotonicCalibrator().fit(z_tied, y_tied)
    ref = IsotonicRegression(out_of_bounds="clip").fit(c, r)
    grid = np.linspace(0.2, 1.0, 500)
    assert iso.map_confidence(grid) == pytest.approx(ref.predict(grid), abs=1e-12)


def test_isotonic_pools_violators_weighted_by_the_questions_at_each_confidence():
    # confidences 0.3 (1 wrong), 0.5 (3 right), 0.7 (1 wrong): (0 w1, 1 w3, 0 w1) -> 1 and 0 pool to 3/4
    conf = np.array([0.3, 0.5, 0.5, 0.5, 0.7])
    z = np.log(np.stack([conf] + [(1 - conf) / 3] * 3, axis=1))
    iso = IsotonicCalibrator().fit(z, np.array([1, 0, 0, 0, 1]))
    assert iso.x_ == pytest.approx([0.3, 0.5, 0.7]) and iso.y_ == pytest.approx([0, 0.75, 0.75])
    assert iso.map_confidence(np.array([0.1, 0.4, 0.9])) == pytest.approx([0, 0.375, 0.75])


def _platt_newton_reference(x, y, iters=100):
    """Newton's method on the logistic likelihood, written out (what PlattScaler did before scipy fitted it)."""
    theta, design = np.zeros(2), np.stack([x, np.ones_like(x)], axis=1)
    for _ in range(iters):
        s = 1 / (1 + np.exp(-(design @ theta)))
        step = np.linalg.solve(design.T @ (design * (s * (1 - s))[:, None]), design.T @ (s - y))
        theta = theta - step
        if np.max(np.abs(step)) < 1e-13:
            break
    return theta


def test_platt_equals_the_newton_fit_it_replaced():
    rng = np.random.default_rng(7)
    z, y = overconfident(rng, 1500)
    c, r = conf_correct(z, y)
    ps = PlattScaler().fit(z, y)
    x = np.log(np.clip(c, 1e-12, 1 - 1e-12)) - np.log1p(-np.clip(c, 1e-12, 1 - 1e-12))
    a, b = _platt_newton_reference(x, r)
    assert (ps.slope_, ps.intercept_) == pytest.approx((a, b), abs=1e-8)


def test_histogram_binning_hand_computation():
    # calibration confidences (4 options): 0.35 x2 (1 right), 0.55 x3 (3 right), 0.95 x1 (0 right)
    conf = np.array([0.35, 0.35, 0.55, 0.55, 0.55, 0.95])
    z = np.log(np.stack([conf] + [(1 - conf) / 3] * 3, axis=1))
    y = np.array([0, 1, 0, 0, 0, 2])
    hb = HistogramBinning(n_bins=10).fit(z, y)
    assert hb.bin_count_.tolist() == [0, 0, 0, 2, 0, 3, 0, 0, 0, 1]
    got = hb.map_confidence(np.array([0.31, 0.59, 0.99, 0.75]))
    assert got == pytest.approx([0.5, 1.0, 0.0, 0.75])  # an empty bin keeps the confidence
    # applying it: 0.99 -> 0 would flip the argmax, so it is raised to the floor p2 / (1 - c + p2)
    q = hb.predict_proba(np.log(np.array([[0.99, 0.004, 0.003, 0.003]])))[0]
    floor = 0.004 / (0.01 + 0.004)
    assert q[0] == pytest.approx(floor, rel=1e-9) and q.argmax() == 0
    assert q[1:] / q[1:].sum() == pytest.approx(np.array([0.004, 0.003, 0.003]) / 0.01)


def test_histogram_binning_matches_netcal():
    netcal_binning = pytest.importorskip("netcal.binning")  # optional independent check (heavy package)
    rng = np.random.default_rng(6)
    z, y = overconfident(rng, 3000)
    c, r = conf_correct(z, y)
    ref = netcal_binning.HistogramBinning(bins=10).fit(c, r.astype(int))
    hb = HistogramBinning(n_bins=10).fit(z, y)
    test_c = rng.uniform(0.3, 0.99, size=200)  # away from bin edges (netcal's bins are right-closed)
    test_c = test_c[np.abs(test_c * 10 - np.round(test_c * 10)) > 1e-6]
    assert hb.map_confidence(test_c) == pytest.approx(ref.transform(test_c), abs=1e-12)


@pytest.mark.parametrize("cls", [PlattScaler, IsotonicCalibrator, HistogramBinning])
def test_top_label_methods_keep_argmax_and_rescale_the_rest(cls):
    rng = np.random.default_rng(7)
    z, y = overconfident(rng, 1000)
    cal = cls().fit(z[:600], y[:600])
    p = softmax(z[600:])
    q = cal.predict_proba(z[600:])
    assert q.sum(axis=1) == pytest.approx(np.ones(400))
    assert (q.argmax(axis=1) == p.argmax(axis=1)).all()
    top = p.argmax(axis=1)
    rows = np.arange(400)
    rest_p = np.where(np.arange(4)[None, :] == top[:, None], 0, p)
    rest_q = np.where(np.arange(4)[None, :] == top[:, None], 0, q)
    keep = q[rows, top] < 1 - 1e-9  # where c' = 1 the others are all 0 (isotonic can map to 1)
    assert (rest_q / rest_q.sum(axis=1, keepdims=True))[keep] == pytest.approx(
        (rest_p / rest_p.sum(axis=1, keepdims=True))[keep])
    assert np.all(q[rows, top] >= 0.25 - 1e-12)
    # ragged input works and comes back ragged
    ragged = [z[i, : 2 + i % 3] for i in range(10)]
    assert [len(r) for r in cal.transform(ragged)] == [len(r) for r in ragged]


def test_platt_refuses_a_split_with_one_outcome():
    z = np.array([[2.0, 0.0], [3.0, 0.0], [1.0, 0.0]])
    with pytest.raises(LlmcalError, match="both right and wrong"):
        PlattScaler().fit(z, [0, 0, 0])
