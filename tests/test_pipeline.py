"""Tests for llmcal.pipeline and llmcal.cache: one run lifecycle, and the scoring cache that makes the
unchanged model's scores once."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llmcal.cache import ScoreCache
from llmcal.evaluate import EvalConfig, run_eval
from llmcal.runs import portable, recorded_path

DATA = "synthetic:arithmetic?n=40&k=4&difficulty=2"


@pytest.fixture
def scored(monkeypatch):
    """Counts the questions that reach the scoring engine."""
    import llmcal.pipeline as pl

    calls = []
    real = pl._score_into

    def counting(run, filename, loaded, questions, *a, **kw):
        calls.append(len(questions))
        return real(run, filename, loaded, questions, *a, **kw)

    monkeypatch.setattr(pl, "_score_into", counting)
    return calls


def _cfg(model_dir, **kw):
    return EvalConfig(model=str(model_dir), data=DATA, template="plain", batch_tokens=400, n_bootstrap=20, **kw)


def test_the_same_model_on_the_same_questions_is_scored_once(tiny_model_dir, tmp_path, scored):
    a = run_eval(_cfg(tiny_model_dir), tmp_path / "a", progress=False)
    b = run_eval(_cfg(tiny_model_dir), tmp_path / "b", progress=False)
    assert scored == [40]  # the second run came from the cache
    assert (tmp_path / "a/predictions.jsonl").read_bytes() == (tmp_path / "b/predictions.jsonl").read_bytes()
    assert a.results[0].metrics["accuracy"] == b.results[0].metrics["accuracy"]
    # anything that changes the numbers changes the key: another template, another question set
    run_eval(_cfg(tiny_model_dir, limit=30), tmp_path / "c", progress=False)
    run_eval(EvalConfig(model=str(tiny_model_dir), data=DATA, template="chat", batch_tokens=400, n_bootstrap=20),
             tmp_path / "d", progress=False)
    assert scored == [40, 30, 40]


def test_a_damaged_cache_entry_is_recomputed_never_trusted(tiny_model_dir, tmp_path, scored):
    run_eval(_cfg(tiny_model_dir), tmp_path / "a", progress=False)
    import llmcal.cache

    entries = list(Path(llmcal.cache.default_cache_dir()).rglob("*.jsonl"))
    assert len(entries) == 1
    text = entries[0].read_text()
    entries[0].write_text(text.replace('"pred": 0', '"pred": 1', 1) if '"pred": 0' in text else text[:-20])
    run_eval(_cfg(tiny_model_dir), tmp_path / "b", progress=False)
    assert scored == [40, 40]
    assert (tmp_path / "a/predictions.jsonl").read_bytes() == (tmp_path / "b/predictions.jsonl").read_bytes()
    # the recomputed entry is whole again and serves the next run
    run_eval(_cfg(tiny_model_dir), tmp_path / "c", progress=False)
    assert scored == [40, 40]


def test_cache_get_checks_ids_and_manifest(tmp_path):
    from llmcal.predictions import Prediction

    cache = ScoreCache(tmp_path)
    preds = [Prediction.from_logits(f"q{i}", None, 0, [1.0, float(i)]) for i in range(3)]
    cache.put("ab" * 32, preds)
    assert [p.id for p in cache.get("ab" * 32, ["q0", "q1", "q2"])] == ["q0", "q1", "q2"]
    assert cache.get("ab" * 32, ["q0", "q1"]) is None  # other questions: not this entry (and it is dropped)
    assert cache.get("ab" * 32, ["q0", "q1", "q2"]) is None


def test_run_files_record_no_absolute_path(tiny_model_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": f"{i}+1?", "choices": ["1", "2", "3"],
                                        "answer": i % 3}) + "\n" for i in range(12)))
    out = tmp_path / "runs" / "r"
    run_eval(EvalConfig(model=str(tiny_model_dir), data=str(data), template="plain", n_bootstrap=20), out,
             progress=False)
    for name in ("config.json", "metrics.json", "report.md"):
        text = (out / name).read_text()
        assert str(tmp_path) not in text and not re.search(r'"/(tmp|root|home|work)/', text), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"] == "../../data.jsonl" and recorded_path(cfg["data"], out) == data.resolve()


def test_portable_maps_cache_and_site_packages(tmp_path, monkeypatch):
    import sysconfig

    monkeypatch.setenv("LLMCAL_CACHE", str(tmp_path / "cache"))
    site = sysconfig.get_paths()["purelib"]
    doc = portable({"a": str(tmp_path / "cache/gguf/x"), "b": [f"{site}/pkg/f.gguf"], "c": "rel", "d": 3},
                   tmp_path / "run")
    assert doc == {"a": "<llmcal-cache>/gguf/x", "b": ["<site-packages>/pkg/f.gguf"], "c": "rel", "d": 3}
    assert recorded_path("<llmcal-cache>/gguf/x", tmp_path) == (tmp_path / "cache/gguf/x").resolve()
