"""eval --confidence verbalized|ptrue|consistency against a fake chat endpoint: requests, records, the unparseable
rule, the run's confidence block, refusals, exact zeros, and a killed consistency run that resumes.

The fake model (``FakeChat``) answers like an OpenAI-compatible chat endpoint, as a fixed function of the
conversation and the request's seed: a letter (drawn from a per-question distribution at temperature > 0),
a stated confidence, a chain of thought ending in "Answer: X", or a first token True/False with top
logprobs.  The real llama.cpp server is tested in tests/test_confidence_served.py (slow).
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

from llmcal.backends.openai import ApiSettings, OpenAIClient
from llmcal.confidence import ConfidenceSettings, score_question
from llmcal.confidence.ask import derive_seed
from llmcal.confidence.prompts import CONFIDENCE_QUESTION
from llmcal.data import load_dataset
from llmcal.data.schema import LETTERS, Question
from llmcal.errors import LlmcalError
from llmcal.evaluate import EvalConfig, config_fields, run_calibrate_ts, run_eval
from llmcal.predictions import Prediction, load_predictions
from test_backend_openai import FakeServer as LogprobServer  # the logprob endpoint of the served-model tests

DATA = "synthetic:arithmetic?n=12"
Q4 = Question(id="q1", question="What is 2 + 2?", choices=("3", "4", "5", "6"), answer=1, subject="math")


def _unit(*parts) -> float:
    h = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") / 2 ** 64


def question_of(messages: list[dict]) -> str:
    """The question's text (the first user turn, from the question on): what the fake model's answers depend on."""
    first = messages[0]["content"]
    return first.split("\n\n", 1)[1].split("\n\nProposed answer")[0]


def letter_distribution(text: str, k: int) -> np.ndarray:
    w = np.array([_unit(text, j) ** 3 for j in range(k)]) + 0.01
    return w / w.sum()


def n_options(text: str) -> int:
    return sum(1 for line in text.splitlines() if len(line) > 2 and line[0] in LETTERS and line[1:3] == ". ")


class FakeChat:
    """The fake model: ``reply(body) -> response``.  ``garble``: the first N replies of each conversation
    name no option (the correction turns then get proper answers); ``logprobs``: False answers without them."""

    def __init__(self, *, garble: int = 0, logprobs: bool = True):
        self.garble, self.logprobs = garble, logprobs
        self.bodies: list[dict] = []
        self.lock = threading.Lock()

    def text(self, body: dict) -> str:
        msgs = body["messages"]
        user = [m["content"] for m in msgs if m["role"] == "user"]
        q = question_of(msgs)
        k = n_options(msgs[0]["content"])
        probs = letter_distribution(q, k)
        if body["temperature"] > 0:
            u = _unit(body["seed"], "draw")
            letter = LETTERS[int(np.searchsorted(np.cumsum(probs), u * probs.sum()))]
        else:
            letter = LETTERS[int(np.argmax(probs))]
        if len(user) <= self.garble:
            return "Hmm, that is a hard one."
        last = user[-1]
        if last == CONFIDENCE_QUESTION:
            return f"Confidence: {round(100 * _unit(q, 'conf'))}%"
        if "Confidence: <number>%" in last:
            return f"Answer: {letter}\nConfidence: {round(100 * _unit(q, 'conf'))}%"
        if "from 0.0 to 1.0" in last:
            return f"Answer: {letter}\nConfidence: {_unit(q, 'conf'):.2f}"
        if "Think step by step" in last:
            other = LETTERS[(LETTERS.index(letter) + 1) % k]
            return f"Option {other} looks close, but no.\nAnswer: {letter}"
        return f"{letter}. option text"

    def reply(self, body: dict) -> dict:
        with self.lock:
            self.bodies.append(body)
        if body.get("logprobs"):  # the P(True) question: one token with its top logprobs
            q = question_of(body["messages"])
            p_true = 0.1 + 0.8 * _unit(q, "ptrue")
            top = {"True": math.log(p_true * 0.9), "False": math.log((1 - p_true) * 0.9), "The": math.log(0.05)}
            best = max(top, key=top.get)
            lp = {"content": [{"token": best, "logprob": top[best], "top_logprobs": [
                {"token": t, "logprob": v} for t, v in top.items()]}]} if self.logprobs else None
            return {"choices": [{"index": 0, "message": {"role": "assistant", "content": best}, "logprobs": lp,
                                 "finish_reason": "length"}],
                    "usage": {"prompt_tokens": 50, "completion_tokens": 1, "total_tokens": 51}}
        text = self.text(body)
        prompt_words = sum(len(m["content"].split()) for m in body["messages"])
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt_words, "completion_tokens": len(text.split()),
                          "total_tokens": prompt_words + len(text.split())}}

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(lambda request: httpx.Response(200, json=self.reply(json.loads(request.content))))


def client_for(fake: FakeChat) -> OpenAIClient:
    return OpenAIClient(ApiSettings(base_url="http://fake.test/v1", model="m", backoff_s=0.0),
                        transport=fake.transport())


def ask(fake: FakeChat, q: Question = Q4, **kw) -> Prediction:
    s = ConfidenceSettings(**{"source": "verbalized", "max_parse_retries": 2, "seed": 0, **kw})
    return score_question(client_for(fake), s, q, "http://fake.test/v1/chat/completions")


# ---- each mode's prediction -------------------------------------------------------------------
def test_verbalized_one_stage_puts_the_stated_confidence_on_the_stated_letter():
    fake = FakeChat()
    p = ask(fake, template="1stage-percent")
    (body,) = fake.bodies
    assert body["temperature"] == 0.0 and body["seed"] == derive_seed(0, "q1", "verbalized", 0)
    assert "Confidence: <number>%" in body["messages"][0]["content"]
    c = round(100 * _unit(question_of(body["messages"]), "conf")) / 100
    j = LETTERS.index(p.extra["answer_letter"])
    assert p.extra["stated_confidence"] == pytest.approx(c)
    assert p.probs[j] == pytest.approx(c) and all(v == pytest.approx((1 - c) / 3) for i, v in enumerate(p.probs)
                                                   if i != j)
    assert p.extra["parse"] == {"status": "ok", "retries": 0, "reasons": []}
    assert p.extra["responses"] == [fake.text(body)]
    assert p.extra["usage"] == {"requests": 1, "prompt_tokens": len(body["messages"][0]["content"].split()),
                                "completion_tokens": 4}  # the server's usage: "Answer: B\nConfidence: N%"


class StatedChat(FakeChat):
    """Always names C with the given confidence."""

    def __init__(self, stated: str):
        super().__init__()
        self.stated = stated

    def text(self, body: dict) -> str:
        return f"Answer: C\nConfidence: {self.stated}"


@pytest.mark.parametrize("stated, pred, flagged", [("26%", 2, False), ("25%", 0, True), ("10%", 0, True)])
def test_a_confidence_at_or_below_chance_moves_the_prediction_off_the_named_letter_and_is_flagged(stated, pred,
                                                                                                   flagged):
    p = ask(StatedChat(stated), template="1stage-percent")
    assert p.extra["answer_letter"] == "C" and p.pred == pred  # at 1/K all tie: option A, the first
    assert p.extra["below_chance"] is flagged


def test_verbalized_probability_template_reads_a_probability():
    fake = FakeChat()
    p = ask(fake, template="1stage-prob")
    c = float(f"{_unit(question_of(fake.bodies[0]['messages']), 'conf'):.2f}")
    assert p.extra["stated_confidence"] == pytest.approx(c)


def test_verbalized_two_stage_asks_the_confidence_in_a_second_turn_of_the_same_conversation():
    fake = FakeChat()
    p = ask(fake, template="2stage")
    first, second = fake.bodies
    assert len(first["messages"]) == 1 and "letter of the correct option only" in first["messages"][0]["content"]
    assert second["messages"][:1] == first["messages"]
    assert second["messages"][1] == {"role": "assistant", "content": p.extra["responses"][0]}
    assert second["messages"][2] == {"role": "user", "content": CONFIDENCE_QUESTION}
    assert p.extra["stated_confidence"] == pytest.approx(round(100 * _unit(question_of(first["messages"]), "conf"))
                                                         / 100)
    assert p.extra["usage"]["requests"] == 2


def test_ptrue_reads_true_against_false_from_the_top_logprobs_of_a_proposed_answer():
    fake = FakeChat()
    p = ask(fake, source="ptrue")
    answer, judge = fake.bodies
    assert "logprobs" not in answer and judge["logprobs"] is True and judge["max_tokens"] == 1
    letter = p.extra["answer_letter"]
    assert f"Proposed answer: {letter}. " in judge["messages"][0]["content"]
    p_true = 0.1 + 0.8 * _unit(question_of(judge["messages"]), "ptrue")
    assert p.extra["p_true"] == pytest.approx(p_true)  # (0.9 p) / (0.9 p + 0.9 (1 - p)): "The" left out
    assert p.probs[LETTERS.index(letter)] == pytest.approx(p_true) and p.extra["p_true_missing"] is None
    assert p.extra["below_chance"] == (p_true < 0.25)


class AwkwardJudge(FakeChat):
    """The P(True) request misbehaves first: ``stop``: the model ends at once with no logprobs unless asked with
    min_tokens (llama.cpp's habit); ``bad``: the first P(True) response's logprobs are not log-probabilities."""

    def __init__(self, how: str):
        super().__init__()
        self.how, self.judged = how, 0

    def reply(self, body: dict) -> dict:
        if body.get("logprobs") and self.how == "stop" and "min_tokens" not in body:
            with self.lock:
                self.bodies.append(body)
            return {"choices": [{"index": 0, "message": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 50, "completion_tokens": 0, "total_tokens": 50}}
        r = super().reply(body)
        if body.get("logprobs") and self.how == "bad" and self.judged == 0:
            self.judged += 1
            r["choices"][0]["logprobs"]["content"][0]["top_logprobs"][0]["logprob"] = 0.7  # above 0: no logprob
        return r


def test_ptrue_counts_both_requests_when_the_model_stops_at_once():
    fake = AwkwardJudge("stop")
    p = ask(fake, source="ptrue")
    answer, first, again = fake.bodies
    assert "min_tokens" not in first and again["min_tokens"] == 1 and p.extra["p_true"] is not None
    assert p.extra["usage"]["requests"] == 3  # the answer, the judge that stopped at once, the judge again
    assert p.extra["usage"]["prompt_tokens"] == len(answer["messages"][0]["content"].split()) + 50 + 50


def test_ptrue_retries_an_invalid_logprob_response_as_a_server_fault():
    fake = AwkwardJudge("bad")
    p = ask(fake, source="ptrue")
    assert len(fake.bodies) == 3 and p.extra["p_true"] is not None
    assert p.extra["parse"]["status"] == "ok" and p.extra["usage"]["requests"] == 3


def test_ptrue_refuses_a_server_whose_logprobs_stay_invalid_naming_the_question():
    class AlwaysBad(AwkwardJudge):
        def reply(self, body):
            self.judged = 0
            return super().reply(body)

    with pytest.raises(LlmcalError, match="question q1: invalid response: .*in each of"):
        ask(AlwaysBad("bad"), source="ptrue")


def test_ptrue_refuses_a_server_without_logprobs():
    with pytest.raises(LlmcalError, match="returned no log-probabilities.*--confidence verbalized or consistency"):
        ask(FakeChat(logprobs=False), source="ptrue")


def test_consistency_probabilities_are_the_vote_shares_with_exact_zeros():
    fake = FakeChat()
    p = ask(fake, source="consistency", samples=12, temperature=1.0)
    assert len(fake.bodies) == 12
    assert [b["seed"] for b in fake.bodies] == [derive_seed(0, "q1", "sample", i, 0) for i in range(12)]
    assert all(b["temperature"] == 1.0 for b in fake.bodies)
    votes = [LETTERS.index(s) for s in p.extra["samples"]]
    want = np.bincount(votes, minlength=4) / 12
    assert list(p.probs) == list(want) and 0.0 in p.probs  # this question's fake model never picks some letter
    assert p.conf == max(want) and p.logits[list(p.probs).index(0.0)] == math.log(1e-12)


def test_reasoning_reads_the_letter_of_the_last_answer_line():
    fake = FakeChat()
    p = ask(fake, source="consistency", samples=3, reasoning=True)
    assert all(b["max_tokens"] == 512 and "Think step by step" in b["messages"][0]["content"] for b in fake.bodies)
    for text, letter in zip(p.extra["responses"], p.extra["samples"]):
        assert text.endswith(f"Answer: {letter}") and text.startswith("Option ")  # another letter came first


# ---- the unparseable rule -------------------------------------------------------------------------
def test_an_unreadable_reply_is_asked_again_with_the_reason_and_the_retries_are_recorded():
    fake = FakeChat(garble=2)
    p = ask(fake, template="1stage-percent", max_parse_retries=2)
    assert len(fake.bodies) == 3
    third = fake.bodies[2]["messages"]
    assert [m["role"] for m in third] == ["user", "assistant", "user", "assistant", "user"]
    assert third[2]["content"].startswith("Your reply could not be read (no option letter). Reply in exactly")
    assert p.extra["parse"] == {"status": "ok", "retries": 2, "reasons": ["no option letter"] * 2}
    assert p.extra["responses"][:2] == ["Hmm, that is a hard one."] * 2


def test_after_the_retries_the_question_is_uniform_and_flagged_never_dropped():
    fake = FakeChat(garble=3)
    p = ask(fake, template="1stage-percent", max_parse_retries=1)
    assert len(fake.bodies) == 2
    assert p.probs == (0.25,) * 4 and p.extra["stated_confidence"] is None
    assert p.extra["parse"] == {"status": "unparseable", "retries": 1, "reasons": ["no option letter"] * 2,
                                "reason": "no option letter", "stage": "verbalized"}


def test_a_reply_cut_off_by_the_token_limit_says_so_in_its_reason_but_not_to_the_model():
    fake = FakeChat(garble=1)
    answer = fake.reply

    def cut(body):
        r = answer(body)
        if "could not be read" not in body["messages"][-1]["content"]:
            r["choices"][0]["finish_reason"] = "length"
        return r

    fake.reply = cut
    p = ask(fake, template="1stage-percent", max_new_tokens=7)
    assert p.extra["parse"]["reasons"] == ["no option letter; cut off at 7 tokens (--max-new-tokens)"]
    assert fake.bodies[1]["messages"][2]["content"].startswith("Your reply could not be read (no option letter). ")


def test_consistency_leaves_an_unreadable_sample_out_of_the_votes_after_its_retries():
    fake = FakeChat(garble=99)  # every sample names no option
    p = ask(fake, source="consistency", samples=2, max_parse_retries=1)
    assert len(fake.bodies) == 4 and p.extra["samples"] == [None, None]
    assert p.extra["parse"]["status"] == "unparseable" and p.extra["parse"]["unparseable_samples"] == 2
    assert p.probs == (0.25,) * 4


# ---- records: round trip, zeros, metrics, calibrators -------------------------------------------------
def test_a_record_with_zeros_round_trips_as_strict_json_and_metrics_and_calibrators_stay_finite():
    from llmcal.metrics.summary import metrics_from_predictions
    from llmcal.posthoc import compare_methods

    rng = np.random.default_rng(0)
    preds = []
    for i in range(40):
        votes = rng.integers(0, 4, size=5) if i % 3 else np.full(5, i % 4)  # some questions unanimous
        probs = np.bincount(votes, minlength=4) / 5
        p = Prediction.from_probs(f"q{i}", None, int(rng.integers(0, 4)), probs,
                                  extra={"confidence": "consistency", "samples": [LETTERS[v] for v in votes]})
        line = json.dumps(p.to_dict(), allow_nan=False)  # no -Infinity: logits are floored
        back = Prediction.from_dict(json.loads(line))
        assert back == p and back.probs == tuple(probs) and back.extra["samples"] == p.extra["samples"]
        preds.append(p)
    m = metrics_from_predictions(preds, n_bootstrap=20)
    numbers = {k: v for k, v in m.items() if isinstance(v, float)}
    assert {"accuracy", "conf_ece", "brier", "nll", "aurc", "platt_ece_1_bin"} <= set(numbers)
    assert all(math.isfinite(v) for v in numbers.values()), numbers
    assert m["nll"] <= -math.log(1e-12)  # a zero on the right answer costs log(1e-12), not infinity
    comparison = compare_methods(preds[:20], preds[20:], "all", n_bootstrap=0)
    assert set(comparison.skipped) == {"contextual"}  # every other calibrator runs on floored logits
    for row in comparison.rows:
        assert all(math.isfinite(v) for v in row.scores.values()), row.method


def test_logprob_records_read_back_as_before():
    p = Prediction.from_logits("a", "s", 1, [0.0, -1.0, -2.0])
    d = p.to_dict()
    assert list(d) == ["id", "subject", "answer", "probs", "pred", "conf", "logits"]
    assert Prediction.from_dict(d) == p and p.extra is None


# ---- whole runs ---------------------------------------------------------------------------------
class FakeServer:
    """The fake model behind a real HTTP server on 127.0.0.1; requests after ``hold_after`` wait for ``gate``."""

    def __init__(self, fake: FakeChat | None = None, *, hold_after: int | None = None):
        self.fake = fake or FakeChat()
        self.hold_after = hold_after
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
                    server.gate.wait(600)
                data = json.dumps(server.fake.reply(body)).encode()
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


def cfg(url: str, **kw) -> EvalConfig:
    return EvalConfig(**{"model": "fake-model", "data": DATA, "backend": "openai", "base_url": url,
                         "n_bootstrap": 20, "concurrency": 2, **kw})


@pytest.mark.parametrize("source, extra, requests_per_question", [
    ("verbalized", {}, 1), ("verbalized", {"verbalized_template": "2stage"}, 2), ("ptrue", {}, 2),
    ("consistency", {"samples": 3}, 3)])
def test_each_source_writes_an_ordinary_run_with_the_confidence_block(tmp_path, source, extra,
                                                                      requests_per_question):
    with FakeServer() as srv:
        rec = run_eval(cfg(srv.url, confidence=source, **extra), tmp_path / "run", progress=False)
        assert srv.count == 12 * requests_per_question  # no probe: asked in words means the chat endpoint
    doc = json.loads((tmp_path / "run" / "metrics.json").read_text())
    block = doc["confidence"]
    assert block["source"] == source and block["n"] == 12 and block["unparseable"] == 0 and block["retries"] == 0
    assert block["requests"] == 12 * requests_per_question and block["prompt_tokens"] > 0
    assert block["completion_tokens"] > 0 and block["seconds"] >= 0 and block["parse_rate"] == 1.0
    assert block["template"] == (extra.get("verbalized_template", "1stage-percent") if source == "verbalized" else None)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["confidence"] == source and config["max_parse_retries"] == 2
    preds = load_predictions(tmp_path / "run" / "predictions.jsonl")
    assert all(p.extra["confidence"] == source and p.extra["responses"] for p in preds)
    assert rec.meta["api_mode"] == "chat" and rec.metrics["n"] == 12 and "ci" in rec.metrics
    assert "## Confidence source" in (tmp_path / "run" / "report.md").read_text()


def test_unparseable_questions_are_counted_in_the_block(tmp_path):
    with FakeServer(FakeChat(garble=99)) as srv:
        run_eval(cfg(srv.url, confidence="verbalized", max_parse_retries=1, limit=4), tmp_path / "run",
                 progress=False)
    block = json.loads((tmp_path / "run" / "metrics.json").read_text())["confidence"]
    assert (block["n"], block["unparseable"], block["retries"], block["requests"]) == (4, 4, 4, 8)
    assert block["parse_rate"] == 0.0


def test_a_logprobs_run_keeps_its_config_and_counts_its_requests(tmp_path):
    """--confidence logprobs (the default) writes the config.json it wrote before the option existed."""
    plain = config_fields(EvalConfig(model="m", data=DATA))
    assert not {"confidence", "verbalized_template", "samples", "sample_temperature", "reasoning",
                "max_parse_retries", "max_new_tokens"} & set(plain)
    with LogprobServer() as srv:
        run_eval(cfg(srv.url, top_logprobs=5), tmp_path / "run", progress=False)
        sent = srv.count
    block = json.loads((tmp_path / "run" / "metrics.json").read_text())["confidence"]
    assert block["source"] == "logprobs" and block["requests"] == sent - 1  # the api-mode probe is not scoring
    assert block["questions_costed"] == block["questions_timed"] == 12 and block["unparseable"] == 0


@pytest.mark.parametrize("kw, msg", [
    ({"backend": "hf", "base_url": None, "confidence": "verbalized"}, "needs --backend openai"),
    ({"confidence": "verbalized", "samples": 5}, "--samples goes with --confidence consistency"),
    ({"samples": 5}, "--samples goes with --confidence consistency .not --confidence logprobs"),
    ({"confidence": "ptrue", "verbalized_template": "2stage"}, "--verbalized-template goes with --confidence verbalized"),
    ({"confidence": "consistency", "api_mode": "completions"}, "talks to the chat endpoint"),
    ({"confidence": "consistency", "template": "plain"}, "talks to the chat endpoint"),
    ({"confidence": "ptrue", "permutations": "cyclic"}, "--permutations cyclic goes with --confidence logprobs"),
    ({"confidence": "verbalized", "reasoning": True}, "--reasoning with --confidence verbalized goes with"),
    ({"confidence": "consistency", "samples": 0}, "--samples must be (an integer >= 1|a positive integer)"),
    ({"confidence": "consistency", "sample_temperature": 3.0}, "--sample-temperature must be a number from 0 to 2"),
    ({"confidence": "ptrue", "max_parse_retries": -1}, "--max-parse-retries must be an integer >= 0"),
    ({"confidence": "ptrue", "max_new_tokens": 0}, "--max-new-tokens must be a positive integer"),
])
def test_options_that_cannot_apply_are_refused_before_the_run_starts(tmp_path, kw, msg):
    with pytest.raises(LlmcalError, match=msg):
        run_eval(cfg("http://127.0.0.1:9/v1", **kw), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_calibrate_ts_refuses_a_confidence_source(tmp_path):
    with pytest.raises(LlmcalError, match="applies to llmcal eval; fit post-hoc calibrators .* calibrate --from"):
        run_calibrate_ts(cfg("http://127.0.0.1:9/v1", confidence="verbalized"), tmp_path / "ts", progress=False)


def test_cli_refuses_a_confidence_source_for_a_local_backend_with_exit_2(tmp_path):
    from typer.testing import CliRunner

    from llmcal.cli import app

    r = CliRunner().invoke(app, ["eval", "--model", "m", "--data", DATA, "--out", str(tmp_path / "run"),
                                 "--confidence", "consistency"])
    assert r.exit_code == 2, r.output
    assert "needs --backend openai" in " ".join(r.output.split())


def test_a_killed_consistency_run_resumes_to_the_same_predictions_file(tmp_path):
    """SIGKILL the CLI mid-run; the rerun asks only the questions left and ends with the uninterrupted file."""
    samples = 3
    with FakeServer() as srv:
        run_eval(cfg(srv.url, confidence="consistency", samples=samples), tmp_path / "whole", progress=False)
    whole = (tmp_path / "whole" / "predictions.jsonl").read_bytes()

    out = tmp_path / "killed"
    with FakeServer(hold_after=5 * samples) as srv:  # five questions' samples, then the server hangs
        cmd = [sys.executable, "-c", "from llmcal.cli import main; main()", "eval", "--backend", "openai",
               "--base-url", srv.url, "--model", "fake-model", "--data", DATA, "--out", str(out),
               "--n-bootstrap", "20", "--concurrency", "2", "--confidence", "consistency", "--samples", str(samples)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env={**os.environ, "LLMCAL_PROGRESS": "0"}, start_new_session=True)
        pred_file = out / "predictions.jsonl"
        deadline = time.monotonic() + 300
        last, stable_since = -1, time.monotonic()
        while time.monotonic() < deadline and proc.poll() is None:
            lines = len(pred_file.read_bytes().splitlines()) if pred_file.exists() else 0
            if lines != last:
                last, stable_since = lines, time.monotonic()
            # both workers hang on a request; the questions before them are written
            if srv.count >= 5 * samples + 2 and lines >= 3 and time.monotonic() - stable_since > 1.0:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        partial = pred_file.read_bytes().splitlines()
        assert 3 <= len(partial) <= 5 and not (out / "metrics.json").exists()
        assert partial == whole.splitlines()[:len(partial)]
        srv.gate.set()
        before = srv.count
        rec = run_eval(cfg(srv.url, confidence="consistency", samples=samples), out, progress=False)
        assert srv.count - before == samples * (12 - len(partial))  # only the questions left
    assert (out / "predictions.jsonl").read_bytes() == whole
    assert rec.results[0].metrics["n"] == 12
    block = json.loads((out / "metrics.json").read_text())["confidence"]
    assert block["requests"] == 12 * samples  # summed from the records: the killed attempt's requests count too
    # the seconds are this process's: they cover the questions it scored, and the block says how many
    assert block["questions_timed"] == 12 - len(partial) and block["questions_costed"] == 12
