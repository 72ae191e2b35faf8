#!/usr/bin/env python
"""llmcal's CFT training step against TRL's SFTTrainer: same model, same examples, same machine, one command.

    python bench/bench_train.py                       # qwen2.5-coder-1.5b-instruct, bfloat16, batch 4, 2 rounds
    python bench/bench_train.py --variant v0=/tmp/llmcal-v0/src --label "v1 and v0"
    python bench/bench_train.py --no-trl --processes 2   # llmcal in 2 processes of 1 thread vs 1 process

What it does (bench/README.md, "Training", has the details):
1. the same questions for both sides: ``load_dataset(--data, limit, seed)``, llmcal's ``plain`` prompt
   tokens; the first ``--warmup`` batches warm up (untimed), the next ``--steps`` batches are one
   measured epoch;
2. measures this machine's bfloat16 matmul peak (torch.matmul on the model's own shapes and 2048^3),
   at the start and at the end; the better one counts;
3. runs, as separate processes and alternating the order every round, llmcal (``CalibrationTrainer``:
   the CFT loss, answer letter only) and TRL (``SFTTrainer`` on the same token ids with a completion
   mask on the letter, ``completion_only_loss=True``); both: the model in bfloat16, LoRA r=16,
   alpha=32, dropout 0.05 on all linear layers (peft defaults otherwise), AdamW, lr 2e-4,
   batch ``--batch``, no gradient checkpointing (llmcal: unless ``--gradient-checkpointing``), no autocast,
   one process with ``--threads`` threads (torch's default when 0) — the matmul peak is measured on the same threads;
4. times every optimizer step (data, forward, backward, optimizer), records peak RSS, the first
   step's loss on each side (the same first batch: they must agree), and how much CPU other processes took;
5. prints the table (Markdown) and the targets, and saves bench/results/train-<time>-<label>.json.

``--processes N`` adds the side ``llmcal-Nproc``: the same llmcal trainer in N data-parallel
processes of one thread each (gloo, started by torch's launcher as ``llmcal calibrate --processes``
does), each with batch/N of the same global batches, against ``llmcal`` in one process on all the
cores (``--threads``, default torch's own: one per core).  Its time is rank 0's (DDP synchronises
every step), its memory the sum of the ranks' RSS, and of their PSS (shared pages, such as the memory-mapped
weights, divided among the processes that map them: what the ranks take together); ``speedup_{N}proc_vs_1proc``
is llmcal's time over it, measured in the same run; ``--only-processes`` runs that side alone (its memory).
Every side records its RSS and PSS after loading, after adding LoRA and at each step's end (``memory_mb``);
``bench/memory_watch.py`` samples them from outside, every second, with a breakdown by mapping.

FLOPs counted per example with an n-token prompt (real tokens only; padding is not credited):
forward 2 P n (P = parameters of the decoder's linear layers) + causal attention 4 h d n(n+1)/2 per
layer + LoRA 2 n r (d_in + d_out) per adapted layer + the output layer at the answer position 2 H V;
backward: the activation gradients of every frozen matmul (1x its forward: dX = dY W^T, no weight
gradient), 2x forward for attention (both operands are activations) and for the LoRA matrices
(input and weight gradients), 1x for the output layer row.  So about 2x the forward FLOPs in all.
The same count for both sides: TRL's output layer at every position and its extra input token are
work the answer does not need, so they are not credited.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_eval import HZ, _busy_jiffies, _version, machine_info, wait_quiet  # noqa: E402

TARGETS = {"speedup_vs_trl": 2.5, "peak_fraction": 0.65}
PROCESS_TARGET = 1.7  # --processes 2 against one process on the same cores
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
LR = 2e-4
TRL_PADDING_FREE = "trl-padding-free"


# ---- child: one side, one process ----------------------------------------------------------------------------
class StepTimer:
    """A TrainerCallback that records each optimizer step's wall time, loss and the process RSS."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if timer.t_begin is None:
                    timer.t_begin = time.perf_counter()
                    timer.last = timer.t_begin

            def on_step_end(self, args, state, control, **kw):
                now = time.perf_counter()
                timer.steps.append(now - timer.last)
                timer.last = now
                timer.rss_mb = max(timer.rss_mb, _rss_mb())
                timer.memory.append(_memory_mb())

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    timer.losses.append(float(logs["loss"]))

        self.callback = _CB()
        self.t_begin = None
        self.last = None
        self.steps: list[float] = []
        self.losses: list[float] = []
        self.rss_mb = 0.0
        self.memory: list[dict] = []  # _memory_mb() at each step's end


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _memory_mb() -> dict:
    """This process's resident memory in MB: RSS with its anonymous and file-backed parts (/proc/self/status),
    and PSS (/proc/self/smaps_rollup: shared pages divided among the processes that map them)."""
    out = {}
    for path, keys in (("/proc/self/status", ("VmRSS", "RssAnon", "RssFile")),
                       ("/proc/self/smaps_rollup", ("Pss", "Pss_Anon", "Pss_File"))):
        try:
            for line in open(path):
                key, _, rest = line.partition(":")
                if key in keys:
                    out[key] = round(int(rest.split()[0]) / 1024, 1)
        except OSError:  # not Linux
            pass
    return out


def _common_args(out: str, steps: int, batch: int) -> dict:
    return dict(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=LR,
                lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, seed=0, data_seed=0,
                logging_strategy="steps", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                bf16=False, dataloader_num_workers=0, dataloader_pin_memory=False, remove_unused_columns=False,
                disable_tqdm=True, gradient_checkpointing=False, optim="adamw_torch")


def _encoded(args, tok):
    from llmcal.data import load_dataset
    from llmcal.prompts import encode_questions

    n = (args.warmup + args.steps) * args.batch
    questions = list(load_dataset(args.data, limit=n, seed=args.seed).questions)
    if len(questions) < n:
        raise SystemExit(f"{args.data}: only {len(questions)} questions, {n} needed")
    enc = encode_questions(questions, tok, "plain")
    return enc[:args.warmup * args.batch], enc[args.warmup * args.batch:]


def child_llmcal(args, loaded, warm, measured) -> tuple[StepTimer, StepTimer]:
    from transformers import TrainingArguments

    from llmcal.train.collator import ExampleDataset, McqCollator, build_examples
    from llmcal.train.config import FinetuneConfig
    from llmcal.train.losses import RcftLoss
    from llmcal.train.model import add_lora
    from llmcal.train.state import TrainState
    from llmcal.train.trainer import CalibrationTrainer

    try:  # packed batches where the model supports them, as llmcal's run does (absent from older versions)
        from llmcal.train.trainer import packs_questions
    except ImportError:
        packs_questions = None
    per = args.batch // args.world  # under the launcher (--processes): this process's share of each batch
    cfg = FinetuneConfig(model=args.model, train=args.data, evals=[args.data], lora_r=LORA["r"],
                         lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
                         target_modules=LORA["target_modules"], lr=LR, batch_size=per, seed=0)
    model = add_lora(loaded, cfg)
    args.memory["lora"] = _memory_mb()
    tok = loaded.tokenizer
    collator = (McqCollator(tok.pad_token_id, packed=packs_questions(model)) if packs_questions
                else McqCollator(tok.pad_token_id))
    timers = []
    for part, steps in ((warm, args.warmup), (measured, args.steps)):
        timer = StepTimer()
        targs = TrainingArguments(**{**_common_args(args.tmp, steps, per),
                                     "gradient_checkpointing": args.gradient_checkpointing})
        trainer = CalibrationTrainer(
            model=model, args=targs, train_dataset=ExampleDataset(build_examples(part, tok)),
            data_collator=collator, callbacks=[timer.callback],
            train_state=TrainState.initial("cft", 1.0, 10), rcft_loss=RcftLoss(10))
        trainer.train()
        timers.append(timer)
    return timers[0], timers[1]


def child_trl(args, loaded, warm, measured) -> tuple[StepTimer, StepTimer]:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    tok = loaded.tokenizer

    def dataset(part):  # llmcal's prompt tokens + the answer letter; the loss on the letter only
        return Dataset.from_list([{"input_ids": list(e.input_ids) + [e.letter_ids[e.question.answer]],
                                   "completion_mask": [0] * len(e.input_ids) + [1]} for e in part])

    model = loaded.model
    peft_config = LoraConfig(task_type="CAUSAL_LM", **LORA)
    timers = []
    for part, steps in ((warm, args.warmup), (measured, args.steps)):
        timer = StepTimer()
        cfg = SFTConfig(**_common_args(args.tmp, steps, args.batch), completion_only_loss=True, max_length=None,
                        packing=False, padding_free=args.padding_free, dataset_num_proc=None)
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=dataset(part), processing_class=tok,
                             peft_config=peft_config, callbacks=[timer.callback])
        trainer.train()
        model, peft_config = trainer.model, None  # the measured epoch continues with the same adapter
        timers.append(timer)
    return timers[0], timers[1]


def child(args) -> int:
    import torch

    from llmcal.models import load_model, resolve_model

    args.world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    t0 = time.perf_counter()
    args.memory = {"start": _memory_mb()}
    loaded = load_model(resolve_model(args.model), dtype="bfloat16", device="cpu", trainable=True)
    load_s = time.perf_counter() - t0
    args.memory["loaded"] = _memory_mb()
    warm, measured = _encoded(args, loaded.tokenizer)
    run = child_llmcal if args.child == "llmcal" else child_trl
    w, m = run(args, loaded, warm, measured)
    import llmcal

    rec = {"side": args.child, "load_s": load_s, "threads": torch.get_num_threads(),
           "llmcal_file": str(Path(llmcal.__file__).parent.parent.name),
           "warmup_steps_s": w.steps, "steps_s": m.steps, "losses": m.losses, "first_loss": w.losses[0],
           "train_rss_mb": max(w.rss_mb, m.rss_mb), "lengths": [len(e.input_ids) for e in measured],
           "warm_lengths": [len(e.input_ids) for e in warm]}
    rec["world_size"] = args.world
    rec["memory_mb"] = {**args.memory, "warmup_steps": w.memory, "steps": m.memory}
    rec["train_pss_mb"] = max((r.get("Pss", 0.0) for r in w.memory + m.memory), default=0.0)
    Path(args.child_out + (f".rank{rank}" if rank else "")).write_text(json.dumps(rec))
    return 0


# ---- parent --------------------------------------------------------------------------------------------------
def matmul_peak(shapes, reps: int = 8) -> dict:
    """Best bfloat16 torch.matmul GFLOP/s over the given (m, k, n) shapes, on this process's torch threads."""
    import torch

    per = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k).bfloat16(), torch.randn(k, n).bfloat16()
        for _ in range(2):
            torch.matmul(a, b)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - t)
        per[f"{m}x{k}x{n}"] = round(2 * m * k * n / best / 1e9, 1)
    return {"gflops": max(per.values()), "shapes": per}


def model_shapes(model_dir: str, batch: int, mean_len: float):
    """The model's config, linear-layer parameters P, the adapted layers' (d_in, d_out), and matmul shapes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    decoder = model.get_decoder()
    linears = [m for m in decoder.modules() if isinstance(m, torch.nn.Linear)]
    rows = int(batch * mean_len)
    h, i = config.hidden_size, config.intermediate_size
    shapes = [(2048, 2048, 2048), (rows, h, i), (rows, i, h), (rows, h, h)]
    return config, sum(m.weight.numel() for m in linears), [(m.in_features, m.out_features) for m in linears], shapes


def flops_per_example(n: int, config, linear_params: int, adapted, r: int) -> dict:
    heads, layers = config.num_attention_heads, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    fwd_linear = 2.0 * linear_params * n
    fwd_attn = layers * 4.0 * heads * head_dim * n * (n + 1) / 2
    fwd_lora = sum(2.0 * n * r * (di + do) for di, do in adapted)
    fwd_head = 2.0 * config.hidden_size * config.vocab_size
    fwd = fwd_linear + fwd_attn + fwd_lora + fwd_head
    bwd = fwd_linear + 2 * fwd_attn + 2 * fwd_lora + fwd_head
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd}


def run_side(side: str, rnd: int, args, src: str | None) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", side)
    out = work / f"{slug}-{rnd}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "LLMCAL_PROGRESS": "0", "TRANSFORMERS_VERBOSITY": "error"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if src:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(src).resolve()), env.get("PYTHONPATH", "")])
    quiet = wait_quiet(args.quiet_cores, args.max_wait) if args.quiet_cores > 0 else {"quiet": None}
    kind = "trl" if side.startswith("trl") else "llmcal"
    procs = _processes_of(side)
    launcher = [] if procs == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    if procs > 1:
        env["OMP_NUM_THREADS"] = "1"
    argv = [sys.executable, *launcher, str(Path(__file__).resolve()), "--child", kind, "--child-out", str(out),
            "--model", args.model, "--data", args.data, "--seed", str(args.seed), "--batch", str(args.batch),
            "--warmup", str(args.warmup), "--steps", str(args.steps), "--tmp", str(work / f"tmp-{slug}")]
    if side == TRL_PADDING_FREE:
        argv.append("--padding-free")
    if args.gradient_checkpointing and kind == "llmcal":
        argv.append("--gradient-checkpointing")
    b0 = _busy_jiffies()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(work))
    text = proc.stdout.read().decode("utf-8", "replace")
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    busy = (_busy_jiffies() - b0) / HZ
    own = usage.ru_utime + usage.ru_stime
    (work / f"{slug}-{rnd}.log").write_text(text)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{side} round {rnd} failed; log {work / f'{slug}-{rnd}.log'}\n{text[-3000:]}")
    rec = json.loads(out.read_text())
    if procs > 1:  # the processes' memory together
        ranks = [rec] + [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(1, procs)]
        rec["train_rss_mb_per_rank"] = [r["train_rss_mb"] for r in ranks]
        rec["train_rss_mb"] = sum(rec["train_rss_mb_per_rank"])
        rec["train_pss_mb_per_rank"] = [r.get("train_pss_mb") for r in ranks]
        rec["train_pss_mb"] = sum(p or 0.0 for p in rec["train_pss_mb_per_rank"])
    rec.update({"side": side, "round": rnd, "wall_s": wall,
                "peak_rss_mb": usage.ru_maxrss / 1024 if procs == 1 else rec["train_rss_mb"],
                "other_cores": max(0.0, (busy - own) / wall), "quiet_before": quiet,
                "measured_s": sum(rec["steps_s"])})
    print(f"  {side:10s} round {rnd}: {args.steps} steps {rec['measured_s']:7.1f}s "
          f"(median step {statistics.median(rec['steps_s']):5.1f}s)  first loss {rec['first_loss']:.4f}  "
          f"peak rss {rec['peak_rss_mb']:6.0f} MB (pss at step ends {rec.get('train_pss_mb', 0):6.0f})  "
          f"other processes {rec['other_cores']:.2f} cores", flush=True)
    return rec


def _processes_of(side: str) -> int:
    m = re.fullmatch(r"llmcal-(\d+)proc", side)
    return int(m.group(1)) if m else 1


def summarise(runs: list[dict], sides: list[str], flops_fn, peak: float, batch: int) -> dict:
    rows = {}
    for side in sides:
        rs = [r for r in runs if r["side"] == side]
        n_ex = len(rs[0]["lengths"])
        flops = sum(flops_fn(n)["total"] for n in rs[0]["lengths"])
        t = statistics.median(r["measured_s"] for r in rs)
        rows[side] = {"rounds": len(rs), "measured_s": t, "examples_per_s": n_ex / t,
                      "per_round_s": [round(r["measured_s"], 1) for r in rs],
                      "tflop": flops / 1e12, "gflops": flops / t / 1e9, "peak_fraction": flops / t / 1e9 / peak,
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                      "train_rss_mb": max(r["train_rss_mb"] for r in rs),
                      "train_pss_mb": max(r.get("train_pss_mb", 0.0) for r in rs),
                      "first_loss": rs[0]["first_loss"], "other_cores_max": max(r["other_cores"] for r in rs)}
    for peer, key in (("trl", "speedup_vs_trl"), (TRL_PADDING_FREE, "speedup_vs_trl_padding_free")):
        ref = rows.get(peer)
        for side, row in rows.items():
            if ref and not side.startswith("trl"):
                row[key] = ref["measured_s"] / row["measured_s"]
                paired = [t["measured_s"] / r["measured_s"] for r in runs if r["side"] == side
                          for t in runs if t["side"] == peer and t["round"] == r["round"]]
                row[key + "_paired"] = statistics.median(paired) if paired else None
    base = rows.get("llmcal")
    for side, row in rows.items():
        n = _processes_of(side)
        if n > 1 and base:
            row[f"speedup_{n}proc_vs_1proc"] = base["measured_s"] / row["measured_s"]
            paired = [b["measured_s"] / r["measured_s"] for r in runs if r["side"] == side
                      for b in runs if b["side"] == "llmcal" and b["round"] == r["round"]]
            row[f"speedup_{n}proc_vs_1proc_paired"] = statistics.median(paired) if paired else None
    return rows


def table(rows: dict, peak: float) -> str:
    out = ["| side | s per epoch | examples/s | GFLOP/s | % of bf16 peak | peak RSS MB | RSS in training MB | "
           "PSS in training MB | vs TRL |", "|---|---:|---:|---:|---|---:|---:|---:|---|"]
    for side, r in rows.items():
        vs = ("1.00x" if side == "trl" else
              f"{r['speedup_vs_trl']:.2f}x (paired {r['speedup_vs_trl_paired']:.2f}x)" if "speedup_vs_trl" in r
              else "")
        for key in [k for k in r if re.fullmatch(r"speedup_\d+proc_vs_1proc", k)]:
            vs += f"{key.split('_')[1]} vs 1 process: {r[key]:.2f}x (paired {r[key + '_paired']:.2f}x)"
        if "speedup_vs_trl_padding_free" in r:
            vs += f"; {r['speedup_vs_trl_padding_free']:.2f}x {TRL_PADDING_FREE}"
        out.append(f"| {side} | {r['measured_s']:.1f} | {r['examples_per_s']:.3f} | {r['gflops']:.1f} | "
                   f"{100 * r['peak_fraction']:.0f}% of {peak:.0f} | {r['peak_rss_mb']:.0f} | "
                   f"{r['train_rss_mb']:.0f} | {r['train_pss_mb']:.0f} | {vs} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--data", default="mmlu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (their own questions)")
    ap.add_argument("--steps", type=int, default=8, help="measured steps: one epoch of steps x batch questions")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=SRC",
                    help="also run llmcal from source tree SRC (a directory holding the llmcal package) in every "
                         "round; repeatable")
    ap.add_argument("--no-trl", action="store_true", help="llmcal sides only")
    ap.add_argument("--processes", type=int, default=1,
                    help="N > 1: also run llmcal in N data-parallel processes of 1 thread (side llmcal-Nproc) and "
                         "report speedup_Nproc_vs_1proc against llmcal in one process")
    ap.add_argument("--only-processes", action="store_true",
                    help="with --processes N: run the llmcal-Nproc side alone (its memory, no speedup measured)")
    ap.add_argument("--trl-padding-free", action="store_true",
                    help=f"also run TRL with padding_free=True ({TRL_PADDING_FREE}): its packed batches, not its "
                         "default; the targets stay measured against the default")
    ap.add_argument("--padding-free", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="llmcal sides with activation checkpointing of every decoder layer (llmcal's checkpoint_layers, "
                         "as --gradient_checkpointing true does in llmcal calibrate); TRL's side stays without")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for the peak and every side (0: torch's default, one per core). On a "
                         "shared machine --threads 1 measures one core that others leave alone: a torch "
                         "parallel region waits for its slowest thread, so a contended second thread costs "
                         "more than it gives")
    ap.add_argument("--quiet-cores", type=float, default=0.25,
                    help="before each run, wait until other processes use fewer cores than this (0: do not wait)")
    ap.add_argument("--max-wait", type=float, default=300)
    ap.add_argument("--label", default="")
    ap.add_argument("--work", default=str(HERE / "work" / "train"))
    ap.add_argument("--results", default=str(HERE / "results"))
    ap.add_argument("--child", choices=["llmcal", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    if not args.no_trl and _version("trl") == "not installed":
        raise SystemExit("TRL is not installed: pip install -e '.[bench]' (check with --dry-run that it keeps torch)")
    from llmcal.data import load_dataset
    from llmcal.models import load_tokenizer, resolve_model, weights_dir
    from llmcal.prompts import encode_questions

    started = dt.datetime.now(dt.timezone.utc)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # the peak below is measured on the same threads as the sides
    spec = resolve_model(args.model)
    model_dir = weights_dir(spec)
    tok = load_tokenizer(spec)
    n = (args.warmup + args.steps) * args.batch
    enc = encode_questions(list(load_dataset(args.data, limit=n, seed=args.seed).questions), tok, "plain")
    lengths = [len(e.input_ids) for e in enc[args.warmup * args.batch:]]
    config, linear_params, adapted, shapes = model_shapes(model_dir, args.batch, statistics.mean(lengths))
    flops_fn = lambda n_tok: flops_per_example(n_tok, config, linear_params, adapted, LORA["r"])  # noqa: E731
    fpe = [flops_fn(k) for k in lengths]
    info = {**machine_info(), "trl": _version("trl"), "peft": _version("peft")}
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, trl {info['trl']}")
    print(f"{args.model}: {linear_params / 1e9:.3f} B linear parameters; {len(lengths)} measured questions, "
          f"{sum(lengths)} prompt tokens (mean {statistics.mean(lengths):.0f}), "
          f"{sum(f['total'] for f in fpe) / 1e12:.2f} TFLOP forward+backward "
          f"({statistics.mean(f['total'] for f in fpe) / 1e12:.3f} per question)", flush=True)

    variants = {}
    for text in args.variant:
        name, _, src = text.partition("=")
        if not name or not src or not Path(src, "llmcal").is_dir():
            raise SystemExit(f"--variant {text}: give NAME=SRC with SRC holding the llmcal package")
        variants[name] = src
    if args.processes > 1 and args.batch % args.processes:
        raise SystemExit(f"--batch {args.batch} does not split between --processes {args.processes}")
    if args.only_processes and args.processes < 2:
        raise SystemExit("--only-processes needs --processes 2 or more")
    sides = (([] if args.only_processes else ["llmcal"])
             + ([f"llmcal-{args.processes}proc"] if args.processes > 1 else []) + list(variants)
             + ([] if args.no_trl else ["trl"])
             + ([TRL_PADDING_FREE] if args.trl_padding_free and not args.no_trl else []))
    if args.quiet_cores > 0:
        wait_quiet(args.quiet_cores, args.max_wait)
    peaks = [matmul_peak(shapes)]
    print(f"bfloat16 matmul peak: {peaks[0]['gflops']} GFLOP/s {peaks[0]['shapes']}", flush=True)
    runs, failed = [], []
    for rnd in range(args.rounds):
        order = sides if rnd % 2 == 0 else sides[::-1]
        print(f"round {rnd + 1}/{args.rounds}: {', '.join(order)}", flush=True)
        for side in order:
            try:
                runs.append(run_side(side, rnd, args, variants.get(side)))
            except SystemExit as e:  # e.g. killed for memory on a shared machine: keep the other runs
                print(f"  {side} round {rnd}: FAILED ({str(e).splitlines()[0]})", flush=True)
                failed.append({"side": side, "round": rnd})
    if args.quiet_cores > 0:
        wait_quiet(args.quiet_cores, args.max_wait)
    peaks.append(matmul_peak(shapes))
    peak = max(p["gflops"] for p in peaks)
    sides = [s for s in sides if any(r["side"] == s for r in runs)]
    rows = summarise(runs, sides, flops_fn, peak, args.batch)
    print(f"\nbfloat16 matmul peak (best of start and end): {peak} GFLOP/s\n")
    print(table(rows, peak))
    losses = {s: r["first_loss"] for s, r in rows.items()}
    print(f"\nfirst-step loss (same first batch, LoRA B = 0): {losses}")
    for side, r in rows.items():
        if side.startswith("trl"):
            continue
        n = _processes_of(side)
        if n > 1 and f"speedup_{n}proc_vs_1proc" in r:  # not with --only-processes
            got = r[f"speedup_{n}proc_vs_1proc"]
            print(f"target speedup_{n}proc_vs_1proc >= {PROCESS_TARGET}: {got:.2f} -> "
                  f"{'met' if got >= PROCESS_TARGET else 'MISSED'}")
        for key, want in TARGETS.items():
            if key in r:
                got = r[key]
                print(f"target {key} >= {want}: {side} {got:.2f} -> {'met' if got >= want else 'MISSED'}")

    label = re.sub(r"[^A-Za-z0-9]+", "-", args.label).strip("-")[:40]
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    path = res / f"train-{started.strftime('%Y%m%dT%H%M%S')}{'-' + label if label else ''}.json"
    for r in runs:  # no paths of this machine in the committed file
        r.pop("quiet_before", None)
    doc = {"label": args.label, "started": started.isoformat(), "machine": info,
           "setup": {"model": args.model, "data": args.data, "seed": args.seed, "batch": args.batch,
                     "warmup_steps": args.warmup, "steps": args.steps, "rounds": args.rounds, "dtype": "bfloat16",
                     "trl_padding_free": args.trl_padding_free, "processes": args.processes,
                     "gradient_checkpointing": args.gradient_checkpointing,
                     "threads": args.threads or info["torch_threads"],
                     "lora": LORA, "lr": LR, "variants": list(variants),
                     "flops_count": "forward 2Pn + attention 4hd n(n+1)/2 per layer + LoRA 2nr(din+dout) + "
                                    "output row 2HV; backward 1x linear and output row, 2x attention and LoRA"},
           "linear_params": linear_params, "lengths": lengths,
           "flops_per_question_mean": statistics.mean(f["total"] for f in fpe),
           "peaks": peaks, "peak_gflops": peak, "rows": rows, "runs": runs, "failed": failed, "targets": TARGETS}
    if args.processes > 1:
        doc[f"speedup_{args.processes}proc_vs_1proc"] = rows.get(f"llmcal-{args.processes}proc", {}).get(
            f"speedup_{args.processes}proc_vs_1proc")
        doc["process_target"] = PROCESS_TARGET
    path.write_text(json.dumps(doc, indent=1))
    print(f"\nwritten {path.relative_to(HERE.parent) if path.is_relative_to(HERE.parent) else path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
