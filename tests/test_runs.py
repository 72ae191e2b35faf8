"""RunDir: the resume and overwrite rules of a run directory."""
from __future__ import annotations

import json

import pytest

from llmcal.errors import LlmcalError
from llmcal.runs import RunDir


def test_interrupted_run_resumes_with_the_same_config(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.start({"model": "a", "limit": 5}) is False
    (run.path / "predictions.jsonl").write_text("{}\n")
    assert RunDir(tmp_path / "r").start({"model": "a", "limit": 5}) is True
    assert (run.path / "predictions.jsonl").exists()


def test_interrupted_run_with_another_config_needs_overwrite_and_is_then_replaced(tmp_path):
    run = RunDir(tmp_path / "r")
    run.start({"model": "a", "limit": 5})
    (run.path / "predictions.jsonl").write_text("{}\n")
    with pytest.raises(LlmcalError, match="different configuration.*limit"):
        RunDir(tmp_path / "r").start({"model": "a", "limit": 9})
    assert RunDir(tmp_path / "r").start({"model": "a", "limit": 9}, overwrite=True) is False
    assert not (run.path / "predictions.jsonl").exists()  # nothing of the other run survives
    assert json.loads((run.path / "config.json").read_text())["limit"] == 9
    assert not run.is_complete


def test_served_client_settings_do_not_block_a_resume(tmp_path):
    """Concurrency, timeout, retries and the key variable change how requests are sent, not the numbers."""
    cfg = {"model": "m", "backend": "openai", "concurrency": 4, "request_timeout": 60.0, "max_retries": 5,
           "api_key_env": "OPENAI_API_KEY"}
    run = RunDir(tmp_path / "r")
    run.start(cfg)
    other = {**cfg, "concurrency": 1, "request_timeout": 5.0, "max_retries": 0, "api_key_env": "MY_KEY"}
    assert RunDir(tmp_path / "r").start(other) is True
    with pytest.raises(LlmcalError, match="different configuration"):
        RunDir(tmp_path / "r").start({**cfg, "top_logprobs": 5})


# --------------------------------------------------------------------------- refresh_metrics

HARNESS_KEYS = ("rms_ce", "ece_1_bin", "platt_ece_1_bin", "platt_ece_10_bin", "platt_coef", "platt_intercept",
                "selective_acc_at_10")


def _tiny_eval_run(tiny_model_dir, out, **kw):
    from llmcal.evaluate import EvalConfig, run_eval

    cfg = EvalConfig(model=str(tiny_model_dir), data="synthetic:arithmetic?n=40&k=4&difficulty=2", template="plain",
                     batch_tokens=200, n_bootstrap=50, **kw)
    run_eval(cfg, out, progress=False)
    return out


def _as_an_older_llmcal_wrote_it(run):
    """metrics.json without the harness numbers and their estimators, as runs written before them are."""
    doc = json.loads((run / "metrics.json").read_text())
    for res in doc["results"]:
        for key in HARNESS_KEYS:
            del res["metrics"][key]
            del res["metrics"]["estimators"][key]
    (run / "metrics.json").write_text(json.dumps(doc, indent=2))
    return doc


def test_refresh_metrics_restores_exactly_what_the_run_wrote_and_touches_nothing_else(tiny_model_dir, tmp_path):
    from llmcal.runs import load_run, refresh_metrics

    run = _tiny_eval_run(tiny_model_dir, tmp_path / "r")
    fresh = json.loads((run / "metrics.json").read_text())
    others = {p.name: p.read_bytes() for p in run.iterdir() if p.name != "metrics.json"}
    old = _as_an_older_llmcal_wrote_it(run)

    doc = refresh_metrics(run)
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk == doc
    # the metrics are what the run itself computed (the same call, the same recorded options) ...
    assert [r["metrics"] for r in on_disk["results"]] == [r["metrics"] for r in fresh["results"]]
    assert all(k in r["metrics"] and k in r["metrics"]["estimators"] for r in on_disk["results"] for k in HARNESS_KEYS)
    # ... and every other field is as it was, plus the stamp of the refresh
    assert set(on_disk) == set(old) | {"metrics_refreshed"}
    assert {k: v for k, v in on_disk.items() if k not in ("results", "metrics_refreshed")} == \
        {k: v for k, v in old.items() if k != "results"}
    assert [{k: v for k, v in r.items() if k != "metrics"} for r in on_disk["results"]] == \
        [{k: v for k, v in r.items() if k != "metrics"} for r in old["results"]]
    assert set(on_disk["metrics_refreshed"]) == {"llmcal_version", "at"}
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != "metrics.json"} == others
    assert load_run(run).metrics["rms_ce"] == fresh["results"][0]["metrics"]["rms_ce"]


def test_refresh_metrics_uses_the_options_the_run_recorded(tiny_model_dir, tmp_path):
    from llmcal.runs import refresh_metrics

    run = _tiny_eval_run(tiny_model_dir, tmp_path / "r", n_bins=5)
    before = json.loads((run / "metrics.json").read_text())["results"][0]["metrics"]
    after = refresh_metrics(run)["results"][0]["metrics"]
    assert after["n_bins"] == 5 and len(after["reliability"]["count"]) == 5
    assert after["ci"] == before["ci"] and after["conf_ece"] == before["conf_ece"]


def test_refresh_metrics_refuses_runs_it_cannot_recompute(tiny_model_dir, tmp_path):
    from llmcal.runs import refresh_metrics

    with pytest.raises(LlmcalError, match="not a run directory"):
        refresh_metrics(tmp_path / "nothing")
    run = _tiny_eval_run(tiny_model_dir, tmp_path / "r")
    good = (run / "metrics.json").read_bytes()
    preds = run / "predictions.jsonl"
    lines = preds.read_text().splitlines(keepends=True)
    preds.write_text("".join(lines[:-3]))
    with pytest.raises(LlmcalError, match=r"predictions.jsonl: 37 predictions but metrics.json counted 40"):
        refresh_metrics(run)
    preds.write_text("".join(lines[:5]) + "{not json\n")
    with pytest.raises(LlmcalError, match=r"predictions.jsonl:6: bad prediction record"):
        refresh_metrics(run)
    preds.unlink()
    with pytest.raises(LlmcalError, match="no predictions file"):
        refresh_metrics(run)
    assert (run / "metrics.json").read_bytes() == good  # a refused refresh leaves the file as it was
    (run / "INCOMPLETE").write_text("")
    with pytest.raises(LlmcalError, match="not complete"):
        refresh_metrics(run)
