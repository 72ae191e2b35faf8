"""One validation layer (llmcal.validation, llmcal.options.config): the same bad value is refused with the same
words through the Python API, the CLI (exit 2, the flag named) and YAML (the file, the key and its line named)."""
from __future__ import annotations

import dataclasses
from typing import Literal

import pytest
from typer.testing import CliRunner

import llmcal
from llmcal.cli import app
from llmcal.errors import LlmcalError
from llmcal.evaluate import EvalConfig
from llmcal.regime import RegimeConfig
from llmcal.train.config import FinetuneConfig
from llmcal.validation import OpenFraction, PositiveInt, check_value, validated

EVAL = dict(model="m", data="d")
TRAIN = dict(model="m", train="t", evals=["e"])


def one_line(text: str) -> str:
    return " ".join(text.split())


def api_error(call) -> str:
    with pytest.raises(LlmcalError) as e:
        call()
    return one_line(str(e.value))


def cli_error(tmp_path, *args: str) -> str:
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert r.exit_code == 2, r.output
    assert not (tmp_path / "run").exists()  # refused before anything was written
    return one_line(r.output)


def config_file_error(tmp_path, text: str, *flags: str) -> tuple[str, str]:
    path = tmp_path / "opts.yaml"
    path.write_text(text)
    return str(path), cli_error(tmp_path, "calibrate", "--config", str(path), *flags)


def study_error(tmp_path, methods: str, extra: str = "") -> tuple[str, str]:
    from llmcal.study import load_study

    path = tmp_path / "s.yaml"
    path.write_text(f"models: {{m: x}}\ndata: {{test: mmlu, train: mmlu}}\nmethods:\n{methods}{extra}")
    with pytest.raises(LlmcalError) as e:
        load_study(path)
    return str(path), one_line(str(e.value))


def assert_yaml_names_the_key(tmp_path, words: str, key: str, value: str, *, before: str, line: int, method: str,
                              study: bool = True) -> None:
    """``key: value`` refused in ``words`` from a ``calibrate --config`` file (``before`` its other lines, the key at
    ``line``) and, with ``study``, from a study's ``method`` entry (line 5): each names the file, the key and its
    line."""
    path, msg = config_file_error(tmp_path, f"{before}{key}: {value}\n", "--method", method)
    assert f"{path}: {key} (line {line}): {words}" in msg, msg
    if study:
        path, msg = study_error(tmp_path, f"  {method}:\n    {key}: {value}\n")
        assert f"{path}: methods.{method}.{key} (line 5): {words}" in msg, msg


# ---- EvalConfig ---------------------------------------------------------------------------------
def test_a_bad_eval_range_reads_the_same_through_the_api_the_cli_and_yaml(tmp_path):
    words = "--n-bins must be a positive integer (got 0)"
    assert api_error(lambda: EvalConfig(**EVAL, n_bins=0)) == words
    assert api_error(lambda: llmcal.evaluate("m", "d", out=tmp_path / "run", n_bins=0)) == words
    assert words in cli_error(tmp_path, "eval", "-m", "m", "-d", "d", "--n-bins", "0")
    assert_yaml_names_the_key(tmp_path, words, "n_bins", "0", before="model: m\ndata: d\n", line=3, method="ts")


def test_a_bad_eval_choice_names_the_flag_and_lists_the_choices_everywhere(tmp_path):
    words = "unknown --split 'validation': choose one of all, train, calib, test"
    assert api_error(lambda: EvalConfig(**EVAL, split="validation")) == words
    assert api_error(lambda: llmcal.calibrate("m", "d", method="ts", out=tmp_path / "run", split="validation")) == words
    assert words in cli_error(tmp_path, "eval", "-m", "m", "-d", "d", "--split", "validation")
    assert_yaml_names_the_key(tmp_path, words, "split", "validation", before="model: m\ndata: d\n", line=3,
                              method="ts", study=False)


# ---- FinetuneConfig -----------------------------------------------------------------------------
def test_a_bad_training_range_reads_the_same_through_the_api_the_cli_and_yaml(tmp_path):
    words = "--lora-dropout must be a number in [0, 1) (got 2.0)"
    assert api_error(lambda: FinetuneConfig(**TRAIN, lora_dropout=2.0)) == words
    assert api_error(lambda: llmcal.calibrate("m", method="cft", train="t", evals=["e"], out=tmp_path / "run",
                                              lora_dropout=2.0)) == words
    assert words in cli_error(tmp_path, "calibrate", "--method", "cft", "-m", "m", "--train", "t", "--eval", "e",
                              "--lora-dropout", "2")
    assert_yaml_names_the_key(tmp_path, words, "lora_dropout", "2.0", before="model: m\ntrain: t\nevals: [e]\n",
                              line=4, method="cft")


def test_a_bad_training_choice_names_the_flag_and_lists_the_choices_everywhere(tmp_path):
    words = "unknown --nonmax-rule 'linear': choose one of proportional, tanh"
    assert api_error(lambda: FinetuneConfig(**TRAIN, nonmax_rule="linear")) == words
    assert words in cli_error(tmp_path, "calibrate", "--method", "rcft", "-m", "m", "--train", "t", "--eval", "e",
                              "--nonmax-rule", "linear")
    assert_yaml_names_the_key(tmp_path, words, "nonmax_rule", "linear", before="model: m\ntrain: t\nevals: [e]\n",
                              line=4, method="rcft")


def test_a_flag_overrides_the_file_and_a_problem_names_where_the_value_came_from(tmp_path):
    path = tmp_path / "opts.yaml"
    path.write_text("model: m\ntrain: t\nevals: [e]\nlora_r: 8\n")
    from llmcal.api import calibration_config

    msg = api_error(lambda: calibration_config("cft", path, lora_r=0))  # the keyword argument is the bad value
    assert msg == "--lora-r must be a positive integer (got 0)"
    path.write_text("model: m\ntrain: t\nevals: [e]\nlora_r: 0\nlora_alpha: -2\n")
    msg = api_error(lambda: calibration_config("cft", path))
    # every problem of the file in one message, each with its key and line
    assert f"{path}: lora_r (line 4): --lora-r must be a positive integer (got 0)" in msg, msg
    assert f"{path}: lora_alpha (line 5): --lora-alpha must be a positive integer (got -2)" in msg, msg


def test_the_calibrate_method_is_one_choice_of_ts_and_the_fine_tuning_methods(tmp_path):
    words = "unknown --method 'sft': choose one of ts, cft, rcft, auto"
    assert api_error(lambda: llmcal.calibrate("m", "d", method="sft", out=tmp_path / "run")) == words
    assert words in cli_error(tmp_path, "calibrate", "--method", "sft", "-m", "m", "-d", "d")
    # the config's own type refuses what its runner cannot do
    assert api_error(lambda: FinetuneConfig(**TRAIN, method="ts")) == (
        "unknown --method 'ts': choose one of cft, rcft, auto")


# ---- RegimeConfig -------------------------------------------------------------------------------
def test_a_bad_regime_tolerance_reads_the_same_through_the_api_the_cli_and_a_study(tmp_path):
    words = "--tolerance must be a finite number >= 0 (got -1.0)"
    assert api_error(lambda: RegimeConfig(model="m", train="t", tolerance=-1.0)) == words
    assert api_error(lambda: llmcal.diagnose("m", "t", out=tmp_path / "run", tolerance=-1.0)) == words
    assert words in cli_error(tmp_path, "regime", "-m", "m", "--train", "t", "--tolerance", "-1")
    # a study's regime: mapping is its own schema, worded by the same type
    path, msg = study_error(tmp_path, "  cft: {}\n", "regime: {tolerance: -1}\n")
    assert f"{path}: regime.tolerance (line 5): must be a finite number >= 0, got -1" in msg, msg


# ---- every config ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, required", [(EvalConfig, EVAL), (FinetuneConfig, TRAIN),
                                           (RegimeConfig, dict(model="m", train="t"))])
def test_configs_are_frozen_and_a_replace_is_checked_again(cls, required):
    cfg = cls(**required)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_bins = 5
    assert dataclasses.replace(cfg, n_bins=5).n_bins == 5 and cfg.n_bins == 10
    with pytest.raises(LlmcalError, match=r"^--n-bins must be a positive integer \(got 0\)$"):
        dataclasses.replace(cfg, n_bins=0)
    with pytest.raises(LlmcalError, match=r"^unknown key 'nosuch'$"):
        cls(**required, nosuch=1)
    with pytest.raises(LlmcalError, match=r"^--n-bins must be a positive integer \(got True\)$"):
        cls(**required, n_bins=True)  # a bool is no number
    with pytest.raises(LlmcalError, match=r"^missing --model$"):
        cls(**{k: v for k, v in required.items() if k != "model"})


def test_values_are_kept_as_given_so_config_json_does_not_change():
    cfg = FinetuneConfig(**TRAIN, epochs=2, lr=0.001)
    assert type(cfg.epochs) is int and cfg.epochs == 2 and cfg.lr == 0.001  # "epochs": 2 stays 2, not 2.0
    assert dataclasses.asdict(cfg) == dataclasses.asdict(FinetuneConfig(**TRAIN, epochs=2, lr=0.001))
    assert FinetuneConfig(**TRAIN, lr="2e-4").lr == 2e-4  # YAML 1.1 reads 2e-4 as a string
    assert FinetuneConfig(**{**TRAIN, "evals": ("e",)}).evals == ["e"]


def test_range_and_choice_fields_cover_what_the_old_hand_checks_did():
    """Each line was a hand-written check before; now the field's type says it."""
    cases = [
        (EvalConfig, EVAL, dict(calib_fraction=1.0), "--calib-fraction must be a number strictly between 0 and 1"),
        (EvalConfig, EVAL, dict(limit=0), "--limit must be a positive integer"),
        (EvalConfig, EVAL, dict(num_fewshot=65), "--num-fewshot must be an integer from 0 to 64"),
        (EvalConfig, EVAL, dict(permutations="shuffle"), "unknown --permutations 'shuffle': choose one of none, "
                                                          "cyclic, pride"),
        (EvalConfig, EVAL, dict(pride_fraction=0), "--pride-fraction must be a number in (0, 1]"),
        (EvalConfig, EVAL, dict(api_mode="batch"), "unknown --api-mode 'batch'"),
        (EvalConfig, EVAL, dict(max_retries=-1), "--max-retries must be an integer >= 0"),
        (EvalConfig, EVAL, dict(request_timeout=0), "--request-timeout must be a positive number"),
        (EvalConfig, EVAL, dict(template="fancy"), "unknown --template 'fancy': choose one of auto, plain, chat"),
        (FinetuneConfig, TRAIN, dict(processes=0), "--processes must be auto or a positive integer"),
        (FinetuneConfig, TRAIN, dict(max_steps=0), "--max-steps must be a positive integer or -1"),
        (FinetuneConfig, TRAIN, dict(estep_every="often"), "--estep-every must be 'epoch' or a positive number"),
        (FinetuneConfig, TRAIN, dict(estep_prior=float("inf")), "--estep-prior must be a finite number >= 0"),
        (FinetuneConfig, TRAIN, dict(rcft_alpha=1.5), "--rcft-alpha must be a number in [0, 1]"),
        (FinetuneConfig, TRAIN, dict(preset="huge"), "unknown --preset 'huge': choose one of default, paper"),
        (FinetuneConfig, TRAIN, dict(train_split="dev"), "unknown --train-split 'dev': choose one of train, calib"),
        (FinetuneConfig, TRAIN, dict(target_modules=""), "--target-modules must be all-linear or a non-empty list"),
        (FinetuneConfig, TRAIN, dict(training_args=[1]), "training_args: input should be a valid dictionary"),
        (RegimeConfig, dict(model="m", train="t"), dict(heldout_fraction=1.0),
         "--heldout-fraction must be a number strictly between 0 and 1"),
    ]
    for cls, required, bad, words in cases:
        with pytest.raises(LlmcalError) as e:
            cls(**required, **bad)
        assert str(e.value).startswith(words), (bad, str(e.value))


def test_rules_between_fields_stay_in_the_configs_check():
    from llmcal.evaluate import _check
    from llmcal.train.config import validate

    with pytest.raises(LlmcalError, match="--pride-fraction goes with --permutations pride"):
        _check(EvalConfig(**EVAL, pride_fraction=0.5))
    with pytest.raises(LlmcalError, match="does not split evenly"):
        validate(FinetuneConfig(**TRAIN, processes=2, batch_size=3))
    with pytest.raises(LlmcalError, match=r"--epochs must be a positive number \(got 0\); 0 goes only with"):
        validate(FinetuneConfig(**TRAIN, epochs=0))
    validate(FinetuneConfig(**TRAIN, epochs=0, max_steps=3))


# ---- functions ---------------------------------------------------------------------------------------
def test_validated_checks_the_annotated_parameters_and_names_them():
    seen = []

    @validated
    def fit(data: object, n_bins: PositiveInt = 10, *, level: OpenFraction = 0.95, mode: Literal["a", "b"] = "a"):
        seen.append((data, n_bins, level, mode))
        return n_bins

    thing = object()
    assert fit(thing, "3", level="0.5") == 3 and seen[-1] == (thing, 3, 0.5, "a")  # passed on as validated
    with pytest.raises(LlmcalError, match=r"^.*fit: n_bins must be a positive integer \(got 0\)$"):
        fit(thing, 0)
    with pytest.raises(LlmcalError, match=r"fit: level must be a number strictly between 0 and 1 \(got 1\)"):
        fit(thing, level=1)
    with pytest.raises(LlmcalError, match=r"fit: unknown mode 'c': choose one of a, b"):
        fit(thing, mode="c")


def test_library_functions_refuse_bad_arguments_by_name():
    import numpy as np

    from llmcal.data.splits import split_heldout
    from llmcal.metrics import conf_ece

    with pytest.raises(LlmcalError, match=r"n_bins must be a positive integer \(got 0\)"):
        conf_ece(np.array([[0.6, 0.4]]), np.array([0]), n_bins=0)
    assert conf_ece(np.array([[0.6, 0.4]]), np.array([0]), n_bins=np.int64(2)) == pytest.approx(0.4)
    with pytest.raises(LlmcalError, match=r"split_heldout: fraction must be a number in \[0, 1\) \(got True\)"):
        split_heldout([], True)
    assert check_value(PositiveInt, np.int64(4), "n") == 4
