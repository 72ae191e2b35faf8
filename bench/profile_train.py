#!/usr/bin/env python
"""Where a bfloat16 CFT training step spends its time, on the benchmark model's shapes cut to a few layers.

    python bench/profile_train.py                      # 4 layers, batch 2 x 160 tokens, one thread
    python bench/profile_train.py --torch-dropout      # peft's own nn.Dropout instead of CpuMaskDropout
    python bench/profile_train.py --padded 100,300     # a padded batch of these lengths (or packed: --packed)

bench_train.py says how fast the whole step is against TRL; this says why, in seconds and per
operator, without loading 1.5B weights: the model is ``--model``'s config (its hidden, MLP and
vocabulary sizes) with ``--layers`` decoder layers and random bfloat16 weights, LoRA r=16 / alpha 32
/ dropout 0.05 on all linear layers with float32 adapters (llmcal's ``add_lora`` settings and its
dropout masks), one optimizer step = llmcal's training forward (``answer_forward`` under
``training_precision``), backward and AdamW. It prints the step times and the torch.profiler table,
by operator and by operator and input shape.
"""
from __future__ import annotations

import argparse
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct", help="llmcal model name whose config is used")
    ap.add_argument("--layers", type=int, default=4)
    lay = ap.add_mutually_exclusive_group()
    lay.add_argument("--padded", default="160,160", help="question lengths of one right-padded batch")
    lay.add_argument("--packed", help="question lengths of one packed batch")
    ap.add_argument("--torch-dropout", action="store_true", help="keep peft's nn.Dropout")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rows", type=int, default=14, help="rows of each profiler table")
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmcal.models import resolve_model, weights_dir
    from llmcal.train.collator import McqCollator
    from llmcal.train.dropout import use_cpu_mask_dropout
    from llmcal.train.trainer import answer_forward, training_precision

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(weights_dir(resolve_model(args.model)))
    config.num_hidden_layers = args.layers
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    for p in model.parameters():  # peft's default: float32 adapters on the bfloat16 base
        if p.requires_grad:
            p.data = p.data.float()
    if not args.torch_dropout:
        use_cpu_mask_dropout(model)
    model.train()

    lengths = [int(n) for n in (args.packed or args.padded).split(",")]
    features = []
    for n in lengths:  # random prompt tokens; the target is a letter at the last position
        features.append({"input_ids": torch.randint(0, config.vocab_size, (n,)).tolist(),
                         "targets": [-100] * (n - 1) + [33], "answer_pos": n - 1,
                         "letter_ids": [32, 33, 34, 35], "answer": 1})
    batch = McqCollator(0, packed=args.packed is not None)(features)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with training_precision(model):
            out = answer_forward(model, batch)
        out.sft_loss.backward()
        opt.step()
        opt.zero_grad()

    step()  # warm-up
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(f"{args.layers} layers, {'packed' if args.packed else 'padded'} {lengths}, "
          f"{'torch' if args.torch_dropout else 'CpuMaskDropout'} dropout, {args.threads} thread(s): "
          f"step s {[round(t, 3) for t in times]} (min {min(times):.3f})")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=2 * args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
