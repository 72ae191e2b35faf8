"""Option-order debiasing (llmcal.debias): exact mapping back, PriDe's prior, the eval runs, CLI and resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from llmcal import debias
from llmcal.data.schema import Question
from llmcal.errors import LlmcalError
from llmcal.evaluate import EvalConfig, run_eval
from llmcal.predictions import Prediction, load_predictions, softmax
from llmcal.runs import RunDir

DATA = "synthetic:arithmetic?n=40&k=4&difficulty=2"


def _q(k=4, answer=1, qid="q"):
    return Question(id=qid, question="which?", choices=tuple(f"c{j}" for j in range(k)), answer=answer)


# ---------------------------------------------------------------------------- hand-made arrays
def test_cyclic_shift_moves_every_option_and_the_answer_consistently():
    q = _q(k=5, answer=3)
    for s in range(5):
        p = debias.cyclic_shift(q, s)
        assert p.choices[p.answer] == q.choices[q.answer]
        for i in range(5):
            assert p.choices[i] == q.choices[(i + s) % 5]
    assert debias.cyclic_shift(q, 0) == q
    # a one-hot on the letter where option j sits comes back as a one-hot on option j
    for s in range(5):
        p = debias.cyclic_shift(q, s)
        for j in range(5):
            letter = p.choices.index(q.choices[j])
            back = debias.unshift(np.eye(5)[letter], s)
            assert np.argmax(back) == j and back.sum() == 1


def test_a_pure_position_bias_becomes_uniform_after_cyclic_averaging():
    prior = np.array([0.55, 0.25, 0.15, 0.05])
    observed = np.tile(prior, (4, 1))  # the same letter probabilities whatever the content
    avg = debias.cyclic_average(observed)
    np.testing.assert_allclose(avg, np.full(4, 0.25), atol=1e-15)
    # and a content-only model is left as it is
    r = np.array([0.1, 0.6, 0.2, 0.1])
    observed = np.array([[r[(i + s) % 4] for i in range(4)] for s in range(4)])
    np.testing.assert_allclose(debias.cyclic_average(observed), r, atol=1e-15)


def _decomposed(prior, intrinsic):
    """q_s(i) ∝ prior(i) r(o_{(i+s) mod K}): the model PriDe assumes, as logits (K shifts x K letters)."""
    k = len(prior)
    return np.array([[np.log(prior[i]) + np.log(intrinsic[(i + s) % k]) + 3.0 * s for i in range(k)]
                     for s in range(k)])


def test_pride_recovers_a_known_prior_and_the_intrinsic_prediction():
    rng = np.random.default_rng(0)
    prior = np.array([0.4, 0.3, 0.2, 0.1])
    intrinsic = [rng.dirichlet(np.ones(4)) for _ in range(30)]
    logits = [_decomposed(prior, r) for r in intrinsic]
    for lg in logits:
        np.testing.assert_allclose(debias.sample_prior(lg), prior, atol=1e-12)
    est = debias.estimate_prior(logits)
    np.testing.assert_allclose(est, prior, atol=1e-12)
    for lg, r in zip(logits, intrinsic):  # shift 0 with the prior divided out is the content term
        np.testing.assert_allclose(debias.divide_prior(lg[0], est), r, atol=1e-12)
    lp = debias.letter_prior(logits, n_bootstrap=200, seed=0)
    np.testing.assert_allclose(lp["pride_prior"], prior, atol=1e-12)
    assert all(lo <= v <= hi for v, (lo, hi) in zip(lp["mean_prob"], lp["mean_prob_ci"]))
    assert lp["mean_prob"][0] > 0.25 > lp["mean_prob"][3]  # the arithmetic mean shows the same bias
    assert sum(lp["pick_share"]) == pytest.approx(1.0)


def test_letter_prior_of_an_unbiased_model_is_uniform_within_its_interval():
    rng = np.random.default_rng(1)
    logits = []
    for _ in range(200):
        r = rng.dirichlet(np.ones(4))
        logits.append(np.log([[r[(i + s) % 4] for i in range(4)] for s in range(4)]))
    lp = debias.letter_prior(logits, n_bootstrap=500, seed=0)
    for v, (lo, hi) in zip(lp["mean_prob"], lp["mean_prob_ci"]):
        assert v == pytest.approx(0.25, abs=1e-12) and lo <= 0.25 <= hi


def _preds_from(prior, intrinsic, k=4):
    qs = [_q(k=k, answer=i % k, qid=f"q{i}") for i in range(len(intrinsic))]
    shifted, origin = debias.permuted_questions(qs)
    plain, permuted = [], []
    for q, r in zip(qs, intrinsic):
        lg = _decomposed(prior, r)
        plain.append(Prediction.from_logits(q.id, None, q.answer, lg[0]))
        permuted += [Prediction.from_logits(debias.shift_id(q.id, s), None, (q.answer - s) % k, lg[s])
                     for s in range(1, k)]
    return qs, plain, permuted, origin


def test_debias_predictions_cyclic_keeps_every_shift_in_the_original_order():
    rng = np.random.default_rng(2)
    prior = np.array([0.7, 0.1, 0.1, 0.1])
    intrinsic = [rng.dirichlet(np.ones(4)) for _ in range(12)]
    qs, plain, permuted, origin = _preds_from(prior, intrinsic)
    deb = debias.debias_predictions(plain, permuted, origin, "cyclic", n_bootstrap=50)
    for rec, p, r in zip(deb.records, deb.predictions, intrinsic):
        perms = np.array(rec["permutations"])
        assert perms.shape == (4, 4)
        np.testing.assert_allclose(perms[0], plain[[x.id for x in plain].index(p.id)].probs, atol=1e-15)
        np.testing.assert_allclose(p.probs, perms.mean(axis=0), atol=1e-12)
        for s in range(4):  # every shift, mapped back, is prior-times-content in the original order
            want = prior[(np.arange(4) - s) % 4] * r
            np.testing.assert_allclose(perms[s], want / want.sum(), atol=1e-12)
    assert deb.prior_used is None and len(deb.subset_ids) == 12


def test_debias_predictions_pride_divides_the_subset_prior_out_of_every_question():
    rng = np.random.default_rng(3)
    prior = np.array([0.1, 0.2, 0.3, 0.4])
    intrinsic = [rng.dirichlet(np.ones(4)) for _ in range(20)]
    qs, plain, permuted, origin = _preds_from(prior, intrinsic)
    keep = {"q3", "q7"}
    some = [p for p in permuted if origin[p.id][0].id in keep]
    deb = debias.debias_predictions(plain, some, origin, "pride", n_bootstrap=50)
    np.testing.assert_allclose(deb.prior_used["4"], prior, atol=1e-12)
    for p, r in zip(deb.predictions, intrinsic):
        np.testing.assert_allclose(p.probs, r, atol=1e-10)
    assert sorted(deb.subset_ids) == sorted(keep)
    assert [("permutations" in rec) for rec in deb.records] == [p.id in keep for p in plain]
    with pytest.raises(LlmcalError, match="every shift"):
        debias.debias_predictions(plain, some, origin, "cyclic")


def test_pride_subset_is_seeded_per_option_count_and_order_free():
    qs = [_q(k=4, qid=f"a{i}") for i in range(100)] + [_q(k=3, qid=f"b{i}") for i in range(7)]
    sub = debias.pride_subset(qs, 0.05, seed=0)
    assert sum(q.k == 4 for q in sub) == 5 and sum(q.k == 3 for q in sub) == 1
    assert {q.id for q in debias.pride_subset(list(reversed(qs)), 0.05, seed=0)} == {q.id for q in sub}
    assert {q.id for q in debias.pride_subset(qs, 0.05, seed=1)} != {q.id for q in sub}
    assert debias.forward_passes(qs, "cyclic") == 100 * 4 + 7 * 3
    assert debias.forward_passes(qs, "pride", sub) == 107 + 5 * 3 + 1 * 2


def test_shifted_ids_that_collide_with_a_real_question_are_refused():
    with pytest.raises(LlmcalError, match="rename"):
        debias.permuted_questions([_q(qid="x"), _q(qid="x#shift1")])


# ---------------------------------------------------------------------------- eval runs on the tiny model
def _cfg(tiny_model_dir, **kw):
    return EvalConfig(model=str(tiny_model_dir), data=DATA, template="plain", batch_tokens=400, n_bootstrap=50, **kw)


def test_cyclic_eval_maps_every_scored_shift_back_exactly(tiny_model_dir, tmp_path):
    rec = run_eval(_cfg(tiny_model_dir, permutations="cyclic"), tmp_path / "r", progress=False)
    out = tmp_path / "r"
    assert [r.label for r in rec.results] == ["none", "debiased"]
    plain = {p.id: p for p in load_predictions(out / "predictions-none.jsonl")}
    scored = {p.id: p for p in load_predictions(out / "scores-permuted.jsonl")}
    assert len(plain) == 40 and len(scored) == 40 * 3
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    for d in lines:
        perms = np.array(d["permutations"])
        np.testing.assert_allclose(perms[0], plain[d["id"]].probs, atol=1e-12)
        for s in (1, 2, 3):
            sp = scored[f"{d['id']}#shift{s}"]
            assert (sp.answer + s) % 4 == d["answer"]
            np.testing.assert_allclose(perms[s], np.roll(sp.probs, s), atol=1e-12)
        np.testing.assert_allclose(d["probs"], perms.mean(axis=0), atol=1e-9)
    # the same plain predictions as a plain eval of the same questions
    ref = run_eval(_cfg(tiny_model_dir), tmp_path / "plain", progress=False)
    assert (tmp_path / "plain" / "predictions.jsonl").read_bytes() == (out / "predictions-none.jsonl").read_bytes()
    assert ref.results[0].metrics["accuracy"] == rec.results[0].metrics["accuracy"]
    meta = json.loads((out / "metrics.json").read_text())["meta"]["debias"]
    assert meta["forward_passes"] == 160 and meta["letter_prior"]["4"]["n_questions"] == 40
    report = (out / "report.md").read_text()
    assert "## Option-order debiasing" in report and "160 forward passes" in report
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["permutations"] == "cyclic" and "pride_fraction" not in cfg
    assert "permutations" not in json.loads((tmp_path / "plain" / "config.json").read_text())


def test_pride_eval_scores_only_the_subset_again(tiny_model_dir, tmp_path):
    rec = run_eval(_cfg(tiny_model_dir, permutations="pride", pride_fraction=0.1), tmp_path / "r", progress=False)
    out = tmp_path / "r"
    meta = rec.meta["debias"]
    assert meta["n_subset"] == 4 and meta["forward_passes"] == 40 + 4 * 3
    assert len(load_predictions(out / "scores-permuted.jsonl")) == 12
    prior = np.array(meta["prior_used"]["4"])
    plain = load_predictions(out / "predictions-none.jsonl")
    for p, d in zip(plain, load_predictions(out / "predictions.jsonl")):
        np.testing.assert_allclose(d.probs, softmax(np.array(p.logits) - np.log(prior)), atol=1e-12)
    assert rec.results[1].extra["forward_passes"] == 52
    assert "accuracy_ci" in rec.results[1].extra
    assert rec.main.label == "debiased" and rec.metrics == rec.results[1].metrics


class Boom(Exception):
    pass


def test_a_killed_debiased_eval_resumes_to_the_same_files(tiny_model_dir, tmp_path, monkeypatch):
    cfg = _cfg(tiny_model_dir, permutations="cyclic")
    run_eval(cfg, tmp_path / "ref", progress=False)
    import llmcal.io as io

    real = io.JsonlAppender.write
    count = {"n": 0}

    def dying(self, record):
        if count["n"] >= 70:  # the plain pass (40) and part of the shifted one
            raise Boom()
        count["n"] += 1
        real(self, record)

    monkeypatch.setenv("LLMCAL_SCORE_CACHE", "0")
    monkeypatch.setattr(io.JsonlAppender, "write", dying)
    out = tmp_path / "resumed"
    with pytest.raises(Boom):
        run_eval(cfg, out, progress=False)
    monkeypatch.setattr(io.JsonlAppender, "write", real)
    assert not RunDir(out).is_complete
    assert 0 < len((out / "scores-permuted.jsonl").read_text().splitlines()) < 120
    run_eval(cfg, out, progress=False)
    for name in ("predictions.jsonl", "predictions-none.jsonl", "scores-permuted.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    a = json.loads((out / "metrics.json").read_text())
    b = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    assert a["results"] == b["results"] and a["meta"]["debias"] == b["meta"]["debias"]
    # another mode is another configuration: refused, not mixed
    with pytest.raises(LlmcalError, match="already holds a complete run"):
        run_eval(_cfg(tiny_model_dir, permutations="pride"), out, progress=False)


def test_debias_options_are_checked(tiny_model_dir, tmp_path):
    from llmcal.evaluate import run_calibrate_ts

    with pytest.raises(LlmcalError, match="--permutations 'shuffle'"):
        run_eval(_cfg(tiny_model_dir, permutations="shuffle"), tmp_path / "a", progress=False)
    with pytest.raises(LlmcalError, match="--pride-fraction goes with --permutations pride"):
        run_eval(_cfg(tiny_model_dir, permutations="cyclic", pride_fraction=0.2), tmp_path / "b", progress=False)
    with pytest.raises(LlmcalError, match="--pride-fraction must be"):
        run_eval(_cfg(tiny_model_dir, permutations="pride", pride_fraction=0.0), tmp_path / "c", progress=False)
    with pytest.raises(LlmcalError, match="applies to llmcal eval"):
        run_calibrate_ts(_cfg(tiny_model_dir, permutations="cyclic"), tmp_path / "d", progress=False)


def test_cli_eval_permutations_pride(tiny_model_dir, tmp_path):
    from llmcal.cli import app

    out = tmp_path / "cli"
    r = CliRunner().invoke(app, ["eval", "-m", str(tiny_model_dir), "-d", DATA, "--template", "plain",
                                 "--n-bootstrap", "30", "--permutations", "pride", "--pride-fraction", "0.25",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "metrics.json").read_text())
    assert [x["label"] for x in doc["results"]] == ["none", "debiased"]
    assert doc["meta"]["debias"]["n_subset"] == 10 and doc["meta"]["debias"]["pride_fraction"] == 0.25
    assert "PriDe prior" in (out / "report.md").read_text()
    r = CliRunner().invoke(app, ["eval", "-m", str(tiny_model_dir), "-d", DATA, "--permutations", "all",
                                 "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "--permutations 'all'" in r.output


def test_debias_section_tables_come_from_the_report_engine():
    """The section's tables are the engine's (``markdown_table``, 3 significant digits, intervals after the value)."""
    from llmcal.debias import debias_section

    prior = {"n_questions": 40, "uniform": 0.25, "letters": ["A", "B", "C", "D"],
             "mean_prob": [0.2081, 0.3042, 0.27, 0.2177], "mean_prob_ci": [[0.199, 0.218]] * 4,
             "pride_prior": [0.25] * 4, "pride_prior_ci": [[0.24, 0.26]] * 4,
             "pick_share": [0.1, 0.38, 0.3, 0.22], "pick_share_ci": [[0.05, 0.15]] * 4}
    summary = {"mode": "pride", "n_subset": 40, "pride_fraction": 0.2, "seed": 0, "forward_passes": 320,
               "n_questions": 200, "cost": "1.6 passes per question", "letter_prior": {4: prior},
               "prior_used": {4: [0.21, 0.30, 0.27, 0.22]},
               "change": {"accuracy": -0.025, "accuracy_ci": [-0.07, 0.02], "conf_ece": 0.0021,
                          "conf_ece_ci": [-0.05, 0.06]}}
    metrics = {"accuracy": 0.52, "conf_ece": 0.0741, "brier": 0.61234, "nll": 1.23456,
               "ci": {"accuracy": [0.45, 0.59], "conf_ece": [0.05, 0.12]}}
    text = debias_section(summary, metrics, {**metrics, "accuracy": 0.495})
    assert "| letter | mean probability | PriDe prior | argmax share | divided out |" in text
    assert "| A | 0.208 [0.20, 0.22] | 0.250 [0.24, 0.26] | 0.100 [0.05, 0.15] | 0.210 |" in text
    assert "| result | accuracy | conf-ECE | Brier | NLL |" in text
    assert "| none | 0.520 [0.45, 0.59] | 0.0741 [0.05, 0.12] | 0.612 | 1.23 |" in text
    assert "| debiased | 0.495 [0.45, 0.59] |" in text
    assert "accuracy -0.0250 [-0.070, 0.020], conf-ECE +0.00210 [-0.050, 0.060]." in text
