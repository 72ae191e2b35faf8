"""The study config's schema: unknown keys, wrong types and unknown options are errors naming the file, the
key path as written and its YAML line; cell options follow the config classes' fields; the shipped studies
load."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from llmcal.errors import LlmcalError
from llmcal.study import Study, load_study

STUDIES = Path(__file__).resolve().parents[1] / "studies"

HEAD = "models: {m: x}\ndata:\n  test: mmlu\n"  # lines 1-3 of every config below


def load_error(tmp_path, text: str) -> str:
    path = tmp_path / "s.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(LlmcalError) as e:
        load_study(path)
    return str(e.value)


def test_unknown_key_named_with_its_path_and_line(tmp_path):
    msg = load_error(tmp_path, HEAD + "methods:\n  none: {}\nsweep:\n  a:\n    p:\n      optons: {}\n")
    assert re.search(r"s\.yaml: sweep\.a\.p\.optons \(line 9\): unknown key; a sweep point has vars, data, "
                     r"options", msg), msg
    msg = load_error(tmp_path, HEAD + "methods: [none]\nbogus: 1\n")
    assert "s.yaml: bogus (line 5): unknown key; a study has name, description" in msg, msg


def test_unknown_data_key_inside_a_list_names_the_index(tmp_path):
    msg = load_error(tmp_path, "models: {m: x}\ndata:\n  test:\n    - mmlu\n    - {spec: arc-easy, subjct: [a]}\n"
                               "methods: [none]\n")
    assert "data.test[1].subjct (line 5): unknown data key; use spec, subjects" in msg, msg


def test_wrong_types_are_named(tmp_path):
    msg = load_error(tmp_path, "seed: abc\n" + HEAD + "methods: [none]\nregime: 3\n")
    lines = msg.splitlines()
    # every problem at once, in the order of the file
    assert len(lines) == 2, msg
    assert "seed (line 1): input should be a valid integer, got 'abc'" in lines[0]
    assert "regime (line 6): must be false or a mapping with from / tolerance, got int" in lines[1]
    msg = load_error(tmp_path, "models: {m: x}\ndata:\n  test: {spec: mmlu, limit: many}\nmethods: [none]\n")
    assert "data.test.limit (line 3): must be a positive integer, got 'many'" in msg, msg
    msg = load_error(tmp_path, "models: {m: x}\ndata:\n  test: {spec: mmlu, limit: true}\nmethods: [none]\n")
    assert "data.test.limit (line 3)" in msg, msg  # a boolean is not a count
    msg = load_error(tmp_path, "models: {m: 3}\ndata: {test: mmlu}\nmethods: [none]\n")
    assert "models.m (line 1): must be a model name or a mapping with `model:` and options, got int" in msg, msg


def test_unknown_method_option_suggests_the_close_one(tmp_path):
    msg = load_error(tmp_path, HEAD + "methods:\n  cft:\n    epochs: 2\n    rcft_lamda: 1.0\n")
    assert re.search(r"methods\.cft\.rcft_lamda \(line 7\): unknown option \(did you mean 'rcft_lambda'\?\); "
                     r"fine-tuning \(FinetuneConfig\) options are: ", msg), msg
    # an evaluation option is not a fine-tuning option, and the other way round
    msg = load_error(tmp_path, HEAD + "methods:\n  ts:\n    epochs: 2\n")
    assert "methods.ts.epochs (line 6): unknown option; evaluation (EvalConfig) options are: " in msg, msg
    # the list form of methods names the line of the entry
    msg = load_error(tmp_path, HEAD + "methods:\n  - none\n  - sft\n")
    assert "methods.sft (line 6): unknown method 'sft'" in msg, msg


def test_options_the_study_sets_point_to_where_they_go(tmp_path):
    msg = load_error(tmp_path, HEAD + "defaults:\n  limit: 3\nmethods: [none]\n")
    assert "defaults.limit (line 5): is set by the study; say it in data: (limit of an entry)" in msg, msg


def test_missing_and_empty(tmp_path):
    msg = load_error(tmp_path, "data: {test: mmlu}\nmethods: [none]\n")
    assert msg.endswith("s.yaml: models: missing: name at least one model (key: {model: NAME, options...})"), msg
    msg = load_error(tmp_path, "models: {m: x}\ndata:\n  test: []\nmethods: [none]\n")
    assert "data.test (line 3): an empty list; give at least one data entry" in msg, msg
    msg = load_error(tmp_path, "models: {m: x}\ndata:\n  test: {spec: '  '}\nmethods: [none]\n")
    assert "data.test.spec (line 3): missing or empty: name the dataset" in msg, msg


def test_bad_names_and_values(tmp_path):
    msg = load_error(tmp_path, "models: {'a b': x}\ndata: {test: mmlu}\nmethods: [none]\n")
    assert "models.a b (line 1): 'a b' is not a usable name" in msg, msg
    msg = load_error(tmp_path, HEAD + "methods: [none]\nregime: {tolerance: -1}\n")
    assert "regime.tolerance (line 5): must be a finite number >= 0, got -1" in msg, msg
    msg = load_error(tmp_path, "models: {m: x}\ndata:\n  test: {spec: mmlu, fractions: {a: 0.5, b: 0.6}}\n"
                               "methods: [none]\n")
    assert "data.test.fractions (line 3): split fractions must sum to 1" in msg, msg


def test_every_config_field_is_an_option(tmp_path):
    """The options are the config classes' fields, read when the study loads (no list of them to keep up)."""
    from llmcal.evaluate import EvalConfig
    from llmcal.study.grid import STUDY_SET
    from llmcal.study.load import option_fields

    ev, tr = option_fields()
    assert ev == {f.name for f in dataclasses.fields(EvalConfig)}
    eval_only = {"permutations", "pride_fraction"}  # llmcal eval's debiasing, refused in a none/ts cell
    given = {f.name: f.default for f in dataclasses.fields(EvalConfig)
             if f.name not in set(STUDY_SET) | eval_only and f.default is not dataclasses.MISSING}
    assert {"template", "n_bins", "dtype"} <= set(given)
    path = tmp_path / "s.yaml"
    import yaml

    path.write_text(yaml.safe_dump({"models": {"m": "x"}, "data": {"test": "mmlu"}, "methods": {"none": given}}))
    (m,) = load_study(path).methods
    assert m.options == given


# ---- the shipped studies ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["offline", "regimes", "paper"])
def test_shipped_studies_load(name):
    s = load_study(STUDIES / f"{name}.yaml")
    assert isinstance(s, Study) and s.name == name
    cells = [c.name for c in s.cells()]
    assert len(cells) == len(set(cells))
    kinds = {c.kind for c in s.cells()}
    if name == "offline":
        assert {m.key for m in s.models} == {"smol", "gemma"}
        assert kinds == {"none", "ts", "cft", "rcft", "regime"}
        train, test, ood = (s.data[r][0] for r in ("train", "test", "ood"))
        assert train.subjects == test.subjects and not set(train.subjects) & set(ood.subjects)
        assert (train.split, test.split) == ("train", "test")
    if name == "regimes":
        assert kinds >= {"cft", "rcft", "auto"}
        assert {p.name for p in s.points} == {f"{d}-{b}" for d in ("easy", "hard") for b in ("wide", "broad", "narrow")}
        specs = {p.name: s.point_data(p)["train"][0] for p in s.points}
        assert "difficulty=4" in specs["hard-narrow"].spec and specs["hard-narrow"].limit == 48
        # the budgets order the training questions per pass: wide > broad > narrow
        assert specs["easy-wide"].limit > specs["easy-broad"].limit > specs["easy-narrow"].limit
    if name == "paper":
        assert len(s.data["train"]) == 3 and s.data["ood"][0].spec == "arc-challenge"
        assert all(m.options.get("preset") == "paper" for m in s.methods if m.training)
        assert {c.name for c in s.cells() if c.model.key == "tulu-sft"} == {"tulu-sft/none", "tulu-sft/ts"}


def test_offline_subject_split_is_disjoint_and_sized():
    from llmcal.data import load_dataset

    s = load_study(STUDIES / "offline.yaml")
    assert len(load_dataset("mmlu", subjects=list(s.data["test"][0].subjects))) > 1000
    assert len(load_dataset("mmlu", subjects=list(s.data["ood"][0].subjects))) > 1000


# ---- bad configs ---------------------------------------------------------------------------
BAD = [
    ("methods: {none: {}, bogus: {}}", "methods.bogus", "unknown method"),
    ("methods: {x: {method: sft}}", "methods.x.method", "unknown method"),
    ("methods: {ts: {epochs: 2}}", "methods.ts.epochs", "unknown option"),
    ("methods: {none: {temprature: 2}}", "methods.none.temprature", "unknown option"),
    ("methods: {none: {subjects: [a]}}", "methods.none.subjects", "set by the study"),
    ("defaults: {limit: 3}", "defaults.limit", "set by the study"),
    ("models: {}", "models", "missing"),
    ("models: {m: {template: plain}}", "models.m.model", "missing"),
    ("data: {train: {spec: mmlu}}", "data.test", "missing"),
    ("data: {test: {subjects: [a]}}", "data.test.spec", "missing"),
    ("data: {test: mmlu, valid: mmlu}", "data.valid", "unknown role"),
    ("data: {test: {spec: mmlu, split: dev}}", "data.test.split", "not a split"),
    ("data: {test: {spec: mmlu, limit: 0}}", "data.test.limit", "positive integer"),
    ("data: {test: {spec: mmlu, subjct: [a]}}", "data.test.subjct", "unknown data key"),
    ("bogus: 1", "bogus", "unknown key"),
    ("data: {test: 'synthetic:arithmetic?difficulty={d}'}", "data.test.spec", "variable"),
    ("sweep: {a: {p: {optons: {}}}}", "sweep.a.p.optons", "unknown key"),
    ("regime: {from: none}", "regime.from", "not a fine-tuning method"),
    ("data: {test: [mmlu, arc-easy]}\nsweep: {a: {p: {data: {test: {limit: 3}}}}}", "sweep point p: data.test",
     "list of entries"),
    ("data: {test: mmlu}\nsweep: {a: {p: {data: {test: {limt: 3}}}}}", "sweep.a.p.data.test.limt", "unknown"),
    ("models: {m: {model: x, methods: [cft]}}", "models.m.methods", "not a key"),
]


@pytest.mark.parametrize("override,key,words", BAD)
def test_bad_config_names_file_and_key(tmp_path, override, key, words):
    base = {"models": "models: {m: x}", "data": "data: {test: mmlu}", "methods": "methods: {none: {}}"}
    head = override.split(":", 1)[0]
    lines = [v for k, v in base.items() if k != head] + [override]
    path = tmp_path / "bad.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(LlmcalError) as e:
        load_study(path)
    msg = str(e.value)
    assert str(path) in msg and key in msg and words in msg, msg


def test_training_config_problems_are_caught_at_load(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("models: {m: x}\ndata: {test: mmlu}\nmethods: {cft: {}}\n", encoding="utf-8")
    with pytest.raises(LlmcalError, match=r"bad\.yaml: data\.train: missing"):
        load_study(path)
    path.write_text("models: {m: x}\ndata: {train: mmlu, test: mmlu}\nmethods: {cft: {epochs: -1}}\n",
                    encoding="utf-8")
    with pytest.raises(LlmcalError, match=r"bad\.yaml: methods\.cft.*epochs"):
        load_study(path)


def test_not_yaml(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("models: [unclosed\n", encoding="utf-8")
    with pytest.raises(LlmcalError, match="x.yaml: not valid YAML"):
        load_study(p)
