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
