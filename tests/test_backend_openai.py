"""llmcal.backends.openai: requests, reading the option letters from top logprobs, coverage, retries, resume.

Everything here is offline and fast: responses come from httpx.MockTransport or
from a small HTTP server in this process that answers like an OpenAI-compatible
endpoint (its log-probabilities are a fixed function of the prompt).  The real
llama.cpp server is tested in tests/test_served_llamacpp.py (slow).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest

from llmcal.backends.openai import (ApiQuestion, ApiSettings, ApiStatusError, OpenAIClient, OpenAIEngine,
                                    first_token_logprobs, letter_of, load_openai, mode_for_template,
                                    prediction_from_response, read_letters, request_body)
from llmcal.data.schema import Question
from llmcal.errors import LlmcalError
from llmcal.evaluate import EvalConfig, run_calibrate_ts, run_eval
from llmcal.metrics.summary import letter_coverage, metrics_from_predictions
from llmcal.predictions import Prediction, load_predictions

Q4 = Question(id="q1", question="What is 2 + 2?", choices=("3", "4", "5", "6"), answer=1, subject="math")
DATA = "synthetic:arithmetic?n=24"


def completion(top: dict, sampled: str | None = None) -> dict:
    """A legacy /completions response whose first token has the top logprobs ``top``."""
    sampled = sampled if sampled is not None else max(top, key=top.get)
    return {"object": "text_completion", "choices": [{"index": 0, "text": sampled, "logprobs": {
        "tokens": [sampled], "token_logprobs": [top.get(sampled, -1.0)], "top_logprobs": [top],
        "text_offset": [0]}}]}


def chat_completion(top: dict) -> dict:
    """A /chat/completions response (the chat logprobs shape)."""
    best = max(top, key=top.get)
    return {"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": best},
            "logprobs": {"content": [{"token": best, "logprob": top[best], "bytes": None, "top_logprobs": [
                {"token": t, "logprob": v, "bytes": None} for t, v in top.items()]}]}}]}


def settings(**kw) -> ApiSettings:
    return ApiSettings(**{"base_url": "http://served.test/v1", "model": "m", "backoff_s": 0.0, **kw})


# ---- requests ----------------------------------------------------------------------------------
def test_request_bodies_ask_for_one_greedy_token_with_its_top_logprobs():
    c = request_body(Q4, "completions", "srv-name", 7)
    assert c == {"model": "srv-name", "max_tokens": 1, "temperature": 0.0, "n": 1, "stream": False, "echo": False,
                 "logprobs": 7, "prompt": "The following are multiple choice questions (with answers) about math."
                                          "\n\nWhat is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"}
    h = request_body(Q4, "chat", "srv-name", 7)
    assert h["logprobs"] is True and h["top_logprobs"] == 7 and h["max_tokens"] == 1 and h["temperature"] == 0.0
    assert h["messages"] == [{"role": "user", "content": "The following is a multiple choice question about math. "
                              "Answer with the letter of the correct option.\n\nWhat is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6"}]
    assert "prompt" not in h and "messages" not in c


@pytest.mark.parametrize("template, mode, want", [
    ("auto", "auto", ("auto", "auto")), ("auto", "completions", ("plain", "completions")),
    ("auto", "chat", ("chat", "chat")), ("plain", "auto", ("plain", "completions")),
    ("chat", "auto", ("chat", "chat")), ("plain", "completions", ("plain", "completions")),
    ("chat", "chat", ("chat", "chat")),
])
def test_template_and_mode_resolve_each_other(template, mode, want):
    assert mode_for_template(template, mode) == want


@pytest.mark.parametrize("template, mode, msg", [
    ("chat", "completions", "no tokenizer for a served model"), ("plain", "chat", "raw-text prompt"),
    ("fancy", "auto", "unknown --template"), ("auto", "stream", "unknown --api-mode"),
])
def test_template_and_mode_mismatches_are_refused(template, mode, msg):
    with pytest.raises(LlmcalError, match=msg):
        mode_for_template(template, mode)


# ---- reading the first token's logprobs ----------------------------------------------------------
def test_both_response_shapes_give_the_same_pairs():
    top = {" A": -0.5, " B": -1.5, "The": -2.0}
    assert sorted(first_token_logprobs(completion(top))) == sorted(top.items())
    assert sorted(first_token_logprobs(chat_completion(top))) == sorted(top.items())


def test_the_sampled_token_is_added_when_the_top_list_lacks_it():
    r = completion({" A": -0.5}, sampled=" B")
    r["choices"][0]["logprobs"]["token_logprobs"] = [-0.9]
    assert sorted(first_token_logprobs(r)) == [(" A", -0.5), (" B", -0.9)]


@pytest.mark.parametrize("response", [
    {"choices": [{"text": "A", "logprobs": None}]},
    {"choices": [{"text": "A"}]},
    {"choices": [{"message": {"content": "A"}, "logprobs": {"content": []}}]},
    {"choices": [{"text": "A", "logprobs": {"tokens": [], "token_logprobs": [], "top_logprobs": []}}]},
    {"choices": []},
    {"error": "nope"},
])
def test_responses_without_logprobs_read_as_none(response):
    assert first_token_logprobs(response) is None


@pytest.mark.parametrize("token, k, want", [
    ("A", 4, 0), (" B", 4, 1), ("\u0120C", 4, 2), ("\u2581D", 4, 3), ("E", 4, None), (" E", 5, 4),
    ("a", 4, None), ("AB", 4, None), ("  A", 4, None), ("A.", 4, None), ("", 4, None), (" ", 4, None),
])
def test_letter_spellings(token, k, want):
    assert letter_of(token, k) == want


def test_spellings_of_one_letter_add_up_and_found_letters_keep_their_logprobs():
    pairs = [(" A", math.log(0.3)), ("A", math.log(0.1)), (" B", math.log(0.2)), (" C", math.log(0.15)),
             (" D", math.log(0.05)), ("The", math.log(0.1))]
    r = read_letters(pairs, 4)
    assert r.missing == ()
    assert r.logprobs == pytest.approx([math.log(0.4), math.log(0.2), math.log(0.15), math.log(0.05)], abs=1e-12)
    assert r.mass == pytest.approx(0.8, abs=1e-12)
    p = Prediction.from_logits("q", None, 0, r.logprobs)
    assert p.probs == pytest.approx([0.5, 0.25, 0.1875, 0.0625], abs=1e-12)  # renormalised over the letters


def test_a_missing_letter_gets_the_smaller_of_the_two_upper_bounds():
    # Returned mass 0.9: the unreturned tokens hold 0.1, but the least likely returned one has 0.05.
    pairs = [(" A", math.log(0.6)), (" B", math.log(0.25)), ("The", math.log(0.05))]
    r = read_letters(pairs, 4)
    assert r.missing == (2, 3)
    assert r.logprobs[2] == r.logprobs[3] == pytest.approx(math.log(0.05), abs=1e-12)
    assert r.mass == pytest.approx(0.85, abs=1e-12)
    # Returned mass 0.99 and its least likely token 0.04: the unreturned 0.01 is the tighter bound.
    pairs = [(" A", math.log(0.9)), ("The", math.log(0.05)), ("It", math.log(0.04))]
    r = read_letters(pairs, 3)
    assert r.missing == (1, 2)
    assert r.logprobs[1] == pytest.approx(math.log(0.01), abs=1e-9)
    assert r.mass == pytest.approx(0.9, abs=1e-12)


def test_no_letter_in_the_top_n_gives_a_uniform_distribution_and_zero_mass():
    r = read_letters([("The", math.log(0.7)), ("It", math.log(0.2))], 4)
    assert r.missing == (0, 1, 2, 3) and r.mass == 0.0
    p = Prediction.from_logits("q", None, 0, r.logprobs, letter_mass=r.mass, missing=r.missing)
    assert p.probs == pytest.approx([0.25] * 4)


def test_letters_beyond_the_question_options_are_ignored():
    r = read_letters([(" A", math.log(0.5)), (" E", math.log(0.4)), (" B", math.log(0.05))], 2)
    assert r.missing == () and r.mass == pytest.approx(0.55)


def test_prediction_from_a_response_carries_coverage_and_refuses_no_logprobs():
    item = ApiQuestion(Q4, request_body(Q4, "completions", "m", 5))
    top = {" B": math.log(0.6), " A": math.log(0.2), " C": math.log(0.1), "\n": math.log(0.08)}
    p = prediction_from_response(item, completion(top), where="srv")
    assert (p.id, p.answer, p.pred, p.missing) == ("q1", 1, 1, (3,))
    assert p.letter_mass == pytest.approx(0.9, abs=1e-12)
    assert p.logits[3] == pytest.approx(math.log(0.02), abs=1e-9)  # the 2% outside the top 4 bounds D
    assert p.probs == pytest.approx(np.array([0.2, 0.6, 0.1, 0.02]) / 0.92, abs=1e-12)
    with pytest.raises(LlmcalError, match=r"srv returned no log-probabilities for question q1.*logprobs=N"):
        prediction_from_response(item, {"choices": [{"text": " B", "logprobs": None}]}, where="srv")


def _stopped_at_once() -> dict:
    """llama.cpp's answer when the greedy first token ends the sequence: no token, no logprobs."""
    return {"choices": [{"text": "", "index": 0, "finish_reason": "stop", "logprobs": {
        "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}}],
        "usage": {"prompt_tokens": 40, "completion_tokens": 0, "total_tokens": 40}}


def test_a_model_that_stops_at_once_is_asked_again_with_min_tokens():
    bodies = []
    top = {"": math.log(0.5), " A": math.log(0.3), " B": math.log(0.1), " C": math.log(0.05), " D": math.log(0.04)}

    def handler(request):
        body = json.loads(request.content)
        bodies.append(body)
        return httpx.Response(200, json=completion(top, sampled=" A") if body.get("min_tokens") else _stopped_at_once())

    engine = OpenAIEngine(OpenAIClient(settings(), transport=httpx.MockTransport(handler)), "completions")
    (p,) = engine.score(engine.encode([Q4]))
    assert [b.get("min_tokens") for b in bodies] == [None, 1]
    assert {k: v for k, v in bodies[1].items() if k != "min_tokens"} == bodies[0]
    # The end-of-sequence token ("" once detokenised) keeps its probability: the letters carry 0.49.
    assert p.letter_mass == pytest.approx(0.49) and p.missing == () and p.pred == 0


def test_a_server_that_refuses_min_tokens_gets_the_no_logprobs_error():
    def handler(request):
        if json.loads(request.content).get("min_tokens"):
            return httpx.Response(400, json={"error": {"message": "Unrecognized request argument: min_tokens"}})
        return httpx.Response(200, json=_stopped_at_once())

    engine = OpenAIEngine(OpenAIClient(settings(), transport=httpx.MockTransport(handler)), "completions")
    with pytest.raises(LlmcalError, match="returned no log-probabilities for question q1"):
        engine.score(engine.encode([Q4]))


# ---- coverage in the metrics -------------------------------------------------------------------
def test_letter_coverage_block_and_local_metrics_unchanged():
    served = [Prediction.from_logits("a", None, 0, [0.0, -1.0, -2.0], letter_mass=0.9, missing=()),
              Prediction.from_logits("b", None, 1, [0.0, -1.0, -5.0], letter_mass=0.5, missing=(2,)),
              Prediction.from_logits("c", None, 2, [0.0, 0.0, 0.0], letter_mass=0.0, missing=(0, 1, 2))]
    cov = letter_coverage(served)
    assert cov == {"n": 3, "mean_letter_mass": pytest.approx(1.4 / 3), "min_letter_mass": 0.0,
                   "missing_share": pytest.approx(2 / 3), "none_found_share": pytest.approx(1 / 3),
                   "missing_letters": 4}
    m = metrics_from_predictions(served, n_bootstrap=0)
    assert m["letter_coverage"] == cov and "letter_coverage" in m["estimators"]
    local = [Prediction.from_logits(p.id, None, p.answer, p.logits) for p in served]
    ml = metrics_from_predictions(local, n_bootstrap=0)
    assert "letter_coverage" not in ml and "letter_coverage" not in ml["estimators"]
    assert {k: v for k, v in m.items() if k not in ("letter_coverage", "estimators")} == \
        {k: v for k, v in ml.items() if k != "estimators"}
    with pytest.raises(LlmcalError, match="mixed with a local model"):
        letter_coverage(served + local)


# ---- the client: retries, errors, headers --------------------------------------------------------
def test_retries_429_5xx_and_connection_errors_then_succeeds():
    answers = iter([httpx.Response(429, headers={"Retry-After": "3"}, json={"error": {"message": "slow down"}}),
                    httpx.Response(503, text="overloaded"), "connect", httpx.Response(200, json={"ok": 1})])
    seen, sleeps = [], []

    def handler(request):
        seen.append(json.loads(request.content))
        a = next(answers)
        if a == "connect":
            raise httpx.ConnectError("refused", request=request)
        return a

    c = OpenAIClient(settings(backoff_s=0.5, max_retries=3), transport=httpx.MockTransport(handler),
                     sleep=sleeps.append)
    assert c.post("completions", {"x": 1}) == {"ok": 1}
    assert seen == [{"x": 1}] * 4
    assert len(sleeps) == 3
    assert sleeps[0] == 3.0  # Retry-After wins over the first backoff (0.5 s, jitter at most +25%)
    assert 1.0 <= sleeps[1] <= 1.25 and 2.0 <= sleeps[2] <= 2.5  # doubling backoff


def test_gives_up_after_max_retries_and_says_the_run_resumes():
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(500, json={"error": {"message": "boom"}})

    c = OpenAIClient(settings(max_retries=2), transport=httpx.MockTransport(handler), sleep=lambda s: None)
    with pytest.raises(LlmcalError, match=r"no answer after 3 attempts \(last: HTTP 500: boom\).*resume"):
        c.post("completions", {})
    assert len(calls) == 3


@pytest.mark.parametrize("status, body, hint", [
    (400, {"error": {"message": "logprobs must be at most 5"}}, "lower --top-logprobs, now 20"),
    (404, {"detail": "Not Found"}, "check --base-url"),
    (401, {"error": {"message": "invalid key"}}, r"\$OPENAI_API_KEY"),
])
def test_client_errors_are_not_retried_and_say_what_to_do(status, body, hint):
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(status, json=body)

    c = OpenAIClient(settings(), transport=httpx.MockTransport(handler), sleep=lambda s: None)
    with pytest.raises(ApiStatusError, match=hint) as e:
        c.post("completions", {})
    assert e.value.status == status and len(calls) == 1 and f"HTTP {status}" in str(e.value)


def test_api_key_from_the_named_variable_only_when_set(monkeypatch):
    headers = []

    def handler(request):
        headers.append(request.headers.get("authorization"))
        return httpx.Response(200, json={})

    monkeypatch.setenv("MY_KEY", "sk-test")
    OpenAIClient(settings(api_key_env="MY_KEY"), transport=httpx.MockTransport(handler)).post("completions", {})
    monkeypatch.delenv("MY_KEY")
    OpenAIClient(settings(api_key_env="MY_KEY"), transport=httpx.MockTransport(handler)).post("completions", {})
    assert headers == ["Bearer sk-test", None]


def test_auto_mode_probes_completions_then_chat():
    paths = []

    def chat_only(request):
        paths.append(request.url.path)
        if request.url.path.endswith("/chat/completions"):
            return httpx.Response(200, json=chat_completion({"A": -0.1, "B": -2.5}))
        return httpx.Response(404, json={"detail": "Not Found"})

    loaded = load_openai(settings(), transport=httpx.MockTransport(chat_only))
    assert (loaded.extra["api_mode"], loaded.extra["template"]) == ("chat", "chat")
    assert paths == ["/v1/completions", "/v1/chat/completions"]
    assert loaded.spec.kind == "api" and loaded.spec.name == "m" and loaded.tokenizer is None

    def no_logprobs(request):
        return httpx.Response(200, json={"choices": [{"text": "A", "message": {"content": "A"}, "logprobs": None}]})

    with pytest.raises(LlmcalError, match="no request mode returns log-probabilities"):
        load_openai(settings(), transport=httpx.MockTransport(no_logprobs))
    # A template that names the mode needs no probe.
    assert load_openai(settings(template="plain"), transport=httpx.MockTransport(no_logprobs)).extra["api_mode"] \
        == "completions"


# ---- the engine: bounded concurrency, question order -------------------------------------------
def synthetic_top(prompt: str, n: int = 20) -> dict:
    """The fake server's first-token top logprobs: a fixed function of the prompt text."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    vocab = [" A", " B", " C", " D", "A", "B", "The", " The", "\n", " It", " I"] + [f" w{i}" for i in range(30)]
    z = rng.normal(size=len(vocab)) * 2.0
    z[:4] += 2.0
    lp = z - np.log(np.exp(z - z.max()).sum()) - z.max()
    order = np.argsort(-lp)[:n]
    return {vocab[i]: float(lp[i]) for i in order}


def _prompt_of(body: dict) -> str:
    return body.get("prompt") or body["messages"][-1]["content"]


def test_engine_bounds_requests_in_flight_and_hands_over_predictions_in_question_order():
    lock, state = threading.Lock(), {"now": 0, "max": 0}
    rng = np.random.default_rng(0)
    delays = list(rng.uniform(0, 0.01, size=64))

    def handler(request):
        body = json.loads(request.content)
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
            d = delays.pop()
        time.sleep(d)  # answers finish out of order
        with lock:
            state["now"] -= 1
        return httpx.Response(200, json=completion(synthetic_top(_prompt_of(body), 6)))

    from llmcal.data import load_dataset

    questions = list(load_dataset("synthetic:arithmetic?n=40").questions)
    engine = OpenAIEngine(OpenAIClient(settings(concurrency=3), transport=httpx.MockTransport(handler)),
                          "completions")
    items = engine.encode(questions)
    batches = []
    out = engine.score(items, done={questions[5].id}, on_batch=batches.append)
    assert 1 < state["max"] <= 3
    want = [q.id for q in questions if q.id != questions[5].id]
    assert [p.id for p in out] == want == [p.id for b in batches for p in b]
    for p, q in zip(out, [q for q in questions if q.id != questions[5].id]):
        r = read_letters(list(synthetic_top(_prompt_of(request_body(q, "completions", "m", 6)), 6).items()), q.k)
        assert p.logits == pytest.approx(r.logprobs, abs=0) and p.letter_mass == r.mass


# ---- whole runs against a real HTTP server in this process ---------------------------------------
class FakeServer:
    """An OpenAI-compatible endpoint on 127.0.0.1 (completions and chat) with synthetic logprobs.

    ``hold_after``: requests after this many block until ``release()``; ``logprobs``: False answers
    without them.
    """

    def __init__(self, *, logprobs: bool = True, hold_after: int | None = None):
        self.logprobs, self.hold_after = logprobs, hold_after
        self.count = 0
        self.gate = threading.Event()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.count += 1
                    n = server.count
                if server.hold_after is not None and n > server.hold_after:
                    server.gate.wait(600)  # released by the test (or at exit), never by a timeout
                top = synthetic_top(_prompt_of(body), int(body.get("top_logprobs") or body.get("logprobs") or 1))
                if self.path.endswith("/chat/completions"):
                    doc = chat_completion(top)
                else:
                    doc = completion(top)
                if not server.logprobs:
                    doc["choices"][0]["logprobs"] = None
                data = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def served_cfg(url: str, **kw) -> EvalConfig:
    return EvalConfig(**{"model": "fake-model", "data": DATA, "backend": "openai", "base_url": url,
                         "n_bootstrap": 20, "top_logprobs": 5, "concurrency": 2, **kw})


def test_eval_against_a_served_model_writes_coverage_and_never_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-never-recorded")
    with FakeServer() as srv:
        rec = run_eval(served_cfg(srv.url), tmp_path / "run", progress=False)
        assert srv.count == 1 + 24  # the auto-mode probe, then one request per question
    preds = load_predictions(tmp_path / "run" / "predictions.jsonl")
    assert len(preds) == 24 and all(p.letter_mass is not None for p in preds)
    cov = rec.results[0].metrics["letter_coverage"]
    assert cov["mean_letter_mass"] == pytest.approx(np.mean([p.letter_mass for p in preds]))
    assert cov["missing_share"] == pytest.approx(np.mean([bool(p.missing) for p in preds]))
    assert 0 < cov["missing_share"] < 1  # top-5 of this synthetic vocabulary misses some letters, not all
    assert rec.meta["api_mode"] == "completions" and rec.meta["template"] == "plain"
    assert rec.meta["base_url"] == srv.url and rec.model == "fake-model"
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Letter coverage" in report and "letter_mass" in report
    for f in (tmp_path / "run").iterdir():
        if f.is_file() and f.suffix in (".json", ".jsonl", ".md"):
            assert "sk-secret" not in f.read_text()
    assert not (tmp_path / "cache").exists()  # the scoring cache is never used for a served model


def test_calibrate_ts_carries_coverage_into_the_scaled_predictions(tmp_path):
    with FakeServer() as srv:
        rec = run_calibrate_ts(served_cfg(srv.url, api_mode="chat"), tmp_path / "ts", progress=False)
    before, after = rec.results
    assert rec.meta["api_mode"] == "chat" and rec.meta["template"] == "chat"
    assert before.metrics["letter_coverage"] == after.metrics["letter_coverage"]
    pt = load_predictions(tmp_path / "ts" / "predictions.jsonl")
    pts = load_predictions(tmp_path / "ts" / "predictions-ts.jsonl")
    assert [(p.letter_mass, p.missing) for p in pt] == [(p.letter_mass, p.missing) for p in pts]
    T = rec.meta["temperature"]
    assert pts[0].logits == pytest.approx([v / T for v in pt[0].logits])


def test_cli_refuses_an_endpoint_without_logprobs_with_exit_2(tmp_path):
    from typer.testing import CliRunner

    from llmcal.cli import app

    with FakeServer(logprobs=False) as srv:
        r = CliRunner().invoke(app, ["eval", "--backend", "openai", "--base-url", srv.url, "--model", "m",
                                     "--data", DATA, "--out", str(tmp_path / "run"), "--api-mode", "completions"])
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert "returned no log-probabilities for question arithmetic/" in text
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("kw, msg", [
    ({"base_url": None}, "needs --base-url"),
    ({"base_url": "127.0.0.1:8000/v1"}, "needs --base-url, an http"),
    ({"top_logprobs": 0}, "--top-logprobs must be a positive integer"),
    ({"concurrency": 0}, "--concurrency must be a positive integer"),
    ({"api_mode": "batch"}, "--api-mode 'batch'"),
    ({"gguf_file": "x.gguf"}, "--gguf-file does not apply to --backend openai"),
    ({"backend": "hf"}, "--base-url applies to --backend openai"),
    ({"backend": "hf", "base_url": None, "api_key_env": "MY_KEY"}, "--api-key-env applies to --backend openai"),
])
def test_bad_served_options_are_refused_before_the_run_starts(tmp_path, kw, msg):
    with pytest.raises(LlmcalError, match=msg):
        run_eval(served_cfg("http://127.0.0.1:9/v1", **kw), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_killed_served_run_resumes_to_the_same_predictions_file(tmp_path):
    """SIGKILL the CLI mid-run; the rerun scores only what is left and ends with the uninterrupted file."""
    with FakeServer() as srv:
        run_eval(served_cfg(srv.url), tmp_path / "whole", progress=False)
    whole = (tmp_path / "whole" / "predictions.jsonl").read_bytes()

    out = tmp_path / "killed"
    with FakeServer(hold_after=1 + 10) as srv:  # the probe and 10 questions, then the server hangs
        cmd = [sys.executable, "-c", "from llmcal.cli import main; main()", "eval", "--backend", "openai",
               "--base-url", srv.url, "--model", "fake-model", "--data", DATA, "--out", str(out),
               "--n-bootstrap", "20", "--top-logprobs", "5", "--concurrency", "2"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env={**os.environ, "LLMCAL_PROGRESS": "0"}, start_new_session=True)
        pred_file = out / "predictions.jsonl"
        # Wait until both concurrent requests hang (nothing more can be answered), then until the
        # file stops growing. How many lines it then holds is 9 or 10: the two workers' requests
        # can reach the server in either order, and answers are written in question order, so an
        # answer that overtook a hung earlier question stays unwritten.
        deadline = time.monotonic() + 300
        last, stable_since = -1, time.monotonic()
        while time.monotonic() < deadline and proc.poll() is None:
            lines = len(pred_file.read_bytes().splitlines()) if pred_file.exists() else 0
            if lines != last:
                last, stable_since = lines, time.monotonic()
            if srv.count >= 1 + 10 + 2 and lines >= 9 and time.monotonic() - stable_since > 1.0:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        partial = pred_file.read_bytes().splitlines()
        assert len(partial) in (9, 10) and not (out / "metrics.json").exists()
        assert partial == whole.splitlines()[:len(partial)]
        srv.gate.set()
        before = srv.count
        rec = run_eval(served_cfg(srv.url), out, progress=False)
        assert srv.count - before == 1 + 24 - len(partial)  # the probe, then only the questions left
    assert (out / "predictions.jsonl").read_bytes() == whole
    assert rec.results[0].metrics["n"] == 24
