"""The fault suite: nothing wrong gets in, nothing half-done looks done (docs/reference.md#refused).

A misbehaving OpenAI-compatible server on 127.0.0.1 (NaN, infinite and positive log-probabilities,
garbage entries, probabilities adding up past 1), concurrent writers on one run directory, damaged run
files, unwritable output, duplicate YAML keys, columns a mapping names that a file lacks, credentials in
URLs and markup in data text.  Property tests generate malformed server responses, datasets and study
files and check the promise: a clean result or an LlmcalError (exit 2), never another exception, never a
complete-looking run with bad numbers.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmcal.backends.openai import (ApiQuestion, BadResponse, check_logprob, prediction_from_response, read_letters,
                                    request_body)
from llmcal.data.schema import Question
from llmcal.errors import LlmcalError
from llmcal.evaluate import EvalConfig, run_eval
from llmcal.pipeline import invalid_prediction
from llmcal.predictions import load_predictions

DATA = "synthetic:arithmetic?n=12"
Q4 = Question(id="q1", question="What is 2 + 2?", choices=("3", "4", "5", "6"), answer=1, subject="math")
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- a server that misbehaves --------------------------------------------------------------------
def good_top(prompt: str, n: int = 5) -> dict:
    """A valid first-token top list: a fixed function of the prompt (log-probabilities of one softmax)."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little"))
    vocab = [" A", " B", " C", " D", "The", " It", "\n", " w1", " w2", " w3"]
    z = rng.normal(size=len(vocab)) * 2.0
    z[:4] += 2.0
    lp = z - z.max() - np.log(np.exp(z - z.max()).sum())
    order = np.argsort(-lp)[:n]
    return {vocab[i]: float(lp[i]) for i in order}


def completion_doc(top: dict) -> dict:
    best = max(top, key=lambda t: top[t] if isinstance(top[t], (int, float)) else -1e9)
    return {"object": "text_completion", "choices": [{"index": 0, "text": best, "logprobs": {
        "tokens": [best], "token_logprobs": [top[best]], "top_logprobs": [top], "text_offset": [0]}}]}


class MisbehavingServer:
    """An OpenAI-compatible /completions endpoint on 127.0.0.1 (bounded: one thread per request, daemon).

    ``fault(prompt, n)`` returns a replacement top list (or None for a correct answer) for the n-th
    request; ``hold``: requests whose prompt contains it block until ``release()``.
    """

    def __init__(self, fault=None, *, hold: str | None = None):
        self.fault, self.hold = fault, hold
        self.count, self.lock, self.gate = 0, threading.Lock(), threading.Event()
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
                prompt = body.get("prompt") or body["messages"][-1]["content"]
                if server.hold and server.hold in prompt:
                    server.gate.wait(60)
                top = good_top(prompt, int(body.get("logprobs") or 5))
                bad = server.fault(prompt, n) if server.fault else None
                data = json.dumps(completion_doc(bad if bad is not None else top), allow_nan=True).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def release(self):
        self.gate.set()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def served(url: str, **kw) -> EvalConfig:
    return EvalConfig(**{"model": "m", "data": DATA, "backend": "openai", "base_url": url, "api_mode": "completions",
                         "n_bootstrap": 20, "top_logprobs": 5, "concurrency": 2, "max_retries": 1, **kw})


def questions():
    from llmcal.data import load_dataset

    return list(load_dataset(DATA).questions)


def cli(*args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from llmcal.cli import main; main()", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "LLMCAL_PROGRESS": "0", **(env or {})})


def assert_clean_failure(r: subprocess.CompletedProcess) -> str:
    """Exit 2, one `error:` line, no traceback."""
    err = r.stderr
    assert r.returncode == 2, (r.returncode, err)
    assert "Traceback" not in err and "error:" in err, err
    return " ".join(err.split())


# ---- values from a server ------------------------------------------------------------------------
@pytest.mark.parametrize("value, words", [
    (float("nan"), "nan, not a finite number"), (float("inf"), "inf, not a finite number"),
    (float("-inf"), "-inf, not a finite number"), (2.5, "2.5 > 0"), (1.0, "1.0 > 0"), ("-0.5", "not a number"),
    (None, "None, not a number"), (True, "True, not a number"),
])
def test_a_log_probability_that_is_not_finite_and_at_most_zero_is_refused(value, words):
    with pytest.raises(BadResponse, match=words.replace("(", r"\(").replace(".", r"\.")):
        check_logprob(value, " A")
    item = ApiQuestion(Q4, request_body(Q4, "completions", "m", 5))
    with pytest.raises(BadResponse):
        prediction_from_response(item, completion_doc({" A": value, " B": -2.0}), where="u")


def test_rounding_above_zero_reads_as_log_one_and_a_list_adding_past_one_is_refused():
    assert check_logprob(4e-7, "A") == 0.0 and check_logprob(-0.25, "A") == -0.25
    with pytest.raises(BadResponse, match=r"add up to probability 1\.8"):
        read_letters([(" A", math.log(0.9)), ("A", math.log(0.9))], 4)
    r = read_letters([(" A", math.log(0.6)), (" B", math.log(0.4000004))], 4)  # float rounding is fine
    assert r.mass == 1.0


def test_a_nan_from_the_server_is_refused_naming_url_question_and_value_and_the_run_resumes_when_fixed(tmp_path):
    qs = questions()
    poisoned = qs[4]
    state = {"broken": True}

    def nan_for_one(prompt, n):
        if state["broken"] and poisoned.question.strip() in prompt:
            return {" A": float("nan"), " B": -1.0}
        return None

    with MisbehavingServer() as srv:
        run_eval(served(srv.url), tmp_path / "whole", progress=False)
    whole = (tmp_path / "whole" / "predictions.jsonl").read_bytes()

    out = tmp_path / "run"
    with MisbehavingServer(nan_for_one) as srv:
        with pytest.raises(LlmcalError) as e:
            run_eval(served(srv.url), out, progress=False)
        msg = str(e.value)
        assert f"{srv.url}/completions: question {poisoned.id}: invalid response" in msg, msg
        assert "nan" in msg and "in each of 2 attempts" in msg and "rerun the same command" in msg, msg
        text = (out / "predictions.jsonl").read_text()
        assert "NaN" not in text and "Infinity" not in text
        assert all(invalid_prediction(p) is None for p in load_predictions(out / "predictions.jsonl"))
        assert poisoned.id not in text and not (out / "metrics.json").exists()
        state["broken"] = False  # the server is fixed: the same command resumes to a complete run
        before = srv.count
        rec = run_eval(served(srv.url), out, progress=False)
        assert 0 < srv.count - before < len(qs)  # only what was not recorded is asked again
    assert (out / "predictions.jsonl").read_bytes() == whole
    assert rec.results[0].metrics["n"] == len(qs) and math.isfinite(rec.results[0].metrics["conf_ece"])


def test_positive_log_probabilities_never_make_a_complete_looking_run(tmp_path):
    with MisbehavingServer(lambda prompt, n: {" A": 2.5, " B": 1.0, " C": -0.5}) as srv:
        r = cli("eval", "--backend", "openai", "--base-url", srv.url, "--model", "m", "--data", DATA,
                "--api-mode", "completions", "--max-retries", "0", "--out", str(tmp_path / "run"))
    msg = assert_clean_failure(r)
    assert "2.5 > 0" in msg and "question arithmetic/" in msg, msg
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert not (tmp_path / "run" / "predictions.jsonl").read_text().strip()


def test_an_invalid_record_left_by_an_older_llmcal_is_scored_again_on_resume(tmp_path):
    """Before this check a served NaN was written into predictions.jsonl and every rerun failed the same way."""
    with MisbehavingServer() as srv:
        run_eval(served(srv.url), tmp_path / "whole", progress=False)
        whole = (tmp_path / "whole" / "predictions.jsonl").read_text().splitlines()
        out = tmp_path / "run"  # what the older llmcal left: an interrupted run whose first record holds a NaN
        out.mkdir()
        (out / "config.json").write_text((tmp_path / "whole" / "config.json").read_text())
        (out / "INCOMPLETE").write_text("")
        bad = json.loads(whole[0])
        bad["logits"][0] = float("nan")
        (out / "predictions.jsonl").write_text(json.dumps(bad) + "\n" + whole[1] + "\n")
        before = srv.count
        rec = run_eval(served(srv.url), out, progress=False)
        assert srv.count - before == len(whole) - 1  # the NaN question is asked again, the good one is not
    assert (out / "predictions.jsonl").read_text().splitlines() == whole
    assert math.isfinite(rec.results[0].metrics["nll"])


def test_a_prediction_that_is_no_distribution_is_never_appended(tmp_path, tiny_model_dir, monkeypatch):
    """A local model's NaN logits (say, a float16 overflow) stop the run before they reach the file."""
    import llmcal.scoring as scoring

    real = scoring.score

    def nan_scores(*a, on_batch=None, **kw):
        def poisoned(batch):
            on_batch([batch[0].__class__.from_logits(batch[0].id, batch[0].subject, batch[0].answer,
                                                     [float("nan")] * len(batch[0].logits))] + batch[1:])
        return real(*a, on_batch=poisoned, **kw)

    monkeypatch.setattr(scoring, "score", nan_scores)
    cfg = EvalConfig(model=str(tiny_model_dir), data=DATA, n_bootstrap=10, device="cpu", dtype="float32")
    with pytest.raises(LlmcalError, match=r"predictions\.jsonl: the scores of question arithmetic/\S+ are no "
                                          r"distribution \(a non-finite value"):
        run_eval(cfg, tmp_path / "run", progress=False)
    assert "NaN" not in (tmp_path / "run" / "predictions.jsonl").read_text()


@FAST
@given(st.dictionaries(st.sampled_from([" A", " B", "C", "\u0120D", "The", "x"]),
                       st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5), st.none(),
                                 st.text(max_size=3), st.booleans()), min_size=1, max_size=6),
       st.sampled_from(["completions", "chat"]))
def test_any_response_gives_a_distribution_or_a_refusal(top, shape):
    """Property: whatever the server puts into its top list, the result is a valid prediction or an error."""
    item = ApiQuestion(Q4, request_body(Q4, shape, "m", 5))
    if shape == "completions":
        doc = {"choices": [{"text": "A", "logprobs": {"tokens": ["A"], "token_logprobs": [None], "top_logprobs": [top]}}]}
    else:
        doc = {"choices": [{"message": {"content": "A"}, "logprobs": {"content": [
            {"token": "A", "logprob": None, "top_logprobs": [{"token": t, "logprob": v} for t, v in top.items()]}]}}]}
    try:
        p = prediction_from_response(item, doc, where="u")
    except LlmcalError:
        return
    assert invalid_prediction(p) is None
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) and v <= 1e-6 for v in top.values())


# ---- one writer per run directory ----------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from llmcal.runs import RunDir
    RunDir(sys.argv[1]).start({"kind": "eval", "x": 1})
    Path(sys.argv[2]).write_text("started")
    time.sleep(120)
""")


def _holder(tmp_path: Path, run: Path) -> tuple[subprocess.Popen, Path]:
    flag = tmp_path / f"started-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run), str(flag)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not flag.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return proc, flag


def test_a_second_process_on_a_live_run_is_refused_with_the_owners_pid_and_a_dead_owners_lock_is_taken(tmp_path):
    from llmcal.runs import RunDir

    run = tmp_path / "run"
    proc, _ = _holder(tmp_path, run)
    try:
        with pytest.raises(LlmcalError, match=rf"another llmcal process \(pid {proc.pid}\) is writing this run"):
            RunDir(run).start({"kind": "eval", "x": 1})
        with pytest.raises(LlmcalError, match=rf"pid {proc.pid}"):  # --overwrite does not take a live run either
            RunDir(run).start({"kind": "eval", "x": 2}, overwrite=True)
    finally:
        proc.kill()
        proc.wait()
    rd = RunDir(run)
    assert rd.start({"kind": "eval", "x": 1}) is True  # the owner died: its lock is stale, the run resumes
    assert (run / ".llmcal.lock").read_text().split()[0] == str(os.getpid())
    rd.finish(kind="eval", model="m", results=[])
    assert not (run / ".llmcal.lock").exists() and rd.is_complete


def test_two_processes_started_at_the_same_instant_one_runs_and_the_other_is_told_why(tmp_path):
    script = textwrap.dedent("""
        import sys, time
        from llmcal.errors import LlmcalError
        from llmcal.runs import RunDir
        while time.time() < float(sys.argv[2]):
            pass
        try:
            RunDir(sys.argv[1]).start({"kind": "eval"})
        except LlmcalError as e:
            print("REFUSED", e)
            sys.exit(2)
        print("STARTED")
        time.sleep(3)
    """)
    run, at = tmp_path / "run", time.time() + 3
    procs = [subprocess.Popen([sys.executable, "-c", script, str(run), str(at)], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert sum("STARTED" in o for o in outs) == 1, outs
    refused = [o for o in outs if "REFUSED" in o]
    assert len(refused) == 2 and all("another llmcal process (pid" in o for o in refused), outs


def test_a_second_cli_run_on_the_same_out_is_refused_while_the_first_scores(tmp_path):
    qs = questions()
    out = tmp_path / "run"
    with MisbehavingServer(hold=qs[5].question.strip()) as srv:
        first = subprocess.Popen([sys.executable, "-c", "from llmcal.cli import main; main()", "eval", "--backend",
                                  "openai", "--base-url", srv.url, "--model", "m", "--data", DATA, "--api-mode",
                                  "completions", "--n-bootstrap", "20", "--out", str(out)],
                                 stderr=subprocess.PIPE, text=True, env={**os.environ, "LLMCAL_PROGRESS": "0"})
        deadline = time.monotonic() + 60
        while srv.count < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        r = cli("eval", "--backend", "openai", "--base-url", srv.url, "--model", "m", "--data", DATA, "--api-mode",
                "completions", "--n-bootstrap", "20", "--out", str(out))
        msg = assert_clean_failure(r)
        assert f"another llmcal process (pid {first.pid}) is writing this run" in msg, msg
        srv.release()
        assert first.wait(120) == 0, first.stderr.read()
        assert srv.count == len(qs)  # one request per question: the refused process sent none
    assert len(load_predictions(out / "predictions.jsonl")) == len(qs) and not (out / ".llmcal.lock").exists()


# ---- every fault one line, exit 2 ----------------------------------------------------------------
def invoke(*args: str):
    from typer.testing import CliRunner

    from llmcal.cli import app

    return CliRunner().invoke(app, list(args))


def one_line(r) -> str:
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output and "usage:" not in r.output.lower(), r.output
    text = r.output[r.output.find("error: "):]  # after transformers' own progress bars (main() turns them off)
    assert text.startswith("error: "), r.output
    return " ".join(text.split())


CFT = ("calibrate", "--method", "cft", "--model", "/nonexistent/model", "--train", DATA, "--eval", DATA)


@pytest.mark.parametrize("flags, words", [
    (["--warmup-steps", "-5"], "warmup_steps >= 0"),
    (["--report_to", "nosuchthing"], "nosuchthing is not supported"),
    (["--warmup-steps", "abc"], "invalid float value: 'abc'"),
    (["--lr-scheduler-type", "bogus"], "invalid choice: 'bogus'"),
])
def test_training_arguments_and_integrations_are_refused_in_one_line_before_the_model_loads(tmp_path, flags, words):
    r = invoke(*CFT, "--out", str(tmp_path / "run"), *flags)
    msg = one_line(r)
    assert words in msg and "/nonexistent/model" not in msg, msg  # refused before the model is looked at
    assert len(r.output) < 700 and not (tmp_path / "run").exists()


def test_report_to_in_a_config_file_is_refused_before_the_model_loads(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("report_to: nosuchthing\nepochs: 1\n")
    msg = one_line(invoke(*CFT, "--config", str(cfg), "--out", str(tmp_path / "run")))
    assert "nosuchthing is not supported" in msg, msg


def test_an_out_that_cannot_be_created_is_one_line_naming_the_path(tmp_path, mcq_file, tiny_model_dir, monkeypatch):
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "run"
    args = ("eval", "--model", str(tiny_model_dir), "--data", str(mcq_file), "--out", str(out), "--device", "cpu")
    msg = one_line(invoke(*args))
    assert str(tmp_path / "afile") in msg and ("not a directory" in msg or "exists" in msg), msg
    monkeypatch.setenv("LLMCAL_DEBUG", "1")  # asked for: the exception itself, with its traceback
    r = invoke(*args)
    assert isinstance(r.exception, OSError)


class _FullDisk:
    """A file that accepts ``room`` writes, then fails as a full disk does (ENOSPC, no file name)."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, text):
        if self.room <= 0:
            raise OSError(28, "No space left on device")
        self.room -= 1
        return self.f.write(text)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_a_full_disk_is_one_line_naming_the_file_and_the_run_then_resumes(tmp_path, mcq_file, tiny_model_dir,
                                                                         monkeypatch):
    import builtins

    import llmcal.io

    out = tmp_path / "run"
    args = ("eval", "--model", str(tiny_model_dir), "--data", str(mcq_file), "--out", str(out), "--device", "cpu",
            "--dtype", "float32", "--n-bootstrap", "10", "--batch-tokens", "64")
    monkeypatch.setattr(llmcal.io, "open", lambda *a, **k: _FullDisk(builtins.open(*a, **k), 3), raising=False)
    msg = one_line(invoke(*args))
    assert f"{out / 'predictions.jsonl'}: no space left on the device; free some space and rerun" in msg, msg
    assert not (out / "metrics.json").exists()
    monkeypatch.undo()
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert len(load_predictions(out / "predictions.jsonl")) == 24


def test_a_corrupt_line_in_a_runs_own_predictions_names_file_line_and_overwrite(tmp_path, mcq_file, tiny_model_dir,
                                                                              monkeypatch):
    monkeypatch.setenv("LLMCAL_SCORE_CACHE", "0")  # the resume reads the file, not the scoring cache
    out = tmp_path / "run"
    args = ("eval", "--model", str(tiny_model_dir), "--data", str(mcq_file), "--out", str(out), "--device", "cpu",
            "--dtype", "float32", "--n-bootstrap", "10")
    assert invoke(*args).exit_code == 0
    lines = (out / "predictions.jsonl").read_text().splitlines()
    (out / "metrics.json").unlink()
    (out / "INCOMPLETE").write_text("")  # an interrupted run whose file was damaged in the middle
    (out / "predictions.jsonl").write_text("\n".join([lines[0], lines[1][:20], *lines[2:5]]) + "\n")
    msg = one_line(invoke(*args))
    assert f"{out / 'predictions.jsonl'} line 2: not a JSON record" in msg and "pass --overwrite" in msg, msg
    r = invoke(*args, "--overwrite")
    assert r.exit_code == 0, r.output


def test_a_damaged_config_json_names_the_file_and_line(tmp_path):
    from llmcal.runs import RunDir

    run = tmp_path / "run"
    rd = RunDir(run)
    rd.start({"kind": "eval"})
    rd.release()
    (run / "config.json").write_text('{"kind": "eval",\n  oops\n')
    with pytest.raises(LlmcalError, match=r"config\.json line 2: not valid JSON .*pass --overwrite"):
        RunDir(run).start({"kind": "eval"})
    assert RunDir(run).start({"kind": "eval"}, overwrite=True) is False


def test_a_bug_is_one_line_with_exit_1_and_debug_shows_it(tmp_path, monkeypatch):
    import importlib

    def broken(*a, **k):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(importlib.import_module("llmcal.evaluate"), "run_eval", broken)
    r = invoke("eval", "--model", "m", "--data", DATA, "--out", str(tmp_path / "run"))
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "internal error: ZeroDivisionError: boom" in " ".join(r.output.split())
    r = subprocess.run([sys.executable, "-c", "import sys, importlib; e = importlib.import_module('llmcal.evaluate')\n"
                        "e.run_eval = lambda *a, **k: 1 / 0\nfrom llmcal.cli import main; main()",
                        "--debug", "eval", "--model", "m", "--data", DATA, "--out", str(tmp_path / "r2")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" in r.stderr and "ZeroDivisionError" in r.stderr, r.stderr


# ---- ambiguous input refused; study cells checked at load ----------------------------------------
@pytest.mark.parametrize("text, key, first, second", [
    ("models: {m: x}\nmodels: {n: y}\ndata: {test: mmlu}\nmethods: [none]\n", "models", 1, 2),
    ("models: {m: x}\ndata: {test: mmlu}\nmethods:\n  none: {}\n  ts: {n_bins: 5}\n  ts: {n_bins: 20}\n", "ts", 5, 6),
    ("models:\n  m: {model: x, template: chat, template: plain}\ndata: {test: mmlu}\nmethods: [none]\n", "template",
     2, 2),
])
def test_a_key_given_twice_in_a_study_is_refused_with_both_lines(tmp_path, text, key, first, second):
    from llmcal.study import load_study

    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(LlmcalError, match=rf"s\.yaml line {second}: duplicate key {key!r} \(also at line {first}\)"):
        load_study(path)


def test_a_key_given_twice_in_a_calibrate_config_is_refused_with_both_lines(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1e-4\nepochs: 1\nlr: 5e-4\n")
    msg = one_line(invoke(*CFT, "--config", str(cfg), "--out", str(tmp_path / "run")))
    assert f"{cfg} line 3: duplicate key 'lr' (also at line 1)" in msg, msg


@pytest.mark.parametrize("defaults, where, words", [
    ("{n_bins: 0}", "defaults.n_bins (line 4)", "--n-bins must be a positive integer (got 0)"),
    ('{n_bootstrap: "many"}', "defaults.n_bootstrap (line 4)", "--n-bootstrap must be a positive integer (got 'many')"),
    ("{batch_tokens: 0}", "defaults.batch_tokens (line 4)", "--batch-tokens must be a positive integer"),
    ("{backend: openai}", "defaults.backend (line 4)", "--backend openai needs --base-url"),
])
def test_a_none_or_ts_cells_bad_option_is_refused_at_load_with_file_and_line(tmp_path, defaults, where, words):
    """Before, these surfaced after the base model was scored, with no file or line (or as a ValueError)."""
    from llmcal.study import load_study

    path = tmp_path / "s.yaml"
    path.write_text(f"models: {{m: x}}\ndata: {{test: mmlu, train: mmlu}}\nmethods: {{none: {{}}, ts: {{}}}}\n"
                    f"defaults: {defaults}\n")
    with pytest.raises(LlmcalError) as e:
        load_study(path)
    assert f"{path}: {where}: " in str(e.value) and words in str(e.value), str(e.value)


def test_a_training_cells_report_to_is_refused_at_study_load(tmp_path):
    from llmcal.study import load_study

    path = tmp_path / "s.yaml"
    path.write_text("models: {m: x}\ndata: {test: mmlu, train: mmlu}\nmethods:\n  cft:\n    epochs: 1\n"
                    "    training_args: {report_to: nosuchthing}\n")
    with pytest.raises(LlmcalError, match=r"s\.yaml: methods\.cft\.training_args\.report_to \(line 6\): .*nosuchthing is not "
                                          r"supported"):
        load_study(path)


# ---- secrets and markup ----------------------------------------------------------------------------
def test_credentials_in_the_base_url_are_never_recorded_or_printed(tmp_path):
    with MisbehavingServer() as srv:
        url = srv.url.replace("http://", "http://user:SECRETKEY@")
        rec = run_eval(served(url), tmp_path / "run", progress=False)
        assert rec.meta["base_url"] == srv.url.replace("http://", "http://***@")
    for f in (tmp_path / "run").iterdir():
        if f.suffix in (".json", ".jsonl", ".md"):
            assert "SECRETKEY" not in f.read_text(), f.name
    with MisbehavingServer(lambda prompt, n: {" A": float("nan")}) as srv:
        url = srv.url.replace("http://", "http://user:SECRETKEY@") + "?api_key=SECRETKEY2"
        r = cli("eval", "--backend", "openai", "--base-url", url, "--model", "m", "--data", DATA, "--api-mode",
                "completions", "--max-retries", "1", "--out", str(tmp_path / "bad"))
    msg = assert_clean_failure(r)
    assert "SECRETKEY" not in r.stderr and "http://***@127.0.0.1" in msg and "api_key=***" in msg, msg
    assert "SECRETKEY" not in (tmp_path / "bad" / "config.json").read_text()


def test_markup_in_subjects_and_names_is_escaped_in_report_md(tmp_path, tiny_model_dir):
    from conftest import write_jsonl

    recs = [{"id": f"<i>q{i}</i>", "question": f"What is {i} + 1?", "choices": [str(i), str(i + 1)], "answer": 1,
             "subject": "<script>alert(1)</script>" if i % 2 else "**bold** [link](http://x)"} for i in range(8)]
    data = write_jsonl(tmp_path / "d.jsonl", recs)
    out = tmp_path / "<b>run</b>"
    run_eval(EvalConfig(model=str(tiny_model_dir), data=str(data), n_bootstrap=10, device="cpu", dtype="float32"),
             out, progress=False)
    md = (out / "report.md").read_text()
    assert "<script>" not in md and "<b>" not in md and "**bold**" not in md, md
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md and "\\*\\*bold\\*\\* \\[link\\]" in md


# ---- property tests: malformed datasets and study files ------------------------------------------
_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-3, 30), st.floats(allow_nan=True),
                                 st.text(max_size=6)), lambda inner: st.lists(inner, max_size=4), max_leaves=6)
_RECORD = st.dictionaries(st.sampled_from(["id", "question", "choices", "answer", "subject", "explanation", "A", "x"]),
                          _VALUES, max_size=7)


def _good_record(i: int) -> dict:
    return {"id": f"q{i}", "question": f"Q{i}?", "choices": ["a", "b", "c"], "answer": i % 3}


@FAST
@given(st.lists(st.one_of(_RECORD, st.builds(_good_record, st.integers(0, 5))), min_size=0, max_size=5),
       st.sampled_from([".jsonl", ".json", ".csv"]),
       st.one_of(st.none(), st.sampled_from([{"choices": ["A", "x"]}, {"id": "x"}, {"answer": "A"}])),
       st.binary(max_size=8))
def test_any_dataset_file_loads_valid_questions_or_is_refused_with_a_message(tmp_path_factory, records, ext, mapping,
                                                                            junk):
    from llmcal.data.files import load_file
    from llmcal.data.schema import MAX_CHOICES, MIN_CHOICES

    path = tmp_path_factory.mktemp("d") / f"data{ext}"
    if ext == ".jsonl":
        path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records) + junk)
    elif ext == ".json":
        path.write_text(json.dumps(records))
    else:
        cols = sorted({k for r in records for k in r}) or ["id"]
        rows = [",".join(json.dumps(r.get(c)) if not isinstance(r.get(c), str) else r[c].replace(",", ";")
                         .replace("\n", " ").replace('"', "'") for c in cols) for r in records]
        path.write_bytes(("\n".join([",".join(cols), *rows]) + "\n").encode() + junk)
    try:
        qs = load_file(path, mapping)
    except LlmcalError as e:
        assert str(e).startswith(str(path)) or "mapping" in str(e), str(e)
        return
    assert len({q.id for q in qs}) == len(qs)
    for q in qs:
        assert q.id and q.question.strip() and MIN_CHOICES <= q.k <= MAX_CHOICES and 0 <= q.answer < q.k


_YAML_VALUES = st.one_of(st.integers(-2, 3), st.sampled_from(["many", "mmlu", "none", "ts", "", "x", "[", "{a: 1}"]),
                         st.floats(allow_nan=True), st.booleans(), st.none())
_STUDY_KEYS = st.sampled_from(["n_bins", "n_bootstrap", "limit", "seed", "batch_tokens", "template", "epochs",
                               "lr", "report_to", "calib_fraction", "split", "bogus"])


@FAST
@given(st.dictionaries(_STUDY_KEYS, _YAML_VALUES, max_size=3), st.sampled_from(["defaults", "methods.ts", "methods.cft"]),
       st.booleans())
def test_any_study_file_loads_or_is_refused_naming_the_file(tmp_path_factory, options, where, duplicate):
    from llmcal.study import load_study

    opts = "{" + ", ".join(f"{k}: {json.dumps(v) if v is not None else 'null'}" for k, v in options.items()) + "}"
    methods = {"ts": "{}", "cft": "{epochs: 1}", "none": "{}"}
    defaults = "{}"
    if where == "defaults":
        defaults = opts
    else:
        methods[where.split(".")[1]] = opts
    text = (f"models: {{m: x}}\ndata: {{test: mmlu, train: mmlu}}\ndefaults: {defaults}\nmethods:\n"
            + "".join(f"  {k}: {v}\n" for k, v in methods.items()) + ("seed: 1\nseed: 2\n" if duplicate else ""))
    path = tmp_path_factory.mktemp("s") / "s.yaml"
    path.write_text(text)
    try:
        load_study(path)
    except LlmcalError as e:
        assert str(e).startswith(str(path)), str(e)
        if duplicate:
            assert "duplicate key 'seed'" in str(e) or "line" in str(e)
        return
    assert not duplicate
