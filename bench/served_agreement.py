#!/usr/bin/env python
"""The served model against llmcal's local engine: the same GGUF, the same MMLU questions, two ways.

    python bench/served_agreement.py                 # 120 MMLU questions, every comparison below
    python bench/served_agreement.py --n 200 --only q4_1:chat:20

1. starts llama-cpp-python's OpenAI-compatible server on 127.0.0.1 with the
   SmolLM2-135M-Instruct GGUF (the alias smollm2-135m-instruct, Q4_1; ``make
   served`` installs the server) and llama.cpp's defaults, and a second one
   with the same weights de-quantised to float32 (``dequantized_gguf``: the
   GGUF's metadata and tokenizer unchanged, every tensor de-quantised by the
   gguf package, as transformers does for the local engine) and a float32
   attention cache;
2. for each comparison ``SERVER:MODE:TOP_LOGPROBS`` runs ``llmcal eval --backend
   openai`` against that server (completions with the plain template, or chat,
   where the server applies the GGUF's chat template) and ``llmcal eval`` with
   the local engine and the same template;
3. compares the option distributions question by question: argmax agreement,
   the largest, mean and 99th-percentile absolute difference of an option
   probability, the served model's letter coverage, both runs' accuracy and
   conf-ECE;
4. writes bench/results/served-agreement-<time>.json (no absolute paths).

What the comparisons separate: the float32 server (float32 weights and float32
attention keys/values) differs from the local engine only in the order of
float32 arithmetic, so it would show any difference in prompt, tokenisation or
letter reading; the Q4_1 server as llama.cpp runs it by default adds quantised
arithmetic (Q4_1 weights times activations rounded to 8 bits per block) and
float16 keys and values in the attention cache; top 20
against top 1000 adds the truncation of the top-N list (missing letters get an
upper bound, docs/reference.md "Served models").  The slow test
tests/test_served_llamacpp.py enforces tolerances set from these numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np

HERE = Path(__file__).resolve().parent
ALIAS = "smollm2-135m-instruct"
MODES = {"completions": "plain", "chat": "chat"}  # api mode -> the local template it is compared with
# q4_1: the GGUF as shipped, llama.cpp's defaults (the README's server); f32: its weights de-quantised to
# float32 and float32 attention keys/values, so that only the order of float32 arithmetic differs.
SERVERS = {"q4_1": {"kv_f32": False}, "f32": {"kv_f32": True}}
COMPARISONS = ("q4_1:chat:20", "q4_1:completions:20", "q4_1:completions:1000", "f32:chat:20",
               "f32:completions:1000")


def gguf_path(alias: str = ALIAS) -> Path:
    """The GGUF file behind a built-in alias (the same file both engines read)."""
    from llmcal.models import resolve_model

    spec = resolve_model(alias)
    return Path(spec.path) / spec.gguf_file


def dequantized_gguf(src: Path, dst: Path) -> Path:
    """``src`` with every tensor de-quantised to float32 (metadata, tokenizer and chat template unchanged)."""
    import gguf
    from gguf.quants import dequantize

    if dst.is_file():
        return dst
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"]
    tmp = dst.with_name(dst.name + ".part")
    writer = gguf.GGUFWriter(str(tmp), bytes(arch.parts[arch.data[0]]).decode())
    V = gguf.GGUFValueType
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        kind = f.types[0]
        if name == "general.file_type":
            writer.add_uint32(name, int(gguf.LlamaFileType.ALL_F32))
        elif kind == V.ARRAY and f.types[1] == V.STRING:
            writer.add_array(name, [bytes(f.parts[i]).decode("utf-8") for i in f.data])
        elif kind == V.ARRAY:
            writer.add_array(name, [f.parts[i][0].item() for i in f.data])
        elif kind == V.STRING:
            writer.add_string(name, bytes(f.parts[f.data[0]]).decode("utf-8"))
        else:
            writer.add_key_value(name, f.parts[f.data[0]][0].item(), kind)
    for t in reader.tensors:
        data = dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, data.reshape(tuple(int(x) for x in reversed(t.shape))))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dst)
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_server(gguf: Path, *, alias: str = ALIAS, threads: int = 2, n_ctx: int = 2048, kv_f32: bool = False,
                 timeout_s: float = 180.0, log: Path | None = None) -> Iterator[str]:
    """``python -m llama_cpp.server`` on 127.0.0.1 and a free port; yields its base URL (.../v1), stops it after.

    ``kv_f32``: keep the attention keys and values in float32 (llama.cpp's default is float16).
    """
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", alias,
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads),
           "--n_threads_batch", str(threads), "--verbose", "False"]
    if kv_f32:
        cmd += ["--type_k", "0", "--type_v", "0"]  # GGML_TYPE_F32
    out = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the llama.cpp server exited with status {proc.returncode} before it was ready"
                                   + (f" (log: {log})" if log else ""))
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the llama.cpp server was not ready after {timeout_s:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log:
            out.close()


def compare(local, served) -> dict:
    """Agreement of two runs' predictions on the same questions (matched by id)."""
    by_id = {p.id: p for p in served}
    if set(by_id) != {p.id for p in local}:
        raise ValueError("the two runs scored different questions")
    pairs = [(p, by_id[p.id]) for p in local]
    diff = np.concatenate([np.abs(np.asarray(a.probs) - np.asarray(b.probs)) for a, b in pairs])
    conf_diff = np.array([abs(a.conf - b.conf) for a, b in pairs])
    agree = np.array([a.pred == b.pred for a, b in pairs])
    worst = max(pairs, key=lambda ab: float(np.max(np.abs(np.asarray(ab[0].probs) - np.asarray(ab[1].probs)))))
    return {
        "n": len(pairs),
        "argmax_agreement": float(agree.mean()),
        "disagreements": [a.id for (a, b), ok in zip(pairs, agree) if not ok],
        "max_abs_prob_diff": float(diff.max()),
        "mean_abs_prob_diff": float(diff.mean()),
        "p99_abs_prob_diff": float(np.quantile(diff, 0.99)),
        "max_abs_conf_diff": float(conf_diff.max()),
        "worst_question": {"id": worst[0].id, "local": list(worst[0].probs), "served": list(worst[1].probs)},
    }


def summary(rec) -> dict:
    m = rec.results[0].metrics
    keep = ("n", "accuracy", "conf_ece", "nll", "brier", "mean_conf")
    out = {k: m[k] for k in keep}
    if "letter_coverage" in m:
        out["letter_coverage"] = m["letter_coverage"]
    return out


def _config(template: str, n: int, seed: int, **kw):
    from llmcal.evaluate import EvalConfig

    return EvalConfig(model=ALIAS, data="mmlu", limit=n, seed=seed, n_bootstrap=200, template=template, **kw)


def local_run(template: str, work: Path, *, n: int, seed: int):
    """``llmcal eval`` with the local engine on the alias's GGUF: (run directory, record, seconds)."""
    from llmcal.evaluate import run_eval

    out, t = work / f"local-{template}", time.perf_counter()
    rec = run_eval(_config(template, n, seed), out, overwrite=True, progress=False)
    return out, rec, time.perf_counter() - t


def served_run(mode: str, url: str, work: Path, *, n: int, seed: int, concurrency: int, top_logprobs: int,
               label: str):
    """``llmcal eval --backend openai`` against ``url``: (run directory, record, seconds)."""
    from llmcal.evaluate import run_eval

    cfg = _config(MODES[mode], n, seed, backend="openai", base_url=url, api_mode=mode, concurrency=concurrency,
                  top_logprobs=top_logprobs)
    out, t = work / f"served-{label}", time.perf_counter()
    rec = run_eval(cfg, out, overwrite=True, progress=False)
    return out, rec, time.perf_counter() - t


def compare_runs(local_dir: Path, served_dir: Path) -> dict:
    from llmcal.predictions import load_predictions

    return compare(load_predictions(local_dir / "predictions.jsonl"), load_predictions(served_dir / "predictions.jsonl"))


def run_mode(mode: str, url: str, work: Path, *, n: int, seed: int, concurrency: int, top_logprobs: int = 20,
             label: str | None = None) -> dict:
    """One comparison: the served model through ``url`` in ``mode`` against the local engine, same template."""
    template = MODES[mode]
    local_dir, local, local_s = local_run(template, work, n=n, seed=seed)
    served_dir, served, served_s = served_run(mode, url, work, n=n, seed=seed, concurrency=concurrency,
                                              top_logprobs=top_logprobs, label=label or f"{mode}-{top_logprobs}")
    return {"mode": mode, "template": template, "top_logprobs": top_logprobs, **compare_runs(local_dir, served_dir),
            "local": summary(local), "served": summary(served), "local_s": round(local_s, 1),
            "served_s": round(served_s, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=120, help="MMLU questions (a seeded subset)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=",".join(COMPARISONS),
                    help="comma-separated SERVER:MODE:TOP_LOGPROBS (server q4_1 or f32; mode completions or chat)")
    ap.add_argument("--threads", type=int, default=2, help="each server's CPU threads")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--work", default=None, help="folder for the runs and the float32 GGUF (default: temporary)")
    ap.add_argument("--results", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    todo = []
    for item in (c.strip() for c in args.only.split(",") if c.strip()):
        server, mode, top = (item.split(":") + ["", "", ""])[:3]
        if server not in ("q4_1", "f32") or mode not in MODES or not top.isdigit():
            ap.error(f"bad comparison {item!r}: SERVER:MODE:TOP_LOGPROBS, e.g. q4_1:chat:20")
        todo.append((server, mode, int(top)))
    os.environ.setdefault("LLMCAL_PROGRESS", "0")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="served-agreement-"))
    work.mkdir(parents=True, exist_ok=True)
    ggufs = {"q4_1": gguf_path()}
    if any(s == "f32" for s, _, _ in todo):
        ggufs["f32"] = dequantized_gguf(ggufs["q4_1"], work / "smollm2-135m-instruct-dequantized-f32.gguf")

    import llama_cpp

    import llmcal

    results = []
    for server in ("q4_1", "f32"):
        mine = [(m, k) for s, m, k in todo if s == server]
        if not mine:
            continue
        with llama_server(ggufs[server], threads=args.threads, kv_f32=SERVERS[server]["kv_f32"],
                          log=work / f"server-{server}.log") as url:
            for mode, top in mine:
                r = run_mode(mode, url, work, n=args.n, seed=args.seed, concurrency=args.concurrency,
                             top_logprobs=top, label=f"{server}-{mode}-{top}")
                r = {"server": server, "gguf_file": ggufs[server].name, "server_kv_cache":
                     "float32" if SERVERS[server]["kv_f32"] else "float16 (llama.cpp's default)", **r}
                results.append(r)
                cov = r["served"]["letter_coverage"]
                print(f"{server:5s} {mode:12s} top {top:<5d} n={r['n']}  argmax agreement {r['argmax_agreement']:.4f}"
                      f"  max |dp| {r['max_abs_prob_diff']:.2e}  mean |dp| {r['mean_abs_prob_diff']:.2e}  letter "
                      f"mass {cov['mean_letter_mass']:.3f}  missing {cov['missing_share']:.2f}", flush=True)
    doc = {
        "what": "served (llama-cpp-python server, OpenAI-compatible) vs llmcal's local engine, same GGUF weights",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": ALIAS, "data": "mmlu", "n": args.n, "seed": args.seed,
        "llmcal": llmcal.__version__, "llama_cpp_python": llama_cpp.__version__,
        "server": f"python -m llama_cpp.server, {args.threads} threads, n_ctx 2048; client concurrency "
                  f"{args.concurrency}",
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.machine()},
        "results": results,
    }
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"served-agreement-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"written to {path.relative_to(HERE.parent) if path.is_relative_to(HERE.parent) else path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
