"""llmcal.lmeval on real lm-evaluation-harness outputs (tests/data/lm_eval, written by bench/lm_eval_samples.py).

The committed folder is one ``lm_eval run --log_samples`` of SmolLM2-135M-Instruct
(lm-eval 0.4.13): an MMLU-format task (acc), an ARC-format task on option texts
(acc, acc_norm, acc_bytes) and a generate_until task. No lm-eval import here.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from llmcal.errors import LlmcalError
from llmcal.lmeval import (UnsupportedTask, _gold, find_samples, read_lm_eval, run_from_lm_eval, target_kind,
                           task_subject)

DATA = Path(__file__).parent / "data" / "lm_eval"
RUN = DATA / "SmolLM2-135M-Instruct"
MMLU, ARC, GEN = "llmcal_lmeval_mmlu", "llmcal_lmeval_arcfmt", "llmcal_lmeval_gen"


def samples(task: str) -> Path:
    (p,) = RUN.glob(f"samples_{task}_*.jsonl")
    return p


def results() -> dict:
    (p,) = RUN.glob("results_*.json")
    return json.loads(p.read_text(encoding="utf-8"))


def records(task: str) -> list[dict]:
    return [json.loads(line) for line in samples(task).read_text(encoding="utf-8").splitlines()]


def test_committed_files_name_no_local_path():
    for p in DATA.rglob("*"):
        if p.is_file():
            text = p.read_text(encoding="utf-8")
            assert "/root/" not in text and "/work/" not in text and "/home/" not in text and "/tmp/" not in text, p


@pytest.mark.parametrize("norm,metric", [("none", "acc"), ("acc_norm", "acc_norm"), ("acc_bytes", "acc_bytes")])
def test_accuracy_equals_lm_evals_own_metric(norm, metric):
    data = read_lm_eval(DATA, norm=norm)
    reported = results()["results"]
    by_task = {t.task: t for t in data.tasks}
    assert set(by_task) == {MMLU, ARC}
    for name, t in by_task.items():
        lm = reported[name].get(f"{metric},none", reported[name]["acc,none"])  # MMLU letters: all norms are acc
        assert t.accuracy == lm  # exactly: the same argmax on the same numbers
        assert len(t.predictions) == reported[name]["sample_len"]
        # recomputed from the log-likelihoods as lm-eval does, and lm-eval's own per-sample values
        assert t.acc == reported[name]["acc,none"]
        assert t.reported == {m: reported[name][f"{m},none"] for m in ("acc", "acc_norm", "acc_bytes")
                              if f"{m},none" in reported[name]}
        if metric in t.logged:
            assert t.disagreements == 0 and t.logged[metric] == lm
    arc = by_task[ARC]
    assert arc.acc_norm == reported[ARC]["acc_norm,none"] and arc.acc_bytes == reported[ARC]["acc_bytes,none"]
    assert arc.acc_norm != arc.acc  # the length normalisation changes answers on this task


def test_probabilities_are_the_softmax_of_the_logged_logliks():
    for norm in ("none", "acc_norm", "acc_bytes"):
        preds = {p.id: p for p in read_lm_eval(DATA, norm=norm).predictions}
        for task in (MMLU, ARC):
            for rec in records(task):
                p = preds[f"{task}/{rec['doc_id']}"]
                ll = np.array([float(r[0]) for r in rec["filtered_resps"]])
                choices = [a["arg_1"][1:] for a in rec["arguments"].values()]  # target_delimiter " " removed
                n = {"none": np.ones(len(ll)),
                     "acc_norm": np.array([len(c) for c in choices], float),
                     "acc_bytes": np.array([len(c.encode("utf-8")) for c in choices], float)}[norm]
                z = ll / n
                e = np.exp(z - z.max())
                np.testing.assert_allclose(p.probs, e / e.sum(), rtol=1e-12, atol=1e-15)
                np.testing.assert_array_equal(p.logits, z)
                assert p.answer == int(rec["target"])
                assert p.subject == rec["doc"]["subject"]
                assert p.pred == int(np.argmax(z))
                if norm == "none":
                    assert float(p.correct) == rec["acc"]


def test_non_ascii_options_separate_acc_norm_from_acc_bytes():
    # acc_norm divides by characters, acc_bytes by UTF-8 bytes: on non-ASCII options the logits differ.
    a = {p.id: p for p in read_lm_eval(samples(ARC), norm="acc_norm").predictions}
    b = {p.id: p for p in read_lm_eval(samples(ARC), norm="acc_bytes").predictions}
    non_ascii = [f"{ARC}/{r['doc_id']}" for r in records(ARC)
                 if not all(a_["arg_1"].isascii() for a_ in r["arguments"].values())]
    assert non_ascii
    assert all(a[i].logits != b[i].logits for i in non_ascii)


def test_digit_target_read_as_lm_eval_reads_it(tmp_path):
    # Document 60 of the ARC-format task has options "1", "2", ...: its target "1" is the index 1 (the
    # template's digits), not the option spelled "1". The results file's task config says so ...
    (rec,) = [r for r in records(ARC) if r["doc_id"] == 60]
    assert rec["target"] == "1" and rec["arguments"]["gen_args_0"]["arg_1"] == " 1"
    assert target_kind(results()["configs"][ARC], rec["doc"]) == "index"
    (p,) = [p for p in read_lm_eval(DATA).predictions if p.id == f"{ARC}/60"]
    assert p.answer == 1
    # ... and without it, the per-sample metrics the record carries single out index 1.
    alone = tmp_path / samples(ARC).name
    shutil.copy(samples(ARC), alone)
    t = read_lm_eval(alone).tasks[0]
    assert t.reported == {} and t.accuracy == results()["results"][ARC]["acc,none"]
    assert [p.answer for p in t.predictions if p.id == f"{ARC}/60"] == [1]
    # With neither, llmcal refuses rather than guess.
    bare = [dict(r) for r in records(ARC)]
    for r in bare:
        for m in ("acc", "acc_norm", "acc_bytes"):
            r.pop(m)
    lone = tmp_path / "samples_x_2024-01-01T00-00-00.000000.jsonl"
    lone.write_text("".join(json.dumps(r) + "\n" for r in bare), encoding="utf-8")
    with pytest.raises(LlmcalError, match=rf"{lone.name}:61: target '1' is ambiguous"):
        read_lm_eval(lone)
    assert target_kind({"doc_to_target": "answer"}, {"answer": 2}) == "index"
    assert target_kind({"doc_to_target": "answer"}, {"answer": "2"}) == "text"


def test_folder_discovery_and_task_choice(tmp_path):
    data = read_lm_eval(DATA)  # the nested <model>/samples_<task>_<date>.jsonl layout, from the top folder
    assert [t.task for t in data.tasks] == [ARC, MMLU]
    assert list(data.skipped) == [GEN] and "generate_until" in data.skipped[GEN]
    assert data.model == "SmolLM2-135M-Instruct"
    assert [p.id for p in data.predictions][:2] == [f"{ARC}/0", f"{ARC}/1"]
    one = read_lm_eval(DATA, task=MMLU)
    assert [t.task for t in one.tasks] == [MMLU] and len(one.predictions) == 120
    assert [f.task for f in find_samples(RUN, [ARC, MMLU])] == [ARC, MMLU]
    with pytest.raises(LlmcalError, match=rf"no samples of task 'nope'; the folder has {ARC}, {GEN}, {MMLU}"):
        read_lm_eval(DATA, task="nope")
    with pytest.raises(LlmcalError, match=f"holds the samples of task '{MMLU}', not {ARC}"):
        read_lm_eval(samples(MMLU), task=ARC)
    # A group of the results file stands for its tasks.
    shutil.copytree(RUN, tmp_path / "run")
    (res,) = (tmp_path / "run").glob("results_*.json")
    doc = json.loads(res.read_text())
    doc["group_subtasks"] = {"both": [MMLU, "inner"], "inner": [ARC]}
    res.write_text(json.dumps(doc))
    assert {t.task for t in read_lm_eval(tmp_path, task="both").tasks} == {MMLU, ARC}
    # Two runs of one task in one folder: ambiguous.
    shutil.copy(samples(MMLU), tmp_path / "run" / f"samples_{MMLU}_2030-01-01T00-00-00.000000.jsonl")
    with pytest.raises(LlmcalError, match=f"2 samples files for task '{MMLU}'.*pass one of the files"):
        read_lm_eval(tmp_path, task=MMLU)
    assert [t.task for t in read_lm_eval(tmp_path, task=ARC).tasks] == [ARC]
    doc["group_subtasks"]["ghost"] = ["not_run"]
    res.write_text(json.dumps(doc))
    with pytest.raises(LlmcalError, match="group 'ghost' has no samples files of its tasks"):
        read_lm_eval(tmp_path / "run", task="ghost")
    only_gen = tmp_path / "gen"
    only_gen.mkdir()
    shutil.copy(samples(GEN), only_gen)
    with pytest.raises(LlmcalError, match=r"no multiple-choice task llmcal can read \(.*generate_until"):
        read_lm_eval(only_gen)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LlmcalError, match="no samples_.*--log_samples"):
        read_lm_eval(empty)


def test_subjects_and_ids(tmp_path):
    assert task_subject("mmlu_anatomy") == "anatomy"
    assert task_subject("mmlu_continuation_college_physics") == "college_physics"
    assert task_subject("arc_challenge") == "arc_challenge"
    data = read_lm_eval(DATA, task=MMLU)  # the document's subject field when it has one
    assert [p.subject for p in data.predictions] == [r["doc"]["subject"] for r in records(MMLU)]
    assert [p.id for p in data.predictions] == [f"{MMLU}/{r['doc_id']}" for r in records(MMLU)]
    recs = records(MMLU)[:4]
    for r in recs:
        del r["doc"]["subject"]
    p = _write(tmp_path / "samples_mmlu_anatomy_2024-05-01T12-00-00.000001.jsonl", recs)
    got = read_lm_eval(p).predictions  # otherwise the task name
    assert {g.subject for g in got} == {"anatomy"} and got[0].id == "mmlu_anatomy/0"


def _write(path: Path, recs) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs), encoding="utf-8")
    return path


def test_bad_input_names_file_and_line(tmp_path):
    recs = records(MMLU)
    lines = samples(MMLU).read_text(encoding="utf-8").splitlines()
    cut = _write(tmp_path / f"samples_{MMLU}_t.jsonl", lines[:9] + [lines[9][:200]])
    with pytest.raises(LlmcalError, match=rf"{cut.name}:10: not a JSON line .*truncated"):
        read_lm_eval(cut)
    with pytest.raises(UnsupportedTask, match=rf"{samples(GEN).name}:1: task '{GEN}' is not a multiple-choice task"):
        read_lm_eval(samples(GEN))
    with pytest.raises(UnsupportedTask, match=rf"{samples(GEN).name}:1: .*generate_until"):
        read_lm_eval(DATA, task=GEN)  # asked for by name: an error, not a silent skip
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(LlmcalError, match=rf"{missing}: no such file or folder"):
        read_lm_eval(missing)

    def bad(change, match, line=3):
        rs = [json.loads(json.dumps(r)) for r in recs[:5]]
        change(rs[line - 1])
        p = _write(tmp_path / f"samples_{MMLU}_b.jsonl", rs)
        with pytest.raises(LlmcalError, match=rf"{p.name}:{line}: {match}"):
            read_lm_eval(p)

    bad(lambda r: r["filtered_resps"][2].__setitem__(0, "abc"), "option 2's log-likelihood 'abc' is not a number")
    bad(lambda r: r["filtered_resps"][1].__setitem__(0, "nan"), "option 1's log-likelihood is nan")
    bad(lambda r: r.__setitem__("target", "7"), "target 7 is outside the 4 options")
    bad(lambda r: r.__setitem__("target", "[0, 2]"), r"target \[0, 2\] names 2 gold options")
    bad(lambda r: r.__setitem__("target", "E"), "target 'E' is neither an option index nor one of the options")
    bad(lambda r: r.__setitem__("target", "[a b]"), r"target '\[a b\]' is neither an option index")
    assert _gold("[citation needed]", ["x", "[citation needed]"], "w") == 1  # bracketed text, as lm-eval reads it
    assert _gold("[2]", ["x", "y", "z"], "w") == 2 and _gold(1, ["x", "y"], "w") == 1
    bad(lambda r: r.pop("target"), "no 'target'")
    bad(lambda r: r.__setitem__("doc_id", 0), "document 0 already on line 1")
    bad(lambda r: r["filtered_resps"].pop(), "3 responses for 4 requests")
    bad(lambda r: r.pop("filtered_resps") and r.pop("resps"), "no 'filtered_resps' or 'resps'")
    # a one-element list target and unfiltered resps are read
    rs = [json.loads(json.dumps(r)) for r in recs[:3]]
    rs[0]["target"] = f"[{rs[0]['target']}]"
    rs[1].pop("filtered_resps")
    p = _write(tmp_path / f"samples_{MMLU}_ok.jsonl", rs)
    got = read_lm_eval(p).predictions
    assert [g.answer for g in got] == [int(r["target"]) for r in recs[:3]]
    assert got[1].logits == tuple(float(x[0][0]) for x in recs[1]["resps"])
    # a loglikelihood task (one continuation per document) is not multiple choice
    one = json.loads(json.dumps(recs[0]))
    one["arguments"] = {"gen_args_0": one["arguments"]["gen_args_0"]}
    one["filtered_resps"] = one["filtered_resps"][:1]
    p = _write(tmp_path / "samples_lambada_2024-01-01T00-00-00.000000.jsonl", [one])
    with pytest.raises(UnsupportedTask, match=r":1: task 'lambada' .*one continuation per document"):
        read_lm_eval(p)
    with pytest.raises(LlmcalError, match="norm 'bytes': choose one of none, acc_norm, acc_bytes"):
        read_lm_eval(DATA, norm="bytes")


def test_run_from_lm_eval_writes_the_usual_run(tmp_path):
    from llmcal.predictions import load_predictions
    from llmcal.runs import recorded_path

    out = tmp_path / "run"
    rec = run_from_lm_eval(DATA, out, norm="acc_norm", n_bootstrap=50, progress=False)
    (res,) = rec.results
    lm = results()["results"]
    n = lm[MMLU]["sample_len"] + lm[ARC]["sample_len"]
    assert res.metrics["n"] == n
    # overall accuracy: lm-eval's acc_norm (ARC) and acc (MMLU, letters) weighted by their sizes
    expect = (lm[ARC]["acc_norm,none"] * lm[ARC]["sample_len"] + lm[MMLU]["acc,none"] * lm[MMLU]["sample_len"]) / n
    assert res.metrics["accuracy"] == pytest.approx(expect, abs=1e-12)
    assert len(load_predictions(out / "predictions.jsonl")) == n
    assert (out / "reliability.png").is_file() and (out / "metrics.json").is_file()
    assert rec.config["kind"] == "eval" and rec.model == "SmolLM2-135M-Instruct"
    assert rec.config["lm_eval_norm"] == "acc_norm"
    assert not Path(rec.config["from_lm_eval"]).is_absolute()
    assert recorded_path(rec.config["from_lm_eval"], out) == DATA.resolve()
    arc = rec.meta["lm_eval"][ARC]
    assert arc["llmcal_accuracy"] == arc["acc_norm"] == arc["results_json"]["acc_norm"] == arc["logged"]["acc_norm"]
    assert arc["per_sample_disagreements"] == 0 and not Path(arc["file"]).is_absolute()
    assert list(rec.meta["lm_eval_skipped"]) == [GEN]
    report = (out / "report.md").read_text()
    assert "## lm-evaluation-harness" in report and f"| {ARC} | 80 | {lm[ARC]['acc_norm,none']:.4f} |" in report
    with pytest.raises(LlmcalError, match="already holds a complete run"):
        run_from_lm_eval(DATA, out, norm="acc_norm", n_bootstrap=50, progress=False)
    with pytest.raises(LlmcalError, match=r"run_from_lm_eval: n_bins must be a positive integer \(got 0\)"):
        run_from_lm_eval(DATA, tmp_path / "x", n_bins=0)
