"""Tests for llmcal.posthoc: temperature scaling."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from llmcal.errors import LlmcalError
from llmcal.metrics import accuracy, conf_ece
from llmcal.posthoc import TemperatureScaler, temperature_scale_predictions
from llmcal.predictions import Prediction, softmax


def sample_answers(rng, logits, t_true):
    """Answers drawn from softmax(logits / t_true) (inverse-CDF sampling, row by row)."""
    p = softmax(logits / t_true)
    u = rng.uniform(size=(len(p), 1))
    return np.minimum((np.cumsum(p, axis=1) < u).sum(axis=1), p.shape[1] - 1)


def nll(logits, answers, t):
    p = softmax(logits / t)
    return float(-np.mean(np.log(p[np.arange(len(answers)), answers])))


@pytest.mark.parametrize("t_true", [0.5, 2.0, 4.0])
def test_recovers_known_temperature(t_true):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(20000, 4)) * 3.0
    y = sample_answers(rng, z, t_true)
    ts = TemperatureScaler().fit(z, y)
    assert ts.temperature_ == pytest.approx(t_true, rel=0.05)


def test_fit_is_the_exact_nll_minimum():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(2000, 5)) * 4.0
    y = sample_answers(rng, z, 2.5)
    ts = TemperatureScaler().fit(z, y)
    ref = minimize_scalar(lambda lt: nll(z, y, np.exp(lt)), bounds=(np.log(0.05), np.log(20.0)),
                          method="bounded", options={"xatol": 1e-10})
    assert ts.temperature_ == pytest.approx(np.exp(ref.x), rel=1e-6)
    assert ts.nll_after_ == pytest.approx(nll(z, y, ts.temperature_), rel=1e-10)
    assert ts.nll_before_ == pytest.approx(nll(z, y, 1.0), rel=1e-10)
    # nothing nearby is lower
    for t in (ts.temperature_ * 0.99, ts.temperature_ * 1.01):
        assert nll(z, y, t) >= ts.nll_after_


def test_reduces_nll_and_ece_of_overconfident_logits_and_keeps_argmax():
    rng = np.random.default_rng(2)
    z_true = rng.normal(size=(5000, 4)) * 1.5
    y = sample_answers(rng, z_true, 1.0)
    z = z_true * 3.0  # overconfident by a factor 3
    ts = TemperatureScaler().fit(z, y)
    assert ts.temperature_ > 1.5
    assert ts.nll_after_ < ts.nll_before_
    p_before, p_after = softmax(z), ts.predict_proba(z)
    assert conf_ece(p_after, y) < conf_ece(p_before, y)
    assert np.array_equal(p_after.argmax(axis=1), z.argmax(axis=1))
    assert accuracy(p_after, y) == accuracy(p_before, y)
    assert np.allclose(ts.transform(z), z / ts.temperature_)
    assert ts.fit(z, y) is ts  # fit returns self


def test_ragged_input_matches_per_row_softmax():
    rng = np.random.default_rng(3)
    ks = rng.integers(2, 6, size=3000)
    rows = [rng.normal(size=k) * 4.0 for k in ks]
    y = np.array([rng.choice(k, p=softmax(r / 2.0)) for k, r in zip(ks, rows)])
    ts = TemperatureScaler().fit(rows, y)
    assert ts.temperature_ == pytest.approx(2.0, rel=0.1)
    t = ts.temperature_
    # the fitted T is the minimum of the ragged NLL
    def ragged_nll(tt):
        return -np.mean([np.log(softmax(r / tt)[a]) for r, a in zip(rows, y)])
    assert ts.nll_after_ == pytest.approx(ragged_nll(t), rel=1e-10)
    assert ragged_nll(t * 1.01) >= ts.nll_after_ and ragged_nll(t * 0.99) >= ts.nll_after_

    scaled = ts.transform(rows)
    assert isinstance(scaled, list) and all(s.shape == r.shape for s, r in zip(scaled, rows))
    assert np.allclose(scaled[0], rows[0] / t)
    probs = ts.predict_proba(rows)
    assert probs.shape == (len(rows), ks.max())
    for i in (0, 1, 2):
        assert np.allclose(probs[i, : ks[i]], softmax(rows[i] / t))
        assert np.all(probs[i, ks[i]:] == 0.0)
    assert np.array_equal(probs.argmax(axis=1), np.array([r.argmax() for r in rows]))


def test_ragged_equal_to_array_when_same_length():
    rng = np.random.default_rng(4)
    z = rng.normal(size=(500, 4)) * 2
    y = rng.integers(0, 4, size=500)
    a = TemperatureScaler().fit(z, y).temperature_
    b = TemperatureScaler().fit(list(z), y).temperature_
    assert a == pytest.approx(b, rel=1e-12)


def test_errors():
    z = np.array([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(LlmcalError, match="not fitted"):
        TemperatureScaler().transform(z)
    with pytest.raises(LlmcalError, match="not fitted"):
        TemperatureScaler().predict_proba(z)
    with pytest.raises(LlmcalError, match="out of range"):
        TemperatureScaler().fit(z, np.array([0, 2]))
    with pytest.raises(LlmcalError, match="out of range"):
        TemperatureScaler().fit([np.array([1.0, 2.0]), np.array([1.0, 2.0, 3.0])], np.array([2, 0]))
    with pytest.raises(LlmcalError, match="one entry per question"):
        TemperatureScaler().fit(z, np.array([0]))
    with pytest.raises(LlmcalError, match="bounds"):
        TemperatureScaler(bounds=(2.0, 1.0)).fit(z, np.array([0, 1]))
    with pytest.raises(LlmcalError, match="non-finite"):
        TemperatureScaler().fit(np.array([[np.nan, 0.0], [0.0, 1.0]]), np.array([0, 1]))
    with pytest.raises(LlmcalError, match="empty"):
        TemperatureScaler().fit(np.zeros((0, 3)), np.zeros(0, dtype=int))


def test_constructor_only_stores_parameters_and_bounds_are_respected():
    ts = TemperatureScaler(init_temperature=2.0, bounds=(0.5, 3.0))
    assert ts.init_temperature == 2.0 and ts.bounds == (0.5, 3.0)
    assert not hasattr(ts, "temperature_")
    # perfectly separable, always-right logits: NLL keeps falling as T -> 0, so the fit sits on the low bound
    z = np.array([[5.0, 0.0], [0.0, 5.0]])
    assert ts.fit(z, np.array([0, 1])).temperature_ == 0.5
    # always-wrong logits: NLL keeps falling as T grows, the fit sits on the high bound
    assert ts.fit(z, np.array([1, 0])).temperature_ == 3.0
    # tied logits: NLL does not depend on T, the initial temperature is kept
    assert ts.fit(np.zeros((3, 4)), np.array([0, 1, 2])).temperature_ == 2.0


def test_temperature_scale_predictions():
    preds = [Prediction.from_logits("q1", "math", 0, [3.0, 1.0, -1.0]),
             Prediction.from_logits("q2", None, 1, [0.0, 2.0])]
    out = temperature_scale_predictions(preds, 2.0)
    assert [p.id for p in out] == ["q1", "q2"] and out[0].subject == "math" and out[1].answer == 1
    assert out[0].logits == pytest.approx((1.5, 0.5, -0.5))
    assert out[0].probs == pytest.approx(tuple(softmax(np.array([1.5, 0.5, -0.5]))))
    assert [p.pred for p in out] == [p.pred for p in preds]
    assert out[0].conf < preds[0].conf
    with pytest.raises(LlmcalError):
        temperature_scale_predictions(preds, 0.0)
    with pytest.raises(LlmcalError):
        temperature_scale_predictions(preds, float("nan"))


def _seeded(seed):
    rng = np.random.default_rng(seed)
    if seed == 2:  # ragged: 2 to 5 options
        z = [rng.normal(size=k) * 4 for k in rng.integers(2, 6, size=300)]
        return z, [int(rng.integers(0, len(r))) for r in z]
    z = rng.normal(size=(400, 4)) * (3 if seed == 0 else 0.5)
    a = rng.integers(0, 4, size=400) if seed == 1 else np.argmax(z + rng.normal(size=z.shape) * 3, axis=1)
    return z, a


@pytest.mark.parametrize("seed, t_before", [(0, 2.389696673424222), (1, 8.163131351801013), (2, 39.76607235537607)])
def test_temperature_scaler_on_the_calibrator_base_fits_the_temperatures_it_fitted_before(seed, t_before):
    from llmcal.posthoc._common import Calibrator

    z, a = _seeded(seed)
    ts = TemperatureScaler().fit(z, a)
    assert isinstance(ts, Calibrator) and ts.n_samples_ == len(a)
    # t_before: the stand-alone TemperatureScaler of commit 830a849 on the same data
    assert ts.temperature_ == pytest.approx(t_before, rel=1e-12)
    assert set(ts.params()) == {"temperature_", "nll_before_", "nll_after_"}
    got = ts.transform(z)
    want = [np.asarray(r) / ts.temperature_ for r in z] if seed == 2 else z / ts.temperature_
    for g, w in zip(got, want):
        assert np.allclose(g, w)
