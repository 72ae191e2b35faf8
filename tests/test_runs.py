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
