"""Tests for llmcal.risk: the SGR threshold against a direct search, its guarantee by simulation, the CLI flags."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import binom

from llmcal.errors import LlmcalError
from llmcal.risk import apply_threshold, risk_controlled_threshold


def _sgr_reference(conf, correct, eps, delta):
    """Geifman & El-Yaniv's Algorithm 1 written out with the binomial tail solved by bisection (not a beta quantile)."""
    c = list(conf)
    s = sorted(c)
    m = len(s)
    k = max(1, math.ceil(math.log2(m)))
    lo, hi, best = 0, m - 1, None
    for _ in range(k):
        z = math.ceil((lo + hi) / 2)
        t = s[z]
        ans = [i for i in range(m) if c[i] >= t]
        e = sum(1 for i in ans if not correct[i])
        a, b = 0.0, 1.0  # b* solves P(Bin(n, b) <= e) = delta / k; the tail decreases in b
        for _ in range(200):
            mid = (a + b) / 2
            if binom.cdf(e, len(ans), mid) > delta / k:
                a = mid
            else:
                b = mid
        if e < len(ans) and b < eps:
            best, hi = t, z
        else:
            lo = z
        if lo >= hi:
            break
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("eps", [0.05, 0.15, 0.3])
def test_threshold_is_the_reference_sgr_search(seed, eps):
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.25, 1.0, size=400)
    correct = rng.random(400) < conf
    got = risk_controlled_threshold(conf, correct, eps, 0.1)
    assert got["threshold"] == _sgr_reference(conf, correct, eps, 0.1)
    if got["threshold"] is not None:
        assert got["bound"] < eps and got["answered"] == int(np.sum(conf >= got["threshold"]))


def test_the_guarantee_holds_by_simulation():
    """Calibrated confidences c ~ U(0.25, 1): the selective risk of threshold t is (1 - t) / 2 exactly."""
    eps, delta, fails, certified = 0.2, 0.1, 0, 0
    for seed in range(300):
        rng = np.random.default_rng(1000 + seed)
        conf = rng.uniform(0.25, 1.0, size=300)
        t = risk_controlled_threshold(conf, rng.random(300) < conf, eps, delta)["threshold"]
        if t is not None:
            certified += 1
            fails += (1 - t) / 2 > eps
    assert certified > 150 and fails / 300 <= delta  # non-trivial: most draws certify a threshold


def test_nothing_certified_means_abstain_and_bad_levels_are_refused():
    r = risk_controlled_threshold([0.9] * 10, [False] * 10, 0.1, 0.1)
    assert r["threshold"] is None and r["coverage"] == 0.0
    assert apply_threshold([0.9, 0.8], [True, False], None)["answered"] == 0
    a = apply_threshold([0.9, 0.8, 0.3], [True, False, False], 0.8)
    assert (a["answered"], a["selective_error"]) == (2, 0.5) and a["selective_error_ci"][0] < 0.5 < a["selective_error_ci"][1]
    for bad in (0, 1, -0.1, float("nan")):
        with pytest.raises(LlmcalError, match="strictly between 0 and 1"):
            risk_controlled_threshold([0.5], [True], bad, 0.1)


def test_cli_conformal_with_risk_writes_the_threshold(tmp_path):
    from typer.testing import CliRunner

    from llmcal.cli import app
    from llmcal.predictions import Prediction, softmax, write_predictions
    from llmcal.runs import RunDir, RunResult

    rng = np.random.default_rng(7)
    p = softmax(rng.normal(size=(600, 4)) * 2.0)
    preds = [Prediction.from_logits(f"q{i}", "s", int(rng.choice(4, p=p[i])), np.log(p[i])) for i in range(600)]
    rd = RunDir(tmp_path / "r")
    rd.start({"model": "fake", "seed": 0})
    write_predictions(rd.file("predictions.jsonl"), preds)
    rd.finish(kind="eval", model="fake", results=[RunResult(label="none", method="none", dataset="mcq", split="all",
                                                            predictions="predictions.jsonl", metrics={})], meta={})
    run = rd.path
    r = CliRunner().invoke(app, ["conformal", "--from", str(run), "--risk", "0.5", "--delta", "0.2"])
    assert r.exit_code == 0, r.output
    rc = json.loads((run / "conformal" / "conformal.json").read_text())["risk_control"]
    assert rc["epsilon"] == 0.5 and rc["delta"] == 0.2 and set(rc) >= {"threshold", "calibration", "test"}
    assert "Abstention with a guarantee" in (run / "conformal" / "conformal.md").read_text()
