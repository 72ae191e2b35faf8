"""--backend openai against a real llama.cpp server (llama-cpp-python) on 127.0.0.1, started and stopped here.

The server serves the SmolLM2-135M-Instruct GGUF that the local engine reads
(the alias smollm2-135m-instruct).  Its weights de-quantised to float32 must
give the local engine's option probabilities up to float32 rounding; the Q4_1
GGUF as llama.cpp serves it by default may differ by what its quantised
arithmetic explains (the tolerances below, set from bench/served_agreement.py).
Slow: a server starts in seconds and answers a question in a fraction of one.
`make served` (which `make test` runs) installs the server from the wheel cache.
"""
from __future__ import annotations

import importlib.util
import json
import math
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("llama-cpp-python is not installed: `make served` installs it from the wheel cache "
                "(~/.cache/llmcal/wheels) or builds it there; `make test` runs it first", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
N = 12  # MMLU questions (bench/served_agreement.py runs 120; a served question takes about a second here)

# Tolerances on the largest difference of an option probability between the served model and the
# local engine, each the maximum bench/served_agreement.py measured on 120 MMLU questions (README,
# "Served models"; bench/results/served-agreement-20261130T015125.json) with a margin:
# - the GGUF's weights de-quantised to float32, float32 attention keys/values: only the order of
#   float32 arithmetic differs; chat: 5.8e-6, tolerance 1e-4;
# - the same after the plain prompt (completions), where llmcal adds the probability of the unspaced
#   letter token ("B") to the spaced one (" B") that the local engine reads alone: after "Answer:" the
#   unspaced token carries 0.5-10% of a letter's probability; measured 5.5e-3 (with the spaced token
#   alone 5e-6), tolerance 1e-2;
# - the Q4_1 GGUF as llama.cpp serves it by default: Q4_1 weights times activations rounded to 8 bits
#   per block of 32 and float16 keys/values in the attention cache, where the local engine computes in
#   float32 from the de-quantised weights; chat: 0.066 (completions, top 1000: 0.069), tolerance 0.1.
F32_TOLERANCE = {"chat": 1e-4, "completions": 1e-2}
Q4_TOLERANCE = 0.1


def _bench():
    spec = importlib.util.spec_from_file_location("served_agreement", ROOT / "bench" / "served_agreement.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _bench()


@pytest.fixture(scope="module")
def q4_server(bench, tmp_path_factory):
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with bench.llama_server(bench.gguf_path(), threads=2, log=log) as url:
        yield url


@pytest.fixture(scope="module")
def f32_server(bench, tmp_path_factory):
    d = tmp_path_factory.mktemp("llama-server-f32")
    gguf = bench.dequantized_gguf(bench.gguf_path(), d / "smollm2-f32.gguf")
    with bench.llama_server(gguf, threads=2, kv_f32=True, log=d / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def local_runs(bench, tmp_path_factory):
    """The local engine's runs on the N questions, plain and chat, made once for the module's tests."""
    work = tmp_path_factory.mktemp("local-runs")
    with pytest.MonkeyPatch.context() as mp:  # the session's GGUF cache; no scoring cache across tests
        mp.setenv("LLMCAL_CACHE", str(tmp_path_factory.getbasetemp() / "llmcal-cache"))
        mp.setenv("LLMCAL_SCORE_CACHE", "0")
        return {t: bench.local_run(t, work, n=N, seed=0)[0] for t in ("plain", "chat")}


def _served(bench, url, local_runs, tmp_path, mode, top) -> dict:
    served_dir, rec, _ = bench.served_run(mode, url, tmp_path, n=N, seed=0, concurrency=2, top_logprobs=top,
                                          label=mode)
    return {**bench.compare_runs(local_runs[bench.MODES[mode]], served_dir),
            "letter_coverage": rec.results[0].metrics["letter_coverage"]}


def _near_ties_only(r: dict, run_dir: Path, tolerance: float) -> None:
    """A different argmax is only allowed where the local engine's two best options are that close."""
    local = {json.loads(line)["id"]: json.loads(line) for line in (run_dir / "predictions.jsonl").open()}
    for qid in r["disagreements"]:
        top2 = sorted(local[qid]["probs"])[-2:]
        assert top2[1] - top2[0] <= 2 * tolerance, (qid, local[qid]["probs"])


@pytest.mark.parametrize("mode, top", [("chat", 20), ("completions", 1000)])
def test_float32_server_equals_the_local_engine(bench, f32_server, local_runs, tmp_path, mode, top):
    """Same weights, float32 everywhere: prompts, tokens, chat template and letter reading all match."""
    r = _served(bench, f32_server, local_runs, tmp_path, mode, top)
    assert r["n"] == N and r["argmax_agreement"] == 1.0
    assert r["max_abs_prob_diff"] <= F32_TOLERANCE[mode], r["worst_question"]
    assert r["letter_coverage"]["missing_share"] == 0.0


def test_quantised_server_agrees_with_the_local_engine_within_its_arithmetic(bench, q4_server, local_runs, tmp_path):
    r = _served(bench, q4_server, local_runs, tmp_path, "chat", 20)
    assert r["n"] == N
    assert r["max_abs_prob_diff"] <= Q4_TOLERANCE, r["worst_question"]
    _near_ties_only(r, local_runs["chat"], Q4_TOLERANCE)
    cov = r["letter_coverage"]
    assert cov["n"] == N and 0 < cov["min_letter_mass"] <= cov["mean_letter_mass"] <= 1


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_probe_min_tokens_and_letter_reading_on_the_real_server(bench, q4_server):
    """auto mode picks completions; min_tokens=1 leaves the reported logprobs unchanged; each prediction's
    letter logits are the server's own top logprobs (both spellings added) or marked missing."""
    from llmcal.backends.openai import ApiSettings, load_openai
    from llmcal.data import load_dataset

    loaded = load_openai(ApiSettings(base_url=q4_server, model=bench.ALIAS, top_logprobs=20))
    assert (loaded.extra["api_mode"], loaded.extra["template"]) == ("completions", "plain")
    engine = loaded.extra["engine"]
    questions = list(load_dataset("mmlu", limit=8, seed=1).questions)
    preds = engine.score(engine.encode(questions))
    stopped = 0
    for q, p in zip(questions, preds):
        body = engine.encode([q])[0].body
        plain = _post(f"{q4_server}/completions", body)
        top = _post(f"{q4_server}/completions", {**body, "min_tokens": 1})["choices"][0]["logprobs"]["top_logprobs"][0]
        if plain["choices"][0]["logprobs"]["top_logprobs"]:
            assert plain["choices"][0]["logprobs"]["top_logprobs"][0] == top  # min_tokens changes nothing reported
        else:
            stopped += 1  # end-of-sequence was the greedy token: llama.cpp reported nothing without min_tokens
            assert plain["choices"][0]["finish_reason"] == "stop" and plain["usage"]["completion_tokens"] == 0
        for j, letter in enumerate("ABCD"[:q.k]):
            spellings = [v for t, v in top.items() if t in (letter, " " + letter)]
            if spellings:
                assert p.logits[j] == pytest.approx(math.log(sum(math.exp(v) for v in spellings)), abs=1e-9)
            else:
                assert j in p.missing
    assert stopped > 0  # this model ends the sequence after "Answer:" often: the min_tokens path ran
