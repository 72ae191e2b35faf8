"""Tests for llmcal.cache: the one content-addressed store, its namespaces, and the one weights fingerprint.

The scoring cache as a run uses it (a second run scored from it, a full hit that never loads the model) is
tested in tests/test_pipeline.py; the drift responses through the store in tests/test_drift.py.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import replace
from types import SimpleNamespace

import pytest

from llmcal.cache import (STORE_VERSION, ScoreCache, Store, enabled, score_key, score_key_doc, store_key,
                          weights_fingerprint)
from llmcal.data.schema import Question
from llmcal.models import ModelSpec, resolve_model
from llmcal.predictions import Prediction
from llmcal.prompts import EncodedQuestion

RECORDS = [{"id": "q0", "x": [1, 2, 3]}, {"id": "q1", "x": 0.1 + 0.2}, {"id": "q2", "text": "é\n\"quoted\""}]


# ---- the store ------------------------------------------------------------------------------------------
def test_an_entry_round_trips_and_lives_under_its_namespace(tmp_path):
    store = Store("drift", tmp_path)
    key = store.key({"a": 1})
    assert store.get(key) is None
    path = store.put(key, RECORDS)
    assert path == tmp_path / key[:2] / f"{key}.jsonl" and store.path(key) == path
    assert store.get(key) == RECORDS  # floats, unicode and newlines inside strings come back exactly
    head = json.loads(path.read_text().splitlines()[0])
    assert head == {"store": STORE_VERSION, "namespace": "drift", "key": key, "n": 3,
                    "sha256": hashlib.sha256(path.read_bytes().partition(b"\n")[2]).hexdigest()}
    assert not list(tmp_path.rglob("*.tmp"))  # the atomic writer left nothing behind


def test_the_default_root_is_the_namespace_under_the_llmcal_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCAL_CACHE", str(tmp_path / "c"))
    assert Store("priors").root == tmp_path / "c" / "priors"
    assert Store("drift").root == tmp_path / "c" / "drift"
    with pytest.raises(ValueError, match="unknown cache namespace"):
        Store("logits")


def test_the_key_is_the_sha256_of_the_canonical_document(tmp_path):
    doc = {"b": [1, 2], "a": {"y": "é", "x": None}}
    want = hashlib.sha256(json.dumps({"store": STORE_VERSION, "namespace": "scores", **doc}, sort_keys=True,
                                     separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()
    assert store_key("scores", doc) == want == Store("scores", tmp_path).key(dict(reversed(list(doc.items()))))
    assert store_key("drift", doc) != want  # one document in two namespaces: two keys
    assert store_key("scores", {**doc, "b": [2, 1]}) != want


def _rewrite_header(path, **change):
    head, _, body = path.read_bytes().partition(b"\n")
    path.write_bytes(json.dumps({**json.loads(head), **change}).encode() + b"\n" + body)


DAMAGE = {
    "a changed value": lambda p: p.write_bytes(p.read_bytes().replace(b'"x": 0', b'"x": 9', 1)),
    "a truncated file": lambda p: p.write_bytes(p.read_bytes()[:-7]),
    "an empty file": lambda p: p.write_bytes(b""),
    "no header": lambda p: p.write_bytes(p.read_bytes().partition(b"\n")[2]),
    "not UTF-8": lambda p: p.write_bytes(p.read_bytes().replace("é".encode(), b"\xff", 1)),
    "another key in the header": lambda p: _rewrite_header(p, key="0" * 64),
    "another store version": lambda p: _rewrite_header(p, store=STORE_VERSION - 1),
    "another namespace": lambda p: _rewrite_header(p, namespace="scores"),
    "a wrong record count": lambda p: _rewrite_header(p, n=2),
    "a line dropped with its checksum redone": lambda p: p.write_bytes(_redone_without_last_line(p.read_bytes())),
}


def _redone_without_last_line(raw: bytes) -> bytes:
    head, _, body = raw.partition(b"\n")
    body = b"".join(line + b"\n" for line in body.splitlines()[:-1])
    return json.dumps({**json.loads(head), "sha256": hashlib.sha256(body).hexdigest()}).encode() + b"\n" + body


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_entry_is_reported_deleted_and_missed(tmp_path, damage, caplog):
    store = Store("drift", tmp_path)
    key = store.key({"a": 1})
    path = store.put(key, RECORDS)
    DAMAGE[damage](path)
    with caplog.at_level(logging.WARNING, logger="llmcal.cache"):
        assert store.get(key) is None
    assert not path.exists()
    assert any("damaged drift response cache entry" in r.getMessage() and str(path) in r.getMessage()
               for r in caplog.records)
    store.put(key, RECORDS)  # recomputed: whole again
    assert store.get(key) == RECORDS


def test_an_entry_of_the_layout_before_one_store_is_a_miss_not_misread(tmp_path):
    # v1 wrote scores as <key>.jsonl (bare prediction lines) plus a <key>.json manifest
    cache = ScoreCache(tmp_path)
    key = "ab" * 32
    preds = [Prediction.from_logits(f"q{i}", None, 0, [1.0, float(i)]) for i in range(3)]
    text = "".join(json.dumps(p.to_dict()) + "\n" for p in preds)
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / f"{key}.jsonl").write_text(text)
    (tmp_path / "ab" / f"{key}.json").write_text(json.dumps(
        {"n": 3, "sha256": hashlib.sha256(text.encode()).hexdigest(), "engine": 1}))
    assert cache.get(key, ["q0", "q1", "q2"]) is None  # the first line is no v2 header


def test_score_cache_serves_predictions_only_for_the_ids_asked_for(tmp_path, caplog):
    cache = ScoreCache(tmp_path)
    key = "cd" * 32
    preds = [Prediction.from_logits(f"q{i}", "math", i % 2, [1.0, float(i)]) for i in range(3)]
    cache.put(key, preds)
    got = cache.get(key, ["q0", "q1", "q2"])
    assert [p.to_dict() for p in got] == [p.to_dict() for p in preds]
    with caplog.at_level(logging.WARNING, logger="llmcal.cache"):
        assert cache.get(key, ["q0", "q2", "q1"]) is None  # another order: not this entry, and it is dropped
    assert "ids differ" in caplog.text and cache.get(key, ["q0", "q1", "q2"]) is None
    Store("scores", tmp_path).put(key, [{"id": "q0"}])  # a sound entry holding no prediction
    assert cache.get(key, ["q0"]) is None and not Store("scores", tmp_path).path(key).exists()


def test_only_the_scores_namespace_has_a_switch(monkeypatch):
    for off in ("0", "false", "No", " off "):
        monkeypatch.setenv("LLMCAL_SCORE_CACHE", off)
        assert not enabled("scores") and enabled("drift") and enabled("priors")
    monkeypatch.setenv("LLMCAL_SCORE_CACHE", "1")
    assert enabled("scores")
    monkeypatch.delenv("LLMCAL_SCORE_CACHE")
    assert enabled("scores")


# ---- the one weights fingerprint ----------------------------------------------------------------------------
@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    return d


def _touch(path, seconds=1):
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def test_the_fingerprint_names_the_weight_files_and_follows_them(model_copy):
    spec = resolve_model(str(model_copy))
    fp = weights_fingerprint(spec)
    names = [f[0] for f in fp["files"]]
    assert fp["model"] == spec.identity and "model.safetensors" in names and "config.json" in names
    assert weights_fingerprint(resolve_model(str(model_copy))) == fp
    (model_copy / "README.md").write_text("notes")  # not a weight file: the same model
    assert weights_fingerprint(spec) == fp
    _touch(model_copy / "model.safetensors")  # rewritten weights (same size)
    assert weights_fingerprint(spec) != fp
    fp = weights_fingerprint(spec)
    with open(model_copy / "config.json", "a") as f:
        f.write(" ")
    assert weights_fingerprint(spec) != fp
    shutil.rmtree(model_copy)
    assert weights_fingerprint(spec) is None


def test_an_adapter_is_fingerprinted_with_its_base(model_copy, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    (adapter / "adapter_config.json").write_text("{}")
    spec = ModelSpec(name="a", kind="lora", path=str(adapter), base=resolve_model(str(model_copy)))
    fp = weights_fingerprint(spec)
    assert fp["base"] == weights_fingerprint(spec.base) and [f[0] for f in fp["files"]] == [
        "adapter_config.json", "adapter_model.safetensors"]
    _touch(model_copy / "model.safetensors")  # the same adapter on replaced base weights: another model
    assert weights_fingerprint(spec) != fp


def test_a_gguf_file_is_fingerprinted_alone(tmp_path):
    (tmp_path / "m-q4.gguf").write_bytes(b"GGUF" + b"\0" * 10)
    (tmp_path / "m-q8.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    spec = resolve_model(str(tmp_path / "m-q4.gguf"))
    fp = weights_fingerprint(spec)
    assert [f[:2] for f in fp["files"]] == [["m-q4.gguf", 14]]
    _touch(tmp_path / "m-q8.gguf")
    assert weights_fingerprint(spec) == fp
    _touch(tmp_path / "m-q4.gguf")
    assert weights_fingerprint(spec) != fp


def test_a_hub_model_is_named_by_its_cached_snapshot_and_unknown_when_not_cached(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = ModelSpec(name="org/m", kind="hub", path="org/m")
    assert weights_fingerprint(spec) is None
    loaded = SimpleNamespace(spec=spec, backend="hf", dtype="float32", device="cpu")
    assert score_key(loaded, _encoded(), "plain", 100) is None  # unknown weights: never cached
    for commit in ("a" * 40, "b" * 40):
        snap = tmp_path / "hub" / "models--org--m" / "snapshots" / commit
        snap.mkdir(parents=True)
        (snap / "config.json").write_text("{}")
        (tmp_path / "hub" / "models--org--m" / "refs").mkdir(exist_ok=True)
        (tmp_path / "hub" / "models--org--m" / "refs" / "main").write_text(commit)
        assert weights_fingerprint(spec) == {"model": "hub:org/m", "revision": commit}


# ---- keys -----------------------------------------------------------------------------------------------
def _encoded(n=3):
    return [EncodedQuestion(Question(id=f"q{i}", question="?", choices=("a", "b"), answer=i % 2, subject="s"),
                            input_ids=(5, 6, 7 + i), letter_ids=(1, 2)) for i in range(n)]


def test_the_score_key_changes_with_each_input(model_copy):
    spec = resolve_model(str(model_copy))
    loaded = SimpleNamespace(spec=spec, backend="hf", dtype="float32", device="cuda:0")
    enc = _encoded()
    key = score_key(loaded, enc, "plain", 400)
    assert score_key(SimpleNamespace(**{**vars(loaded), "device": "cuda:1"}), enc, "plain", 400) == key
    q0 = enc[0].question
    changed = [
        score_key(SimpleNamespace(**{**vars(loaded), "dtype": "bfloat16"}), enc, "plain", 400),
        score_key(SimpleNamespace(**{**vars(loaded), "device": "cpu"}), enc, "plain", 400),
        score_key(SimpleNamespace(**{**vars(loaded), "backend": "vllm"}), enc, "plain", 400),
        score_key(loaded, enc, "chat", 400),
        score_key(loaded, enc, "plain", 401),
        score_key(loaded, enc[:2], "plain", 400),
        score_key(loaded, enc[::-1], "plain", 400),
        score_key(loaded, [replace(enc[0], input_ids=(5, 6, 8))] + enc[1:], "plain", 400),
        score_key(loaded, [replace(enc[0], letter_ids=(2, 1))] + enc[1:], "plain", 400),
        score_key(loaded, [replace(enc[0], question=replace(q0, id="x"))] + enc[1:], "plain", 400),
        score_key(loaded, [replace(enc[0], question=replace(q0, answer=1))] + enc[1:], "plain", 400),
        score_key(loaded, [replace(enc[0], question=replace(q0, subject="t"))] + enc[1:], "plain", 400),
    ]
    _touch(model_copy / "model.safetensors")
    changed.append(score_key(loaded, enc, "plain", 400))
    assert key not in changed and len(set(changed)) == len(changed)


def test_one_model_has_one_fingerprint_in_the_scores_and_the_drift_keys(model_copy, tiny_tokenizer):
    from llmcal.drift import responses_key, responses_key_doc
    from llmcal.models import load_model

    spec = resolve_model(str(model_copy))
    loaded = load_model(spec, dtype="float32", device="cpu")
    kw = dict(max_new_tokens=4, eos={tiny_tokenizer.eos_token_id}, pad_id=tiny_tokenizer.pad_token_id,
              batch_size=2)
    prompts = [[5, 6, 7], [8, 9]]
    scores_doc = score_key_doc(loaded, _encoded(), "plain", 400)
    drift_doc = responses_key_doc(loaded.model, False, prompts, original_spec=spec, **kw)
    assert scores_doc["weights"] == drift_doc["weights"] == weights_fingerprint(spec)
    before = (score_key(loaded, _encoded(), "plain", 400),
              responses_key(loaded.model, False, prompts, original_spec=spec, **kw))
    (model_copy / "model.safetensors").write_bytes((model_copy / "model.safetensors").read_bytes())  # rewritten
    _touch(model_copy / "model.safetensors")  # (a filesystem with a coarse clock: the rewrite is later anyway)
    after = (score_key(loaded, _encoded(), "plain", 400),
             responses_key(loaded.model, False, prompts, original_spec=spec, **kw))
    assert after[0] != before[0] and after[1] != before[1]
    # without a spec the drift key hashes the parameters themselves
    assert "params" in responses_key_doc(loaded.model, False, prompts, **kw)["weights"]


# ---- the priors namespace: contextual calibration's content-free pass -------------------------------------------
def test_content_free_priors_come_from_the_store_without_loading_the_model(tiny_model_dir, tmp_path, monkeypatch,
                                                                           caplog):
    import llmcal.models as models
    import llmcal.scoring as scoring
    from llmcal.posthoc import content_free_distribution

    monkeypatch.setenv("LLMCAL_CACHE", str(tmp_path / "cache"))  # this test's store only
    spec = resolve_model(str(tiny_model_dir))
    first = content_free_distribution(models.load_model(spec, dtype="float32", device="cpu"), "plain", [2, 4])
    entries = sorted(Store("priors").root.rglob("*.jsonl"))
    assert len(entries) == 2
    with monkeypatch.context() as mp:
        def refuse(*a, **kw):
            raise AssertionError("the model was loaded or scored for a cached prior")

        mp.setattr(models, "load_weights", refuse)
        mp.setattr(scoring, "score", refuse)
        lazy = models.load_model(spec, dtype="float32", device="cpu", lazy=True)
        again = content_free_distribution(lazy, "plain", [4, 2])
        assert not lazy.weights_loaded
    assert {k: v.tolist() for k, v in again.items()} == {k: v.tolist() for k, v in first.items()}
    # a damaged entry is recomputed (the model loads then), and the other K still comes from the store
    DAMAGE["a truncated file"](entries[0])
    calls = []
    real = scoring.score
    monkeypatch.setattr(scoring, "score", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    lazy = models.load_model(spec, dtype="float32", device="cpu", lazy=True)
    with caplog.at_level(logging.WARNING, logger="llmcal.cache"):
        third = content_free_distribution(lazy, "plain", [2, 4])
    assert len(calls) == 1 and lazy.weights_loaded and "damaged contextual prior cache entry" in caplog.text
    assert {k: v.tolist() for k, v in third.items()} == {k: v.tolist() for k, v in first.items()}
    # another template, other strings or no cache at all: scored again
    content_free_distribution(lazy, "chat", [4])
    content_free_distribution(lazy, "plain", [4], strings=("N/A",))
    content_free_distribution(lazy, "plain", [4], cache=False)
    assert len(calls) == 4 and len(list(Store("priors").root.rglob("*.jsonl"))) == 4


def test_calibrate_from_a_run_with_contextual_twice_loads_the_model_once(tiny_model_dir, tmp_path, monkeypatch):
    import llmcal
    import llmcal.models as models

    monkeypatch.setenv("LLMCAL_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    llmcal.evaluate(str(tiny_model_dir), "synthetic:arithmetic?n=40&k=4&difficulty=2", out=run, template="plain",
                    n_bootstrap=20, progress=False)
    loads = []
    real = models.load_weights
    monkeypatch.setattr(models, "load_weights", lambda *a, **kw: loads.append(1) or real(*a, **kw))
    one = llmcal.calibrate(from_run=run, method="contextual", out=tmp_path / "p1", n_bootstrap=20)
    two = llmcal.calibrate(from_run=run, method="contextual", out=tmp_path / "p2", n_bootstrap=20)
    assert loads == [1]  # the second call took the prior from the store
    assert len(list(Store("priors").root.rglob("*.jsonl"))) == 1
    assert [r.method for r in one.comparison.rows] == [r.method for r in two.comparison.rows] == ["none",
                                                                                                  "contextual"]
    assert one.comparison.rows[-1].params == two.comparison.rows[-1].params  # the same prior
    assert one.comparison.rows[-1].scores == two.comparison.rows[-1].scores


def test_a_kind_of_model_llmcal_does_not_know_is_named_by_its_spec():
    spec = ModelSpec(name="m", kind="toy", path="m")  # an outside backend's model (tests/test_backends.py)
    assert weights_fingerprint(spec) == {"spec": spec.to_dict()}
    assert weights_fingerprint(replace(spec, path="n")) != weights_fingerprint(spec)
