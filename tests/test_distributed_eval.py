"""Sharded evaluation: two CPU processes (gloo) write one run equal to a single-process run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from llmcal import distributed
from llmcal.evaluate import EvalConfig, run_eval
from llmcal.predictions import load_predictions

DATA = "synthetic:arithmetic?n=48&k=4&difficulty=2"

# Runs under the launcher: records every file a rank writes, then runs the real CLI.
WORKER = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import llmcal.io as io
    from llmcal import distributed

    rank = int(os.environ["RANK"])
    written = []
    real_write, real_init = io.atomic_write_bytes, io.JsonlAppender.__init__

    def write(path, data):
        written.append(str(path))
        return real_write(path, data)

    def init(self, path):
        written.append(str(path))
        real_init(self, path)

    io.atomic_write_bytes = write
    io.JsonlAppender.__init__ = init
    log_dir = sys.argv[1]
    sys.argv = ["llmcal"] + sys.argv[2:]
    from llmcal.cli import main
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    else:
        code = 0
    # the helpers the training engineer will use, on a live process group
    with distributed.process_group("cpu") as w:
        summed = distributed.all_reduce_numpy(np.array([rank + 1, 10], dtype=np.int64)).tolist()
        biggest = distributed.all_reduce_numpy(np.array([rank * 0.5]), op="max").tolist()
        world = [w.rank, w.world_size]
    with open(os.path.join(log_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"written": written, "code": code, "summed": summed, "max": biggest, "world": world}, f)
    sys.exit(code)
""")


def _launch(tmp_path: Path, model_dir: Path, out: Path, nproc: int = 2, timeout: int = 120):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    env = {**os.environ, "LLMCAL_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(_free_port()),
           str(script), str(logs), "eval", "--model", str(model_dir), "--data", DATA, "--template", "plain",
           "--dtype", "float32", "--device", "cpu", "--batch-tokens", "200", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, [json.loads((logs / f"rank{r}.json").read_text()) for r in range(nproc)
                  if (logs / f"rank{r}.json").exists()]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_write_one_run_equal_to_a_single_process_run(tiny_model_dir, tmp_path):
    single = tmp_path / "single"
    cfg = EvalConfig(model=str(tiny_model_dir), data=DATA, template="plain", dtype="float32", device="cpu",
                     batch_tokens=200)
    run_eval(cfg, single, progress=False)

    sharded = tmp_path / "sharded"
    proc, logs = _launch(tmp_path, tiny_model_dir, sharded)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(logs) == 2 and all(log["code"] == 0 for log in logs)

    # one complete run, no partial files left
    assert (sharded / "metrics.json").exists() and not (sharded / "INCOMPLETE").exists()
    assert not list(sharded.glob("*.rank*-of-*"))
    a = load_predictions(single / "predictions.jsonl")
    b = load_predictions(sharded / "predictions.jsonl")
    assert [p.id for p in a] == [p.id for p in b]  # same (dataset) order
    assert [p.pred for p in a] == [p.pred for p in b]
    np.testing.assert_allclose([p.probs for p in a], [p.probs for p in b], rtol=0, atol=1e-6)
    ma = json.loads((single / "metrics.json").read_text())["results"][0]["metrics"]
    mb = json.loads((sharded / "metrics.json").read_text())["results"][0]["metrics"]
    assert ma["n"] == mb["n"] == 48
    assert abs(ma["conf_ece"] - mb["conf_ece"]) < 1e-6

    # rank 1 wrote only its own partial file; rank 0 wrote the run
    r0, r1 = logs
    assert r1["written"] and all(Path(p).name == "predictions.rank1-of-2.jsonl" for p in r1["written"])
    names0 = {Path(p).name for p in r0["written"]}
    assert {"config.json", "predictions.jsonl", "metrics.json", "predictions.rank0-of-2.jsonl"} <= names0
    # the process-group helpers on a live group
    assert r0["summed"] == r1["summed"] == [3, 20]
    assert r0["max"] == r1["max"] == [0.5]
    assert r0["world"] == [0, 2] and r1["world"] == [1, 2]


def test_single_process_resumes_from_partial_files_of_a_sharded_run(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCAL_SCORE_CACHE", "0")  # about resuming from partial files, not about the cache
    cfg = EvalConfig(model=str(tiny_model_dir), data=DATA, template="plain", dtype="float32", device="cpu",
                     batch_tokens=200, n_bootstrap=50)
    ref = tmp_path / "ref"
    run_eval(cfg, ref, progress=False)
    lines = (ref / "predictions.jsonl").read_text().splitlines(keepends=True)

    out = tmp_path / "resumed"
    from llmcal.evaluate import config_doc as _config_doc
    from llmcal.models import resolve_model
    from llmcal.runs import RunDir

    RunDir(out).start(_config_doc(cfg, resolve_model(cfg.model), "eval"))
    # an interrupted 2-process run: rank 0 had 10 questions, rank 1 had 7 and a torn line
    (out / "predictions.rank0-of-2.jsonl").write_text("".join(lines[:10]))
    (out / "predictions.rank1-of-2.jsonl").write_text("".join(lines[20:27]) + '{"id": "ari')
    rec = run_eval(cfg, out, progress=False)
    assert rec.results[0].metrics["n"] == 48
    assert not list(out.glob("*.rank*-of-*"))
    assert (out / "predictions.jsonl").read_bytes() == (ref / "predictions.jsonl").read_bytes()


def test_helpers_are_identities_in_one_process():
    assert not distributed.is_initialized()
    w = distributed.current_world()
    assert (w.rank, w.world_size, w.is_main, w.distributed) == (0, 1, True, False)
    a = np.array([[1, 2], [3, 4]], dtype=np.int32)
    np.testing.assert_array_equal(distributed.all_reduce_numpy(a), a)
    assert distributed.all_gather_objects({"x": 1}) == [{"x": 1}]
    assert distributed.broadcast_object("hi") == "hi"
    assert distributed.on_main(lambda: 7) == 7
    assert distributed.collective(lambda: 8) == 8
    distributed.barrier()
    assert distributed.init("cpu") is False


def test_world_from_env(monkeypatch):
    from llmcal.errors import LlmcalError

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    w = distributed.world_from_env()
    assert (w.rank, w.world_size, w.local_rank, w.is_main) == (2, 4, 0, False)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(LlmcalError, match="RANK=4"):
        distributed.world_from_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(LlmcalError, match="not an integer"):
        distributed.world_from_env()


def test_a_failing_rank_fails_every_rank_with_its_message(tmp_path):
    """One rank's LlmcalError reaches the other rank instead of leaving it waiting at a barrier."""
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        from llmcal import distributed
        from llmcal.errors import LlmcalError
        rank = int(os.environ["RANK"])
        distributed.init("cpu")
        def step():
            if rank == 1:
                raise LlmcalError("question q7 is broken")
            return 1
        try:
            distributed.collective(step, what="scoring")
        except LlmcalError as e:
            print(f"rank{rank}: {e}", flush=True)
        try:
            distributed.on_main(lambda: 1 / 0, what="writing")
        except (LlmcalError, ZeroDivisionError) as e:
            print(f"rank{rank} main: {type(e).__name__}: {e}", flush=True)
        distributed.shutdown()
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), str(script)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rank0: scoring failed on rank 1 of 2: LlmcalError: question q7 is broken" in proc.stdout
    assert "rank1: question q7 is broken" in proc.stdout
    assert "rank0 main: ZeroDivisionError" in proc.stdout
    assert "rank1 main: LlmcalError: writing failed on rank 0: ZeroDivisionError" in proc.stdout
