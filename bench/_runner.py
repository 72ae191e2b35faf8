"""Run one tool's command line in this process with timers around its phases (used by bench_eval.py).

    python bench/_runner.py llmcal TIMING.json -- eval --model ... --out ...
    python bench/_runner.py lmeval TIMING.json -- run --model hf ... --log_samples

The tool runs exactly as its own CLI would; the runner only wraps, without
changing them, the function that loads the model and the ones that score the
questions, and writes how long each took to TIMING.json.  ``eval_s`` is the
scoring step with tokenisation (llmcal: ``evaluate._prepared``, which encodes
few-shot prompts and loads their examples' split, plus ``pipeline.Run.score``,
which encodes the others, scores and flushes predictions to disk; lm-eval:
``HFLM.loglikelihood``); ``load_s`` is the model load (``evaluate.load_for`` /
``HFLM.__init__``).  bench_eval.py runs llmcal with its scoring cache off.
"""
from __future__ import annotations

import functools
import json
import sys
import time

T0 = time.perf_counter()
timing: dict = {"load_s": 0.0, "eval_s": 0.0}


def timed(key: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timing[key] += time.perf_counter() - t

    return wrapper


def main() -> int:
    tool, out = sys.argv[1], sys.argv[2]
    argv = sys.argv[sys.argv.index("--") + 1:]
    if tool == "llmcal":
        import importlib

        ev = importlib.import_module("llmcal.evaluate")  # the module (llmcal.evaluate is the API function)
        import llmcal.pipeline as pipe

        ev._prepared = timed("eval_s", ev._prepared)
        pipe.Run.score = timed("eval_s", pipe.Run.score)
        ev.load_for = timed("load_s", ev.load_for)
        from llmcal.cli import main as cli

        sys.argv = ["llmcal", *argv]
        entry = cli
    elif tool == "lmeval":
        from lm_eval.__main__ import cli_evaluate
        from lm_eval.models.huggingface import HFLM

        HFLM.__init__ = timed("load_s", HFLM.__init__)
        HFLM.loglikelihood = timed("eval_s", HFLM.loglikelihood)
        sys.argv = ["lm-eval", *argv]
        entry = cli_evaluate
    else:
        raise SystemExit(f"unknown tool {tool!r}")
    timing["imports_s"] = time.perf_counter() - T0
    code = 0
    try:
        entry()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    import torch

    timing["threads"] = torch.get_num_threads()
    if tool == "llmcal":
        import llmcal

        timing["llmcal_file"] = llmcal.__file__
    timing["process_s"] = time.perf_counter() - T0
    with open(out, "w") as f:
        json.dump(timing, f)
    return code


if __name__ == "__main__":
    sys.exit(main())
