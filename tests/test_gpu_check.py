"""bench/gpu/check.py keeps working: its tiny CPU run passes its own checks and writes a portable result."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu" / "check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_cpu_run_passes_and_writes_a_portable_result(check, tmp_path):
    rc = check.main(["--tiny", "--device", "cpu", "--questions", "8", "--results", str(tmp_path)])
    [path] = tmp_path.glob("gpu-*-tiny.json")
    text = path.read_text()
    doc = json.loads(text)
    assert rc == 0 and doc["ok"] and not doc["errors"], doc["errors"]
    assert str(ROOT) not in text and str(Path.home()) not in text
    s = doc["sections"]
    assert s["peak"]["bf16_tflops"] > 0
    eq = s["equal"]["float32"]
    assert max(eq["loss_rel_diff"].values()) < check.LOSS_TOL and eq["same_prediction"] == "24/24"
    assert eq["max_logit_diff_prefix_cache_vs_full"] < check.LOGIT_TOL
    runs = s["scoring"]["tiny-llama"]["runs"]
    assert {"0-shot budget 256", "5-shot budget 256 prefix cache", "5-shot budget 256 full prompts"} <= set(runs)
    assert all(r["questions"] == 8 and r["questions_per_s"] > 0 and "share_of_peak" in r for r in runs.values())
    train = s["training"]["tiny-llama"]
    for method in ("cft", "rcft"):
        assert train[method]["steps"] == 2 and len(train[method]["losses"]) == 3 and train[method]["steps_per_s"] > 0
    # the same batches and initial weights: the RCFT term makes the first loss differ from CFT's
    assert train["rcft"]["losses"][0] != train["cft"]["losses"][0]
    assert "trl" in train  # measured, or recorded as skipped when trl is not installed


def test_a_failed_equality_check_fails_the_run(check, tmp_path, monkeypatch):
    monkeypatch.setattr(check, "LOGIT_TOL", -1.0)  # nothing can be that close
    rc = check.main(["--tiny", "--device", "cpu", "--skip", "peak,scoring,training", "--results", str(tmp_path)])
    doc = json.loads(next(tmp_path.glob("gpu-*.json")).read_text())
    assert rc == 1 and doc["ok"] is False and doc["sections"]["equal"]["ok"] is False


def test_shapes_are_the_real_models(check):
    import transformers

    for name, (cls, kw) in check.SHAPES.items():
        cfg = getattr(transformers, cls)(**kw)
        assert cfg.num_hidden_layers in (28, 32) and cfg.hidden_size in (1536, 4096)
    assert check.SHAPES["llama-3.1-8b"][1]["num_key_value_heads"] == 8
