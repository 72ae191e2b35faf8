"""A study fanned out: --list-cells, cells of one study run by several processes at once, the second process on
a held cell refused, `llmcal report DIR` assembling what is finished, and no credential in what a study records."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmcal.cli import app
from llmcal.errors import LlmcalError
from llmcal.runs import RunDir
from llmcal.study import run_study

from test_study_run import write_config

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def cli(*args, cache: Path) -> subprocess.Popen:
    """``llmcal ARGS`` in a process of its own (the scoring cache in ``cache``)."""
    env = {**os.environ, "LLMCAL_PROGRESS": "0", "LLMCAL_CACHE": str(cache)}
    return subprocess.Popen([sys.executable, "-c", "from llmcal.cli import main; main()", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(p: subprocess.Popen, timeout: int = 900) -> tuple[int, str]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    return p.returncode, out + err


@pytest.fixture
def no_model(monkeypatch):
    """Loading data or a model fails the test."""
    import llmcal.backends
    import llmcal.models

    def refuse(*a, **kw):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(llmcal.backends, "load_for_backend", refuse)
    monkeypatch.setattr(llmcal.models, "load_model", refuse)
    return refuse


def without_timings(doc: dict) -> dict:
    doc = {k: v for k, v in doc.items() if k not in ("updated", "wall_s_total")}
    doc["cells"] = [{k: v for k, v in c.items() if k != "wall_s"} for c in doc["cells"]]
    return doc


# ---- --list-cells ----------------------------------------------------------------------------------
def test_list_cells_prints_names_only_accepts_with_kind_and_status(tmp_path, tiny_model_dir, monkeypatch, no_model):
    cfg = write_config(tmp_path / "tiny.yaml", tiny_model_dir,
                       methods="none: {}\n  ts: {}\n  cft: {epochs: 1, batch_size: 4, drift: false}")
    import llmcal.data

    monkeypatch.setattr(llmcal.data, "load_dataset", lambda *a, **kw: pytest.fail("data was loaded"))
    r = invoke("study", cfg, "--list-cells")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == ["tiny/cft\tcft", "tiny/regime\tregime\t(runs after tiny/cft)",
                                     "tiny/none\tnone", "tiny/ts\tts"]
    out = tmp_path / "study"
    (out / "runs/tiny/none").mkdir(parents=True)
    (out / "runs/tiny/none/metrics.json").write_text("{}")  # complete: metrics.json and no INCOMPLETE marker
    half = RunDir(out / "runs/tiny/ts")
    half.start({"model": "x"})  # started, not finished: it would resume
    half.release()
    r = invoke("study", cfg, "--out", out, "--list-cells", "--only", "*/none", "--only", "tiny/ts")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == ["tiny/none\tnone\tdone", "tiny/ts\tts\tpartial"]
    r = invoke("study", cfg, "--out", out, "--list-cells", "--only", "tiny/cft")
    assert r.output.splitlines() == ["tiny/cft\tcft\tmissing", "tiny/regime\tregime\tmissing\t(runs after tiny/cft)"]
    r = invoke("study", cfg, "--list-cells", "--only", "tiny/nothing")
    assert r.exit_code == 2 and "matches no cell" in r.output
    r = invoke("study", cfg)
    assert r.exit_code == 2 and "--out DIR is required" in r.output


# ---- two processes, one study ------------------------------------------------------------------------
def test_two_cells_in_two_processes_at_once_assemble_to_the_sequential_study(tmp_path, tiny_model_dir, monkeypatch):
    cfg = write_config(tmp_path / "tiny.yaml", tiny_model_dir)
    seq, par = tmp_path / "seq", tmp_path / "par"
    procs = [cli("study", cfg, "--out", par, "--only", "tiny/none", cache=tmp_path / "cache-par"),
             cli("study", cfg, "--out", par, "--only", "tiny/ts", cache=tmp_path / "cache-par")]
    try:
        run_study(cfg, seq, progress=False)  # meanwhile, the sequential run here (its own scoring cache)
    finally:
        results = [finish(p) for p in procs]
    for code, output in results:
        assert code == 0, output
    # every process added its own cell's time: no update was lost
    assert set(json.loads((par / "timings.json").read_text())) == {"runs/tiny/none", "runs/tiny/ts"}
    assert not (par / ".llmcal.lock").exists() and not list(par.glob("runs/*/*/.llmcal.lock"))

    # the last process to finish assembled both cells (the assembling step runs under the study lock)
    a = json.loads((seq / "study.json").read_text())
    assert without_timings(json.loads((par / "study.json").read_text())) == without_timings(a)

    (par / "study.json").unlink()
    (par / "report.md").unlink()
    import llmcal.backends

    monkeypatch.setattr(llmcal.backends, "load_for_backend", lambda *a, **kw: pytest.fail("a model was loaded"))
    r = invoke("report", par)
    assert r.exit_code == 0, r.output
    b = json.loads((par / "study.json").read_text())
    assert [c["status"] for c in b["cells"]] == ["complete", "complete"]
    assert b["config_file"] == str(par / "study.yaml")  # the copy: assembled with no study.json to take it from
    b["config_file"] = a["config_file"]
    assert without_timings(a) == without_timings(b)
    assert all(isinstance(c["wall_s"], float) and c["wall_s"] > 0 for c in b["cells"])
    assert "tiny" in (par / "report.md").read_text()


def test_a_cell_another_process_holds_is_refused_and_the_others_run(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path / "tiny.yaml", tiny_model_dir)
    out = tmp_path / "study"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from llmcal.lock import RunLock; RunLock.acquire(sys.argv[1]); "
                               "print('locked', flush=True); sys.stdin.read()", str(out / "runs/tiny/ts")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LlmcalError, match=rf"1 cell\(s\) of study tiny are being run by another process.*"
                                              rf"tiny/ts: .*another llmcal process \(pid {holder.pid}\).*"
                                              rf"llmcal report {re.escape(str(out))}"):
            run_study(cfg, out, progress=False)
        doc = json.loads((out / "study.json").read_text())
        # refused, not failed: the cell's status is what its directory holds (nothing yet)
        assert {c["name"]: c["status"] for c in doc["cells"]} == {"tiny/none": "complete", "tiny/ts": "not run"}
        assert "error" not in doc["cells"][1] and not (out / "runs/tiny/ts/config.json").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    run_study(cfg, out, progress=False)  # the owner is gone: the cell runs, the complete one is skipped
    doc = json.loads((out / "study.json").read_text())
    assert [c["status"] for c in doc["cells"]] == ["complete", "complete"]


def test_report_of_a_study_dir_assembles_finished_cells_and_runs_need_out(tmp_path, tiny_model_dir, no_model):
    cfg = write_config(tmp_path / "tiny.yaml", tiny_model_dir)
    out = tmp_path / "study"
    r = invoke("report", out)
    assert r.exit_code == 2 and "--out DIR is required" in r.output  # not a study directory: runs need --out
    out.mkdir()
    (out / "study.yaml").write_text(cfg.read_text())
    r = invoke("report", out)  # nothing finished yet: a report of cells not run
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "study.json").read_text())
    assert [c["status"] for c in doc["cells"]] == ["not run", "not run"]
    r = invoke("report", out, "--out", tmp_path / "elsewhere")
    assert r.exit_code == 2 and "written into the study directory" in r.output


# ---- credentials -------------------------------------------------------------------------------------
def test_credentials_in_a_base_url_stay_out_of_study_json_and_the_yaml_copy(tmp_path, tiny_model_dir):
    url = "http://user:SECRETKEY@127.0.0.1:9/v1?api_key=SECRETTOKEN"
    cfg = write_config(tmp_path / "tiny.yaml", tiny_model_dir, methods="none: {}")
    text = cfg.read_text().replace(
        "models:\n", f"models:\n  srv: {{model: m, backend: openai, base_url: \"{url}\", api_mode: completions, "
                     f"max_retries: 0, request_timeout: 2}}\n")
    cfg.write_text(text)
    out = tmp_path / "study"
    with pytest.raises(LlmcalError, match="srv/none"):  # nothing answers on port 9: that cell fails
        run_study(cfg, out, progress=False)
    doc = json.loads((out / "study.json").read_text())
    assert {c["name"]: c["status"] for c in doc["cells"]} == {"srv/none": "failed", "tiny/none": "complete"}
    assert doc["models"]["srv"]["options"]["base_url"] == "http://***@127.0.0.1:9/v1?api_key=***"
    copy = (out / "study.yaml").read_text()
    assert "http://***@127.0.0.1:9/v1?api_key=***" in copy and copy.replace(
        "http://***@127.0.0.1:9/v1?api_key=***", url) == text  # the copy is the file, its secrets masked
    from llmcal.study import report_from_dir

    report_from_dir(out)  # assembled again from the masked copy
    leaks = [str(f.relative_to(out)) for f in out.rglob("*") if f.is_file() and f.suffix != ".png"
             and b"SECRET" in f.read_bytes()]
    assert not leaks, leaks
