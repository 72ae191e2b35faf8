"""Tests for llmcal.options: one source of configuration for the CLI flags, YAML keys and the Python API."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmcal.cli import app
from llmcal.errors import LlmcalError
from llmcal.evaluate import EvalConfig
from llmcal.options import cli_flags, flag_of, from_mapping
from llmcal.regime import RegimeConfig
from llmcal.train.config import FinetuneConfig, validate

SRC = Path(__file__).resolve().parents[1] / "src" / "llmcal"
CONFIGS = (EvalConfig, RegimeConfig, FinetuneConfig)


def _all_flags() -> set[str]:
    import typer.main

    flags = set()
    cmd = typer.main.get_command(app)

    def walk(c):
        for p in getattr(c, "params", []):
            flags.update(o for o in p.opts + p.secondary_opts if o.startswith("--"))
        for sub in getattr(c, "commands", {}).values():
            walk(sub)

    walk(cmd)
    return flags


def test_every_config_field_is_a_flag_with_help():
    flags = _all_flags()
    for cls in CONFIGS:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
            if f.metadata.get("cli", True):
                assert flag_of(cls, f.name) in flags, (cls.__name__, f.name)


def test_every_cli_option_has_help():
    import typer.main

    def walk(c, path):
        for p in getattr(c, "params", []):
            if p.param_type_name == "option":
                assert p.help, f"{path} {p.opts} has no help"
        for name, sub in getattr(c, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "llmcal")


def test_every_flag_named_in_the_source_exists():
    """Error messages and help texts may only name flags that the CLI has (or TrainingArguments fields)."""
    from transformers import TrainingArguments

    # Placeholders in docstrings, and flags of other tools (pip, torchrun) quoted in messages.
    flags = _all_flags() | {"--help", "--name", "--flag", "--field-name", "--no", "--force-reinstall"}
    training = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(TrainingArguments)}
    unknown = []
    for path in SRC.rglob("*.py"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]", line):
                if "_" in flag:  # TrainingArguments' and torchrun's own spelling (--output_dir, --nproc_per_node)
                    continue
                if flag not in flags and flag not in training and not flag.startswith("--no-"):
                    unknown.append(f"{path.relative_to(SRC)}:{n}: {flag}")
    assert not unknown, "flags that do not exist:\n" + "\n".join(unknown)


def test_validation_errors_name_real_flags():
    flags = _all_flags()
    cases = [dict(rcft_lambda=-1.0), dict(train_limit=0), dict(lora_dropout=2.0), dict(target_modules=""),
             dict(n_bootstrap=0), dict(estep_every="sometimes"), dict(nonmax_rule="x")]
    for kw in cases:
        with pytest.raises(LlmcalError) as e:  # refused when the config is built
            validate(FinetuneConfig(model="m", train="t", evals=["e"], **kw))
        named = re.findall(r"--[a-z][a-z0-9-]*", str(e.value))
        assert named and all(f in flags for f in named), (kw, str(e.value))


def test_yaml_mapping_is_validated_against_the_fields():
    cfg = from_mapping(FinetuneConfig, {"model": "m", "train": "t", "epochs": "2", "target_modules": "q,v"}, "f.yaml")
    assert cfg.epochs == 2.0 and cfg.target_modules == ["q", "v"]
    with pytest.raises(LlmcalError, match=r"f.yaml: unknown key 'epoch'"):
        from_mapping(FinetuneConfig, {"model": "m", "train": "t", "epoch": 2}, "f.yaml")
    with pytest.raises(LlmcalError, match=r"f.yaml: lora_r"):
        from_mapping(FinetuneConfig, {"model": "m", "train": "t", "lora_r": "big"}, "f.yaml")


def test_calibrate_config_file_and_training_arguments(tmp_path, monkeypatch):
    import llmcal.train.run as tr

    seen = {}

    def fake_run(cfg, out, **kw):
        seen["cfg"] = cfg
        raise LlmcalError("stop here")

    monkeypatch.setattr(tr, "run_finetune", fake_run)
    yml = tmp_path / "c.yaml"
    yml.write_text("model: m\ntrain: t\nevals: [e]\nepochs: 2\nreport_to: none\nwarmup_steps: 3\n")
    r = CliRunner().invoke(app, ["calibrate", "--method", "rcft", "--config", str(yml), "--epochs", "4",
                                 "--lr-scheduler-type", "cosine", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "stop here" in r.output
    cfg = seen["cfg"]
    assert cfg.method == "rcft" and cfg.epochs == 4.0 and cfg.evals == ["e"]  # the flag wins over the file
    assert cfg.training_args == {"report_to": "none", "warmup_steps": 3, "lr_scheduler_type": "cosine"}
    r = CliRunner().invoke(app, ["calibrate", "--method", "cft", "--model", "m", "--train", "t", "--eval", "e",
                                 "--out", str(tmp_path / "o"), "--learning_rate", "1"])
    assert r.exit_code == 2 and "--lr" in r.output
    r = CliRunner().invoke(app, ["calibrate", "--method", "ts", "--model", "m", "--data", "d", "--epochs", "2",
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--epochs applies to --method cft, rcft and auto" in r.output


def test_cli_flags_helper_matches_the_commands():
    assert cli_flags(RegimeConfig) <= _all_flags()
