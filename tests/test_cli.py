"""End to end through the CLI: eval, calibrate, report, data; bad input exits 2 with a clear message."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from llmcal.cli import app
from llmcal.posthoc import TemperatureScaler
from llmcal.predictions import load_predictions
from llmcal.runs import RunDir

from conftest import build_tiny_llama, build_tokenizer

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result


def test_eval_end_to_end(tiny_model_dir, mcq_file, tmp_path):
    out = tmp_path / "run"
    r = invoke("eval", "--model", tiny_model_dir, "--data", mcq_file, "--out", out, "--template", "plain")
    assert r.exit_code == 0, r.output
    assert RunDir(out).is_complete
    for name in ("config.json", "predictions.jsonl", "metrics.json", "reliability.png", "report.md"):
        assert (out / name).exists(), name
    preds = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == [f"q{i}" for i in range(24)]  # dataset order
    for p in preds:
        assert set(p) >= {"id", "subject", "answer", "probs", "pred", "conf"}
        assert abs(sum(p["probs"]) - 1) < 1e-6 and p["conf"] == max(p["probs"])
        assert len(p["probs"]) == 2 + int(p["id"][1:]) % 4  # mixed K kept per question
    m = json.loads((out / "metrics.json").read_text())
    res = m["results"][0]["metrics"]
    for key in ("accuracy", "conf_ece", "cw_ece", "em_ece", "mce", "brier", "nll", "auroc", "mean_conf", "ci",
                "reliability", "per_subject"):
        assert key in res
    assert set(res["per_subject"]) == {"math", "sums"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_spec"]["kind"] == "local"
    # a complete run is not silently overwritten
    r2 = invoke("eval", "--model", tiny_model_dir, "--data", mcq_file, "--out", out)
    assert r2.exit_code == 2 and "already holds a complete run" in r2.output


def test_calibrate_ts_and_report(tiny_model_dir, tmp_path):
    data = "synthetic:arithmetic?n=60&k=4&difficulty=1"
    out = tmp_path / "ts"
    r = invoke("calibrate", "--method", "ts", "--model", tiny_model_dir, "--data", data, "--out", out,
               "--template", "chat")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    before, after = m["results"]
    assert before["method"] == "none" and after["method"] == "ts"
    assert before["metrics"]["accuracy"] == after["metrics"]["accuracy"]  # TS keeps the argmax
    # the recorded temperature is the one a fresh scaler fits on the calibration predictions, and it lowers
    # their NLL (the fit minimises it over a range of T that contains T = 1)
    calib = load_predictions(out / "predictions-calib.jsonl")
    refit = TemperatureScaler().fit([p.logits for p in calib], [p.answer for p in calib])
    assert after["extra"]["temperature"] == pytest.approx(refit.temperature_, rel=1e-9)
    assert after["extra"]["calib_n"] == len(calib)
    assert after["extra"]["calib_nll_before"] == pytest.approx(
        -np.mean([np.log(p.probs[p.answer]) for p in calib]), rel=1e-9)
    assert after["extra"]["calib_nll_after"] <= after["extra"]["calib_nll_before"]
    assert (out / "reliability-ts.png").exists()
    ev = tmp_path / "ev"
    assert invoke("eval", "--model", tiny_model_dir, "--data", data, "--out", ev).exit_code == 0
    rep = tmp_path / "rep"
    r = invoke("report", out, ev, "--out", rep)
    assert r.exit_code == 0, r.output
    md = (rep / "report.md").read_text()
    # the ts row of the comparison table carries the ts result's accuracy from metrics.json, to 3
    # significant digits, the run named once for its rows (the none row above it)
    from llmcal.report.tables import format_value

    acc = format_value(after["metrics"]["accuracy"], after["metrics"]["ci"]["accuracy"], sig=3)
    assert re.search(rf"^\| ts \| none \| {re.escape(data)} \| test \|.*\n\|  \| ts \| {re.escape(data)} \| test \| "
                     rf"{before['metrics']['n']} \| {re.escape(acc)} \|", md, re.M), md
    html = (rep / "report.html").read_text()
    assert "data:image/png;base64," in html and "src=\"http" not in html


def test_report_refuses_incomplete_run(tmp_path):
    d = tmp_path / "half"
    RunDir(d).start({"model": "x"})
    r = invoke("report", d, "--out", tmp_path / "rep")
    assert r.exit_code == 2 and "not complete" in r.output


def test_data_list_and_show(tiny_model_dir, mcq_file):
    r = invoke("data", "list")
    assert r.exit_code == 0 and "mmlu" in r.output and "arc-challenge" in r.output
    r = invoke("data", "show", mcq_file, "-n", "2")
    assert r.exit_code == 0
    assert "\nAnswer:" in r.output and "A. " in r.output
    r = invoke("data", "show", mcq_file, "-n", "1", "--model", tiny_model_dir, "--template", "chat")
    assert r.exit_code == 0 and "<|im_start|>assistant" in r.output and "letter token ids" in r.output


BAD_CASES = {
    "malformed": ('{"id": "a", "question": "q", "choices": ["x", "y"], "answer": 0}\n{"id": "b", "question": \n',
                  [r"line 2"]),
    "missing_field": ('{"id": "a", "question": "q", "answer": 0}\n', [r"line 1", r"choice"]),
    "answer_range": ('{"id": "a", "question": "q", "choices": ["x", "y"], "answer": 5}\n', [r"line 1", r"answer"]),
    "one_choice": ('{"id": "a", "question": "q", "choices": ["x"], "answer": 0}\n', [r"line 1", r"choice"]),
    "too_many": (json.dumps({"id": "a", "question": "q", "choices": [str(i) for i in range(27)], "answer": 0}) + "\n",
                 [r"line 1", r"26"]),
    "duplicate": ('{"id": "a", "question": "q", "choices": ["x", "y"], "answer": 0}\n'
                  '{"id": "a", "question": "r", "choices": ["x", "y"], "answer": 1}\n', [r"line 2", r"duplicate"]),
    "empty_string": ('{"id": "a", "question": "", "choices": ["x", "y"], "answer": 0}\n', [r"line 1", r"empty"]),
    "empty_choice": ('{"id": "a", "question": "q", "choices": ["x", " "], "answer": 0}\n', [r"line 1", r"empty"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_exits_2_naming_file_and_line(case, tiny_model_dir, tmp_path):
    text, patterns = BAD_CASES[case]
    f = tmp_path / f"{case}.jsonl"
    f.write_text(text, encoding="utf-8")
    out = tmp_path / "run"
    r = invoke("eval", "--model", tiny_model_dir, "--data", f, "--out", out)
    assert r.exit_code == 2, r.output
    flat = " ".join(r.output.split())
    assert f.name in flat
    for p in patterns:
        assert re.search(p, flat, re.I), (p, flat)
    assert not RunDir(out).is_complete


def test_undecodable_bytes(tiny_model_dir, tmp_path):
    f = tmp_path / "latin.jsonl"
    f.write_bytes(b'{"id": "a", "question": "q", "choices": ["x", "y"], "answer": 0}\n'
                  b'{"id": "b", "question": "caf\xe9", "choices": ["x", "y"], "answer": 0}\n')
    r = invoke("eval", "--model", tiny_model_dir, "--data", f, "--out", tmp_path / "run")
    flat = " ".join(r.output.split())
    assert r.exit_code == 2 and "latin.jsonl" in flat and "line 2" in flat and "UTF-8" in flat.upper()


def test_nan_logits_exit_2_with_ids_and_run_not_complete(tiny_tokenizer, mcq_file, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    d = build_tiny_llama(tmp_path / "nan-model", tiny_tokenizer)
    st = d / "model.safetensors"
    w = load_file(st)
    w["lm_head.weight"] = torch.full_like(w["lm_head.weight"], float("nan"))
    save_file(w, st, metadata={"format": "pt"})
    out = tmp_path / "run"
    r = invoke("eval", "--model", d, "--data", mcq_file, "--out", out, "--template", "plain")
    flat = " ".join(r.output.split())
    assert r.exit_code == 2 and "NaN or infinite logits" in flat and "q0" in flat
    assert (out / "INCOMPLETE").exists() and not (out / "metrics.json").exists()


def test_multi_token_letters_exit_2(tmp_path, mcq_file):
    tok = build_tokenizer(letters_single=False)
    d = build_tiny_llama(tmp_path / "chars", tok)
    r = invoke("eval", "--model", d, "--data", mcq_file, "--out", tmp_path / "run", "--template", "plain")
    flat = " ".join(r.output.split())
    assert r.exit_code == 2 and "not exactly one new token" in flat and "'A'" in flat


def test_unknown_things_exit_2(tiny_model_dir, mcq_file, tmp_path):
    r = invoke("eval", "--model", tmp_path / "nope", "--data", mcq_file, "--out", tmp_path / "r")
    assert r.exit_code == 2 and "nope" in r.output, r.output
    r = invoke("eval", "--model", tiny_model_dir, "--data", tmp_path / "nope.jsonl", "--out", tmp_path / "r")
    assert r.exit_code == 2 and "nope.jsonl" in r.output, r.output
    r = invoke("eval", "--model", tiny_model_dir, "--data", mcq_file, "--out", tmp_path / "r", "--template", "x")
    assert r.exit_code == 2 and "template" in r.output
    r = invoke("calibrate", "--method", "platt", "--model", tiny_model_dir, "--data", mcq_file, "--out", tmp_path / "c")
    assert r.exit_code == 2 and "method" in r.output


def test_csv_with_column_mapping(tiny_model_dir, tmp_path):
    f = tmp_path / "exam.csv"
    f.write_text("prompt,A,B,C,label\nWhat is 1+1?,1,2,3,B\nWhat is 2+2?,4,5,6,A\nWhat is 3+3?,7,6,8,B\n",
                 encoding="utf-8")
    out = tmp_path / "run"
    r = invoke("eval", "--model", tiny_model_dir, "--data", f, "--out", out, "--template", "plain",
               "--mapping", "question=prompt,choices=A|B|C,answer=label")
    assert r.exit_code == 0, r.output
    preds = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["answer"] for p in preds] == [1, 0, 1] and all(len(p["probs"]) == 3 for p in preds)


def test_results_needs_finished_studies(tmp_path):
    r = invoke("results", tmp_path / "nostudy", "--out", tmp_path / "RESULTS.md")
    assert r.exit_code == 2 and "no study.json" in r.output
    assert not (tmp_path / "RESULTS.md").exists()


LM_EVAL = Path(__file__).parent / "data" / "lm_eval"


def test_eval_from_lm_eval_samples(tmp_path):
    """`eval --from-lm-eval` writes a complete run whose accuracy is lm-eval's own acc (results file)."""
    out = tmp_path / "lm"
    r = invoke("eval", "--from-lm-eval", LM_EVAL, "--lm-eval-task", "llmcal_lmeval_mmlu", "--n-bootstrap", 20,
               "--out", out)
    assert r.exit_code == 0, r.output
    assert RunDir(out).is_complete
    results = json.loads(next(LM_EVAL.rglob("results_*.json")).read_text())["results"]
    m = json.loads((out / "metrics.json").read_text())["results"][0]["metrics"]
    assert m["n"] == 120 and m["accuracy"] == pytest.approx(results["llmcal_lmeval_mmlu"]["acc,none"], abs=1e-12)
    assert "## lm-evaluation-harness" in (out / "report.md").read_text()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lm_eval_task"] == ["llmcal_lmeval_mmlu"] and not Path(cfg["from_lm_eval"]).is_absolute()


def test_eval_from_lm_eval_refuses_model_flags(tmp_path, tiny_model_dir):
    r = invoke("eval", "--from-lm-eval", LM_EVAL, "--dtype", "float32", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "--dtype: not used with --from-lm-eval" in r.output
    r = invoke("eval", "--from-lm-eval", LM_EVAL, "--lm-eval-norm", "bytes", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "--lm-eval-norm 'bytes'" in r.output
    r = invoke("eval", "--model", tiny_model_dir, "--out", tmp_path / "y")
    assert r.exit_code == 2 and "eval needs --data" in r.output
    r = invoke("eval", "--model", tiny_model_dir, "--data", "mmlu", "--lm-eval-norm", "acc_norm",
               "--out", tmp_path / "y")
    assert r.exit_code == 2 and "--lm-eval-norm goes with --from-lm-eval" in r.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_calibrate_dry_run_prints_the_resolved_config_and_writes_nothing(tmp_path, monkeypatch):
    import yaml

    import llmcal.train.run as train_run

    def no_training(*a, **kw):
        raise AssertionError("--dry-run must not train")

    monkeypatch.setattr(train_run, "run_finetune", no_training)
    out = tmp_path / "run"
    args = ["calibrate", "--method", "rcft", "--preset", "paper", "--model", "no-such-model-is-loaded",
            "--train", "mmlu", "--eval", "mmlu", "--epochs", "2", "--out", out, "--dry-run"]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    doc = yaml.safe_load(r.stdout)
    # the authors' script values, the option given on the command line kept, every option present
    assert (doc["lr"], doc["lora_r"], doc["lora_alpha"], doc["lora_dropout"]) == (5e-6, 128, 64, 0.05)
    assert (doc["batch_size"], doc["target_modules"], doc["dtype"]) == (2, "all-linear", "bf16-if-supported")
    assert doc["training_args"] == {"lr_scheduler_type": "cosine", "warmup_steps": 0.1}
    assert doc["epochs"] == 2 and doc["method"] == "rcft" and doc["preset"] == "paper"
    from dataclasses import fields

    from llmcal.train import FinetuneConfig

    assert list(doc) == [f.name for f in fields(FinetuneConfig)]
    assert not out.exists()
    # the printout is a --config file that resolves to itself
    (tmp_path / "resolved.yaml").write_text(r.stdout)
    again = invoke("calibrate", "--config", tmp_path / "resolved.yaml", "--dry-run")
    assert again.exit_code == 0, again.output
    assert yaml.safe_load(again.stdout) == doc
    # bad options are still refused, with status 2
    bad = invoke(*args[:-1], "--rcft-variant", "official", "--rcft-lambda", "3", "--dry-run")
    assert bad.exit_code == 2 and "--rcft-lambda applies to --rcft-variant llmcal" in bad.output
