"""Tests for llmcal.pipeline and llmcal.cache: one run lifecycle, and the scoring cache that makes the
unchanged model's scores once."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llmcal.cache import ScoreCache
from llmcal.evaluate import EvalConfig, run_calibrate_ts, run_eval
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


@pytest.fixture
def weight_loads(monkeypatch):
    """Counts the loads of a model's weights (``models.load_weights``, which every local load goes through)."""
    import llmcal.models as models

    loads = []
    real = models.load_weights

    def counting(spec, *a, **kw):
        loads.append(spec.name)
        return real(spec, *a, **kw)

    monkeypatch.setattr(models, "load_weights", counting)
    return loads


def _no_weights(mp):
    """While ``mp`` (a monkeypatch context) lasts, reading any model's weights fails the test."""
    import transformers

    import llmcal.models as models

    def refuse(*a, **kw):
        raise AssertionError("the model's weights were loaded")

    mp.setattr(models, "load_weights", refuse)
    mp.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def test_a_full_cache_hit_never_loads_the_model(tiny_model_dir, tmp_path, monkeypatch, weight_loads):
    a = run_eval(_cfg(tiny_model_dir), tmp_path / "a", progress=False)
    assert len(weight_loads) == 1  # the first run loaded the weights and scored
    with monkeypatch.context() as mp:
        _no_weights(mp)
        b = run_eval(_cfg(tiny_model_dir), tmp_path / "b", progress=False)
    assert (tmp_path / "a/predictions.jsonl").read_bytes() == (tmp_path / "b/predictions.jsonl").read_bytes()
    assert a.results[0].metrics == b.results[0].metrics and a.meta == b.meta
    # calibrate --method ts scores both parts in one cached pass: the same holds for it
    ts = _cfg(tiny_model_dir, method="ts", limit=30)
    one = run_calibrate_ts(ts, tmp_path / "ts1", progress=False)
    assert len(weight_loads) == 2
    with monkeypatch.context() as mp:
        _no_weights(mp)
        two = run_calibrate_ts(ts, tmp_path / "ts2", progress=False)
    for f in ("scores.jsonl", "predictions.jsonl", "predictions-ts.jsonl"):
        assert (tmp_path / "ts1" / f).read_bytes() == (tmp_path / "ts2" / f).read_bytes(), f
    assert [r.metrics for r in one.results] == [r.metrics for r in two.results]


def test_without_the_cache_or_on_a_miss_the_model_is_loaded(tiny_model_dir, tmp_path, monkeypatch, weight_loads):
    run_eval(_cfg(tiny_model_dir), tmp_path / "a", progress=False)
    monkeypatch.setenv("LLMCAL_SCORE_CACHE", "0")
    run_eval(_cfg(tiny_model_dir), tmp_path / "b", progress=False)
    monkeypatch.delenv("LLMCAL_SCORE_CACHE")
    run_eval(_cfg(tiny_model_dir, limit=30), tmp_path / "c", progress=False)  # other questions: a miss
    assert len(weight_loads) == 3
    assert (tmp_path / "a/predictions.jsonl").read_bytes() == (tmp_path / "b/predictions.jsonl").read_bytes()


def test_the_cache_key_needs_no_weights_and_is_the_same_loaded_or_not(tiny_model_dir):
    from llmcal.cache import score_key
    from llmcal.data import load_dataset
    from llmcal.models import load_model, resolve_model
    from llmcal.prompts import encode_questions

    spec = resolve_model(str(tiny_model_dir))
    lazy = load_model(spec, dtype="float32", device="cpu", lazy=True)
    eager = load_model(spec, dtype="float32", device="cpu")
    assert not lazy.weights_loaded and eager.weights_loaded
    enc = encode_questions(list(load_dataset(DATA).questions), lazy.tokenizer, "plain")
    assert score_key(lazy, enc, "plain", 400) == score_key(eager, enc, "plain", 400)
    assert not lazy.weights_loaded
    assert lazy.model is not None and lazy.weights_loaded  # reading it loads them


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
