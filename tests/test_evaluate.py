"""Evaluation runs: an interrupted evaluation resumes and ends with exactly the uninterrupted predictions."""
from __future__ import annotations

import json

import numpy as np
import pytest

from llmcal.evaluate import EvalConfig, run_eval
from llmcal.runs import RunDir


class Boom(Exception):
    pass


def test_interrupted_eval_resumes_to_identical_predictions(tiny_model_dir, tmp_path, monkeypatch):
    data = "synthetic:arithmetic?n=80&k=4&difficulty=2"
    cfg = EvalConfig(model=str(tiny_model_dir), data=data, template="plain", batch_tokens=200, n_bootstrap=50)
    ref = tmp_path / "ref"
    run_eval(cfg, ref, progress=False)

    # Kill the second run after 30 predictions have been flushed.
    import llmcal.io as io

    real_write = io.JsonlAppender.write
    count = {"n": 0}

    def dying_write(self, record):
        if count["n"] >= 30:
            raise Boom()
        count["n"] += 1
        real_write(self, record)

    out = tmp_path / "resumed"
    monkeypatch.setenv("LLMCAL_SCORE_CACHE", "0")  # this test is about resuming, not about the cache
    monkeypatch.setattr(io.JsonlAppender, "write", dying_write)
    with pytest.raises(Boom):
        run_eval(cfg, out, progress=False)
    monkeypatch.setattr(io.JsonlAppender, "write", real_write)
    assert not RunDir(out).is_complete and (out / "INCOMPLETE").exists()
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert 0 < len(lines) < 80
    # a torn last line, as a kill in the middle of a write leaves it
    with open(out / "predictions.jsonl", "a") as f:
        f.write('{"id": "arith')

    rec = run_eval(cfg, out, progress=False)
    assert RunDir(out).is_complete
    assert (out / "predictions.jsonl").read_bytes() == (ref / "predictions.jsonl").read_bytes()
    assert rec.results[0].metrics["n"] == 80


def test_resume_with_other_config_is_refused(tiny_model_dir, tmp_path):
    from llmcal.errors import LlmcalError

    out = tmp_path / "r"
    RunDir(out).start({"model": "other"})
    cfg = EvalConfig(model=str(tiny_model_dir), data="synthetic:arithmetic?n=10", template="plain")
    with pytest.raises(LlmcalError, match="different configuration"):
        run_eval(cfg, out, progress=False)


@pytest.mark.slow
def test_real_smollm2_handful_of_mmlu_questions(tmp_path):
    from llmcal.models import resolve_model

    resolve_model("smollm2-135m-instruct")  # raises a clear error if the asset package is missing
    cfg = EvalConfig(model="smollm2-135m-instruct", data="mmlu", limit=6, template="chat", n_bootstrap=50)
    rec = run_eval(cfg, tmp_path / "smol", progress=False)
    m = rec.results[0].metrics
    # The reported metrics are those of the written predictions, recomputed here from the file.
    rows = [json.loads(line) for line in (tmp_path / "smol" / "predictions.jsonl").read_text().splitlines()]
    assert m["n"] == len(rows) == 6
    assert m["mean_conf"] == pytest.approx(np.mean([r["conf"] for r in rows]), abs=1e-9)
    assert m["mean_conf"] == pytest.approx(np.mean([max(r["probs"]) for r in rows]), abs=1e-9)
    assert m["accuracy"] == pytest.approx(np.mean([r["pred"] == r["answer"] for r in rows]), abs=1e-12)
    assert all(r["pred"] == int(np.argmax(r["logits"])) for r in rows)
    assert rec.meta["template"] == "chat"


def test_fewshot_eval_uses_train_split_examples_and_equals_the_engine_without_prefix_cache(tiny_model_dir, tmp_path,
                                                                                        mcq_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcal.data import load_dataset
    from llmcal.data.fewshot import choose_shots
    from llmcal.predictions import load_predictions
    from llmcal.prompts import encode_questions
    from llmcal.scoring import ScoreOptions, score

    cfg = EvalConfig(model=str(tiny_model_dir), data=str(mcq_file), split="test", num_fewshot=2, template="plain",
                     n_bootstrap=20, batch_tokens=64)
    rec = run_eval(cfg, tmp_path / "r", progress=False)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["num_fewshot"] == 2
    got = {p.id: p for p in load_predictions(tmp_path / "r" / "predictions.jsonl")}
    test = load_dataset(str(mcq_file), split="test").questions
    train = load_dataset(str(mcq_file), split="train").questions
    assert set(got) == {q.id for q in test} and rec.results[0].metrics["n"] == len(test)
    shots = choose_shots(test, train, 2)
    assert not {s.id for v in shots.values() for s in v} & set(got)  # examples never evaluated
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    enc = encode_questions(test, tok, "plain", shots)
    assert all(e.prefix_len > 0 for e in enc)
    want = score(model, tok, enc, options=ScoreOptions(progress=False, prefix_cache=False))
    for p in want:
        np.testing.assert_allclose(got[p.id].logits, p.logits, rtol=1e-4, atol=1e-5)
    zero = run_eval(EvalConfig(model=str(tiny_model_dir), data=str(mcq_file), split="test", template="plain",
                               n_bootstrap=20), tmp_path / "z", progress=False)
    assert zero.results[0].metrics["n"] == len(test)
    zp = {p.id: p for p in load_predictions(tmp_path / "z" / "predictions.jsonl")}
    assert any(abs(zp[k].logits[0] - got[k].logits[0]) > 1e-3 for k in got)  # the examples change the prompt


def test_fewshot_with_a_too_small_subject_pool_is_an_error(tiny_model_dir, tmp_path, mcq_file):
    from llmcal.errors import LlmcalError

    cfg = EvalConfig(model=str(tiny_model_dir), data=str(mcq_file), split="test", num_fewshot=40, template="plain")
    with pytest.raises(LlmcalError, match="--num-fewshot 40: the train split has"):
        run_eval(cfg, tmp_path / "r", progress=False)
