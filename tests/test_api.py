"""llmcal.api and ``import llmcal``: the public face, its docs (docs/api.md, README's "Library use") run as written."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import llmcal
from llmcal import LlmcalError

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(path: Path, section: str | None = None) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if section is not None:
        text = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_import_llmcal_is_lazy_and_loads_no_torch():
    code = ("import sys, llmcal; assert 'torch' not in sys.modules and 'llmcal.api' not in sys.modules; "
            "llmcal.evaluate, llmcal.EvalConfig, llmcal.FinetuneConfig, llmcal.load_run, llmcal.Prediction; "
            "assert 'torch' not in sys.modules, 'torch'; print(sorted(llmcal.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in ("evaluate", "calibrate", "diagnose", "load_run", "EvalConfig", "FinetuneConfig", "Prediction",
                 "LlmcalError"):
        assert f"'{name}'" in out


def test_every_name_in_all_resolves_and_an_unknown_one_is_an_attribute_error():
    for name in llmcal.__all__:
        assert getattr(llmcal, name) is not None
    assert llmcal.calibrate is __import__("llmcal.api").api.calibrate
    with pytest.raises(AttributeError, match="no attribute 'nosuchname'"):
        llmcal.nosuchname  # noqa: B018


def test_importing_the_evaluate_module_keeps_llmcal_evaluate_the_function():
    import importlib

    import llmcal.evaluate  # noqa: F401  (binds nothing over the function)
    from llmcal.evaluate import EvalConfig

    assert callable(llmcal.evaluate) and llmcal.evaluate.__module__ == "llmcal.api"
    assert importlib.import_module("llmcal.evaluate").EvalConfig is EvalConfig is llmcal.EvalConfig


@pytest.mark.parametrize("call, message", [
    (lambda: llmcal.evaluate("m", "d", out="x", split="validation"), "--split 'validation': choose one of"),
    (lambda: llmcal.evaluate("m", "d", out="x", n_bins=0), "--n-bins must be a positive integer"),
    (lambda: llmcal.evaluate("m", "d", out="x", nosuch=1), "unknown key 'nosuch'"),
    (lambda: llmcal.evaluate("m", "d", out="x", calib_fraction=0.3), "--calib-fraction does not apply to eval"),
    (lambda: llmcal.evaluate("m", "d", out="x", method="ts"), "--method does not apply to eval"),
    (lambda: llmcal.evaluate("m", out="x"), "eval needs --data"),
    (lambda: llmcal.evaluate("m", "d", out="x", lm_eval_norm="acc_norm"), "--lm-eval-norm goes with --from-lm-eval"),
    (lambda: llmcal.evaluate(out="x", from_lm_eval="nowhere", limit=3), "--limit: not used with --from-lm-eval"),
    (lambda: llmcal.calibrate("m", "d", method="xyz", out="x"), "unknown --method 'xyz'"),
    (lambda: llmcal.calibrate("m", method="cft", train="d", evals=["d"], calib_fraction=0.3, out="x"),
     "--calib-fraction applies to --method ts, not to --method cft"),
    (lambda: llmcal.calibrate("m", "d", method="ts", epochs=2, out="x"),
     "--epochs applies to --method cft, rcft and auto, not to --method ts"),
    (lambda: llmcal.calibrate("m", method="ts", out="x"), "--method ts needs --data"),
    (lambda: llmcal.calibrate("m", "d", method="ts"), "missing option --out"),
    (lambda: llmcal.calibrate("m", "d", method="ts", out="x", training_args={"warmup_steps": 1}),
     "training arguments \\(warmup_steps\\) apply to --method cft"),
    (lambda: llmcal.calibrate("m", method="cft", train="d", out="x"), "needs at least one --eval dataset"),
    (lambda: llmcal.calibrate(from_run="r", epochs=3), "--epochs does not apply to calibrate --from"),
    (lambda: llmcal.diagnose("m", out="x"), "the regime diagnosis needs --train"),
    (lambda: llmcal.diagnose("m", "d", out="x", tolerance=-1.0), "--tolerance must be a finite number >= 0"),
])
def test_options_are_refused_with_the_cli_message_before_anything_is_loaded(call, message, tmp_path,
                                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LlmcalError, match=message):
        call()
    assert not (tmp_path / "x").exists()


def test_cli_and_api_refuse_the_same_option_with_the_same_message(tmp_path):
    from typer.testing import CliRunner

    from llmcal.cli import app

    r = CliRunner().invoke(app, ["eval", "-m", "m", "-d", "d", "--split", "validation", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2
    with pytest.raises(LlmcalError) as e:
        llmcal.evaluate("m", "d", out=tmp_path / "x", split="validation")
    assert " ".join(str(e.value).split()) in " ".join(r.output.split())


def test_calibrate_reads_a_config_file_and_keyword_options_win(tmp_path):
    from llmcal.api import calibration_config

    f = tmp_path / "opts.yaml"
    f.write_text("method: rcft\nmodel: m\ntrain: d\nevals: [d]\nepochs: 5\nlr: 0.01\nwarmup_steps: 2\n")
    cfg = calibration_config(None, f, lr=0.5)
    assert isinstance(cfg, llmcal.FinetuneConfig)
    assert (cfg.method, cfg.epochs, cfg.lr, cfg.training_args) == ("rcft", 5, 0.5, {"warmup_steps": 2})
    f.write_text("model: m\nlrr: 1\n")
    with pytest.raises(LlmcalError, match="opts.yaml: unknown key 'lrr'"):
        calibration_config("ts", f, data="d")


def test_evaluate_returns_the_run_and_its_metrics_equal_load_run(tiny_model_dir, tmp_path):
    rec = llmcal.evaluate(str(tiny_model_dir), "synthetic:arithmetic?n=16", out=tmp_path / "ev", template="plain",
                          n_bootstrap=20)
    assert rec.metrics is rec.results[0].metrics and rec.main.label == "none"
    assert 0 <= rec.metrics["accuracy"] <= 1 and rec.metrics["n"] == 16
    again = llmcal.load_run(tmp_path / "ev")
    assert again.metrics["conf_ece"] == pytest.approx(rec.metrics["conf_ece"])
    assert again.diagnosis is None

    ts = llmcal.calibrate(str(tiny_model_dir), "synthetic:arithmetic?n=20", method="ts", out=tmp_path / "ts",
                          template="plain", n_bootstrap=20)
    assert ts.main.label == "ts" and ts.metrics is ts.results[1].metrics
    assert llmcal.load_run(tmp_path / "ts").main.label == "ts"


def _run_blocks(blocks: list[str], where: Path, monkeypatch, replace: dict[str, str] | None = None):
    monkeypatch.chdir(where)
    ns: dict = {}
    for block in blocks:
        for old, new in (replace or {}).items():
            block = block.replace(old, new)
        exec(compile(block, "<docs example>", "exec"), ns)  # noqa: S102
    return ns


def test_docs_api_examples_run_on_the_tiny_model(tiny_model_dir, tmp_path, monkeypatch, capsys):
    blocks = python_blocks(ROOT / "docs" / "api.md")
    assert len(blocks) >= 8 and 'MODEL = "smollm2-135m-instruct"' in blocks[0]
    ns = _run_blocks(blocks, tmp_path, monkeypatch,
                     {'MODEL = "smollm2-135m-instruct"': f"MODEL = {str(tiny_model_dir)!r}"})
    out = capsys.readouterr().out
    assert "--split 'validation': choose one of all, train, calib, test" in out
    assert ns["reg"].diagnosis.regime in ("calibratable", "non-calibratable", "undetermined")
    assert {r.method for r in ns["report"].comparison.rows} >= {"ts", "platt", "isotonic"}
    assert ns["ft"].main.label == "rcft" and (tmp_path / "runs" / "rcft" / "adapter").is_dir()


@pytest.mark.slow
def test_docs_api_examples_run_as_written(tmp_path, monkeypatch):
    _run_blocks(python_blocks(ROOT / "docs" / "api.md"), tmp_path, monkeypatch)


@pytest.mark.slow
def test_readme_library_use_runs_as_written(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(ROOT / "README.md", "Library use")
    assert blocks and "llmcal.evaluate(" in blocks[0]
    ns = _run_blocks(blocks, tmp_path, monkeypatch)
    assert ns["rec"].metrics["n"] == 100
    assert capsys.readouterr().out.strip()
