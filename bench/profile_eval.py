#!/usr/bin/env python
"""Where an llmcal evaluation spends its time, per dtype: matmuls against everything else.

    python bench/profile_eval.py                       # float32 and bfloat16, 60 questions
    python bench/profile_eval.py --dtype bfloat16 --compile

bench_eval.py says how fast the engine is; this says why.  For each dtype it
scores the same MMLU questions as bench_eval.py (the plain template, the same
float32 model directory), once untimed, once timed, and once under
torch.profiler, and prints the share of the profiled CPU time in each group of
operators: matrix multiplications (the FLOPs bench_eval.py counts), attention,
element-wise operators (RMSNorm, rotary embeddings, SiLU, residual adds) and
dtype copies.  The achieved fraction of the matmul peak can be no higher than
the matmul share, which is what bounds it for a model this narrow (hidden size
576) on a CPU.

``--batching`` prints, for the same 200 questions, how many padded tokens the
v0 engine's greedy length batches and today's padding-aware batches compute at
several token budgets (no model runs).

``--compile`` also times ``torch.compile`` of each decoder layer (dynamic
shapes), the only way to fuse those element-wise operators without writing
kernels: the compile time and the compiled speed on the same questions.

Results go to stdout and to bench/results/profile-<time>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

GROUPS = {
    "matmul": ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
                  "llmcal::causal_attention"),
    "copies": ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous"),
    "elementwise": ("aten::mul", "aten::add", "aten::cat", "aten::pow", "aten::sum", "aten::mean", "aten::neg",
                    "aten::silu", "aten::rsqrt", "aten::sin", "aten::cos", "aten::div", "aten::div_"),
}


def _group(event) -> str:
    """An operator's group; everything that runs inside an attention operator (llmcal's kernel is a few
    batched matmuls and a softmax under the ``llmcal::causal_attention`` range) counts as attention."""
    e = event
    while e is not None:
        if e.name in GROUPS["attention"]:
            return "attention"
        e = e.cpu_parent
    return next((g for g, keys in GROUPS.items() if event.name in keys), "other")


def grouped(prof) -> dict:
    """Self CPU seconds per operator group (and the top operators) from a torch.profiler run."""
    rows = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()]
    total = sum(r[1] for r in rows)
    out = {g: 0.0 for g in GROUPS} | {"other": 0.0}
    for e in prof.events():
        out[_group(e)] += e.self_cpu_time_total / 1e6
    top = sorted(rows, key=lambda r: -r[1])[:12]
    return {"total_s": round(total, 2), "share": {g: round(s / total, 3) for g, s in out.items()},
            "top": [{"op": k, "self_s": round(s, 3), "calls": c} for k, s, c in top]}


def batching_report(lengths: list[int]) -> dict:
    """Batches and padded tokens: v0's greedy cutter (commit 19a3c61, see bench/variants/build.sh) against today's."""
    import importlib.util
    import subprocess
    import sys
    import tempfile

    from llmcal.scoring import make_batches

    source = subprocess.run(["git", "-C", str(HERE.parent), "show", "19a3c61:src/llmcal/scoring.py"],
                            check=True, capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v0_scoring.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("llmcal._v0_scoring", path)
        v0 = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = v0  # its dataclasses look their module up
        spec.loader.exec_module(v0)
    real = sum(lengths)
    out = {"real_tokens": real, "rows": []}
    print(f"{len(lengths)} questions, {real} prompt tokens (min {min(lengths)}, max {max(lengths)})")
    for budget in (1024, 2048, 4096, 8192):
        for name, cutter in (("v0 greedy", v0.make_batches), ("padding-aware", make_batches)):
            batches = cutter(lengths, budget)
            padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
            row = {"budget": budget, "cutter": name, "batches": len(batches), "computed_tokens": padded,
                   "padding": round((padded - real) / padded, 4)}
            out["rows"].append(row)
            print(f"  budget {budget:5d}  {name:14s} {len(batches):4d} batches, {padded:6d} tokens computed "
                  f"({100 * row['padding']:.1f}% padding)")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default="mmlu")
    ap.add_argument("--n", type=int, default=60, help="questions (the first N of bench_eval.py's 200)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", action="append", choices=["float32", "bfloat16"],
                    help="repeatable; default both")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of each decoder layer")
    ap.add_argument("--sdpa", choices=["default", "sdpa", "math", "flash"], default="default",
                    help="attention: default = what scoring uses (llmcal's CPU attention where it applies); "
                         "sdpa = transformers' sdpa; math/flash = sdpa with that backend forced "
                         "(torch.nn.attention.sdpa_kernel)")
    ap.add_argument("--batching", action="store_true",
                    help="only compare the greedy and padding-aware batch cutters (no model runs)")
    args = ap.parse_args()

    import torch

    from llmcal.data import load_dataset
    from llmcal.models import resolve_model, weights_dir
    from llmcal.prompts import encode_questions
    from llmcal.scoring import ScoreOptions

    model_dir = Path(weights_dir(resolve_model(args.model), "float32"))  # both dtypes are loaded from it
    questions = list(load_dataset(args.data, limit=200, seed=args.seed).questions)
    opt = ScoreOptions(progress=False, cpu_attention=args.sdpa == "default")
    result = {"started": dt.datetime.now().isoformat(timespec="seconds"), "n": args.n, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "dtypes": {}}
    if args.batching:
        from llmcal.models import load_tokenizer

        tok = load_tokenizer(resolve_model(str(model_dir)))
        result["batching"] = batching_report([len(e.input_ids) for e in encode_questions(questions, tok, "plain")])
    questions = questions[: args.n]
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION}.get(args.sdpa)
    result["sdpa"] = args.sdpa
    result["cpu_attention"] = opt.cpu_attention
    ctx = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
    with ctx:
        profile_dtypes(args, result, model_dir, questions, opt)
    out = HERE / "results" / f"profile-{dt.datetime.now():%Y%m%dT%H%M%S}.json"
    out.parent.mkdir(exist_ok=True)
    from llmcal.runs import portable  # no absolute path of this machine in a committed result
    out.write_text(json.dumps(portable(result, out.parent), indent=1))
    print(f"saved {out}")
    return 0


def profile_dtypes(args, result: dict, model_dir: Path, questions, opt) -> None:
    from torch.profiler import ProfilerActivity, profile

    from llmcal.models import load_model, resolve_model
    from llmcal.prompts import encode_questions
    from llmcal.scoring import score

    for dtype in [] if args.batching else (args.dtype or ["float32", "bfloat16"]):
        lm = load_model(resolve_model(str(model_dir)), dtype=dtype, device="cpu")
        enc = encode_questions(questions, lm.tokenizer, "plain")
        score(lm.model, lm.tokenizer, enc[:8], options=opt)  # warm-up
        t = time.perf_counter()
        ref = score(lm.model, lm.tokenizer, enc, options=opt)
        eager_s = time.perf_counter() - t
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            score(lm.model, lm.tokenizer, enc, options=opt)
        rec = {"eager_s": round(eager_s, 2)} | grouped(prof)
        if args.compile:
            for layer in lm.model.get_decoder().layers:
                layer.compile(dynamic=True)
            t = time.perf_counter()
            score(lm.model, lm.tokenizer, enc[:8], options=opt)  # compiles
            rec["compile_first_batch_s"] = round(time.perf_counter() - t, 2)
            t = time.perf_counter()
            got = score(lm.model, lm.tokenizer, enc, options=opt)
            rec["compiled_s"] = round(time.perf_counter() - t, 2)
            rec["compiled_same_prediction"] = sum(a.pred == b.pred for a, b in zip(ref, got))
        result["dtypes"][dtype] = rec
        share = ", ".join(f"{g} {100 * s:.0f}%" for g, s in rec["share"].items())
        print(f"{dtype}: {args.n} questions in {eager_s:.1f} s; profiled CPU time: {share}", flush=True)
        for row in rec["top"][:8]:
            print(f"    {row['op']:52s} {row['self_s']:7.2f} s  {row['calls']:5d} calls")
        if args.compile:
            print(f"    torch.compile: first batch (compiling) {rec['compile_first_batch_s']} s, then "
                  f"{rec['compiled_s']} s for the {args.n} questions (eager {eager_s:.1f} s)", flush=True)
        del lm


if __name__ == "__main__":
    raise SystemExit(main())
