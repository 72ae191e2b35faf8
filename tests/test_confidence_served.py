"""eval --confidence verbalized|ptrue|consistency against a real llama.cpp server on 127.0.0.1, started and stopped here.

The server (llama-cpp-python, `make served`) serves the SmolLM2-135M-Instruct GGUF, as in
tests/test_served_llamacpp.py.  A 135M model rarely follows the verbalized format, so these tests check what
must hold whatever the model says: every question gets a prediction, the records keep the raw replies and
their parse, the run's confidence block counts what the records say, and a rerun with the same seed draws
the same samples.  Slow: a few questions per mode, a few seconds each.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from llmcal.evaluate import EvalConfig, run_eval
from llmcal.predictions import load_predictions

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("llama-cpp-python is not installed: `make served` installs it from the wheel cache "
                "(~/.cache/llmcal/wheels) or builds it there; `make test` runs it first", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
N = 3  # MMLU questions per mode


def _bench():
    spec = importlib.util.spec_from_file_location("served_agreement", ROOT / "bench" / "served_agreement.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    bench = _bench()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with bench.llama_server(bench.gguf_path(), threads=2, log=log) as url:
        yield url, bench.ALIAS


def _run(server, path: Path, **kw):
    url, alias = server
    cfg = EvalConfig(**{"model": alias, "data": "mmlu", "limit": N, "backend": "openai", "base_url": url,
                        "n_bootstrap": 20, "concurrency": 1, "max_parse_retries": 1, **kw})
    rec = run_eval(cfg, path, progress=False)
    block = json.loads((path / "metrics.json").read_text())["confidence"]
    preds = load_predictions(path / "predictions.jsonl")
    return rec, block, preds


def _check_block(block: dict, preds, source: str) -> None:
    records = [p.extra for p in preds]
    assert len(preds) == N and all(r["confidence"] == source and r["responses"] for r in records)
    assert block["source"] == source and block["n"] == N
    assert block["unparseable"] == sum(r["parse"]["status"] == "unparseable" for r in records)
    assert block["retries"] == sum(r["parse"]["retries"] for r in records)
    assert block["requests"] == sum(r["usage"]["requests"] for r in records)
    assert block["prompt_tokens"] > 0 and block["completion_tokens"] > 0  # llama.cpp reports usage
    for p in preds:
        if p.extra["parse"]["status"] == "unparseable":
            assert p.probs == (1 / len(p.probs),) * len(p.probs) and p.extra["parse"]["reason"]


@pytest.mark.parametrize("template", ["1stage-percent", "2stage"])
def test_verbalized_on_the_real_server(server, tmp_path, template):
    rec, block, preds = _run(server, tmp_path / "run", confidence="verbalized", verbalized_template=template)
    _check_block(block, preds, "verbalized")
    for p in preds:
        r = p.extra
        assert r["usage"]["requests"] == len(r["responses"])
        if r["parse"]["status"] == "ok":
            assert p.probs[p.pred] == pytest.approx(max(r["stated_confidence"], (1 - r["stated_confidence"]) / 3))


def test_ptrue_on_the_real_server(server, tmp_path):
    rec, block, preds = _run(server, tmp_path / "run", confidence="ptrue")
    _check_block(block, preds, "ptrue")
    ok = [p for p in preds if p.extra["parse"]["status"] == "ok"]
    assert ok  # this model answers with a letter and its first token after the judge question is True or False
    for p in ok:
        assert 0.0 < p.extra["p_true"] < 1.0 and p.extra["answer_letter"] in "ABCD"


def test_consistency_on_the_real_server_draws_the_same_samples_again(server, tmp_path):
    rec, block, preds = _run(server, tmp_path / "a", confidence="consistency", samples=3)
    _check_block(block, preds, "consistency")
    assert block["requests"] >= 3 * N
    for p in preds:
        votes = [s for s in p.extra["samples"] if s is not None]
        assert len(p.extra["samples"]) == 3 and sum(p.probs) == pytest.approx(1.0)
        if votes:
            assert p.conf == pytest.approx(max(votes.count(x) for x in set(votes)) / len(votes))
    _run(server, tmp_path / "b", confidence="consistency", samples=3)  # the server honours each request's seed
    assert (tmp_path / "a" / "predictions.jsonl").read_bytes() == (tmp_path / "b" / "predictions.jsonl").read_bytes()
