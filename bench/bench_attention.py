#!/usr/bin/env python
"""Attention alone: sdpa's CPU flash kernel against llmcal's causal_attention, on a real evaluation's shapes.

    python bench/bench_attention.py                      # 200 MMLU questions, SmolLM2's heads, both dtypes
    python bench/bench_attention.py --blocks 32 48 64 96 --dtype bfloat16

The batch shapes (rows x padded length) are the ones the scoring engine cuts
for bench_eval.py's questions at the default token budget; the heads are the
model's (SmolLM2-135M: 9 query heads sharing 3 key/value heads of 64 dims).
Inputs are random, in the (batch, length, heads, dim) storage that
transformers passes as (batch, heads, length, dim) views.  For each kernel it
prints the time one layer's attention takes over all batches, times the
number of layers (best of --reps), and GFLOP/s counted as bench_eval.py counts
attention, 2 x 2 x heads x head_dim per causal query-key pair, but over the
padded batches (bench_eval.py counts real tokens only).  Also checks
that every kernel's output is within tolerance of float32 sdpa.

Results go to stdout and to bench/results/attention-<time>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default="mmlu")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", action="append", choices=["float32", "bfloat16"], help="repeatable; default both")
    ap.add_argument("--blocks", type=int, nargs="+", default=[32, 48, 64, 128], help="QUERY_BLOCK values to time")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from transformers import AutoConfig

    from llmcal import attention
    from llmcal.data import load_dataset
    from llmcal.models import load_tokenizer, resolve_model, weights_dir
    from llmcal.prompts import encode_questions
    from llmcal.scoring import DEFAULT_BATCH_TOKENS, make_batches

    model_dir = Path(weights_dir(resolve_model(args.model), "float32"))  # both dtypes are loaded from it
    cfg = AutoConfig.from_pretrained(model_dir)
    H, KV, layers = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    tok = load_tokenizer(resolve_model(str(model_dir)))
    questions = list(load_dataset(args.data, limit=args.n, seed=args.seed).questions)
    lengths = [len(e.input_ids) for e in encode_questions(questions, tok, "plain")]
    shapes = [(len(b), max(lengths[i] for i in b)) for b in make_batches(lengths, DEFAULT_BATCH_TOKENS)]
    flops = layers * sum(4 * H * D * B * T * (T + 1) / 2 for B, T in shapes)
    result = {"started": dt.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "heads": [H, KV, D], "layers": layers, "shapes": shapes,
              "attention_flops": flops, "dtypes": {}}
    print(f"{len(shapes)} batches of {args.n} questions, {layers} layers x {H} heads ({KV} key/value) x {D}; "
          f"{flops / 1e12:.3f} TFLOP of causal attention products")

    g = torch.Generator().manual_seed(0)
    for dtype in args.dtype or ["float32", "bfloat16"]:
        dt_ = getattr(torch, dtype)
        data = []
        for B, T in shapes:
            q, k, v = (torch.randn(B, T, h, D, generator=g).to(dt_).transpose(1, 2) for h in (H, KV, KV))
            data.append((q, k, v))
        refs = [F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True,
                                               enable_gqa=True).transpose(1, 2) for q, k, v in data]

        def sdpa(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2).contiguous()

        kernels = {"sdpa (flash)": (sdpa, None)}
        for blk in args.blocks:
            kernels[f"llmcal, blocks of {blk}"] = (attention.causal_attention, blk)
        rows = {}
        default_block = attention.QUERY_BLOCK
        try:
            for name, (fn, blk) in kernels.items():
                if blk is not None:
                    attention.QUERY_BLOCK = blk
                err = max((fn(q, k, v).float() - r).abs().max().item() for (q, k, v), r in zip(data, refs))
                best = float("inf")
                for _ in range(args.reps):
                    t = time.perf_counter()
                    for q, k, v in data:
                        fn(q, k, v)
                    best = min(best, time.perf_counter() - t)
                rows[name] = {"s_all_layers": round(best * layers, 3), "gflops": round(flops / (best * layers) / 1e9, 1),
                              "max_abs_err_vs_float32_sdpa": err}
                print(f"  {dtype:8s} {name:22s} {best * layers:6.2f} s for all layers  "
                      f"{rows[name]['gflops']:6.1f} GFLOP/s  max |error| {err:.1e}", flush=True)
        finally:
            attention.QUERY_BLOCK = default_block
        result["dtypes"][dtype] = rows
    out = HERE / "results" / f"attention-{dt.datetime.now():%Y%m%dT%H%M%S}.json"
    out.parent.mkdir(exist_ok=True)
    from llmcal.runs import portable  # no absolute path of this machine in a committed result
    out.write_text(json.dumps(portable(result, out.parent), indent=1))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
