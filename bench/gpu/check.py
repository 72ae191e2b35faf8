#!/usr/bin/env python
"""The GPU check: llmcal's scoring and CFT/RCFT training on real model shapes, in one command, offline.

    bash bench/gpu/check.sh                 # on a GPU machine: < 8 minutes on one large GPU
    python bench/gpu/check.py --tiny        # the same sections with tiny shapes (CPU; what the test runs)

Needs only PyTorch, transformers, peft and accelerate: no network and no weights. The models are
randomly initialised from transformers config classes with the real shapes of Qwen2.5-1.5B and
Llama-3.1-8B (``SHAPES``), so the numbers are speeds and memory, not answers. Sections, each
timed and recorded even when another fails:

1. ``peak``: the bfloat16 matmul rate of this device (``torch.matmul`` on square matrices, best of
   several), the denominator of every "share of peak";
2. ``equal``: a tiny random Llama on the CPU and on this device, float32: the CFT loss (answer
   SFT loss), the RCFT loss (SFT + lambda L_ECE with fixed bin targets) and the scoring engine's
   option logits (zero-shot, and few-shot with and without the shared-prefix cache) must agree
   within float tolerance; bfloat16 on the device is reported against them;
3. ``scoring``: llmcal's scoring engine (``llmcal.scoring.score``) in bfloat16 on random prompts of
   MMLU lengths, zero-shot at two token budgets and 5-shot (one shared prefix per subject) with
   and without the prefix cache: questions/s, tokens/s, TFLOP/s, share of peak, peak memory;
4. ``training``: llmcal's ``CalibrationTrainer`` (its ``compute_loss``, collator and losses) with
   LoRA r=16 on all linear layers (llmcal's defaults), bf16 mixed precision, CFT and RCFT: steps/s,
   examples/s, share of peak, peak memory, the losses;
5. ``trl``: TRL's ``SFTTrainer`` on the same examples (loss on the answer letter only), when trl and
   datasets are importable (bench/gpu/README.md says how to carry their wheels).

The result goes to ``bench/results/gpu-<UTC time>.json`` (relative paths only). Exit status 0 when
every check passed, 1 when a check failed, 2 when a section raised.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "src"))  # llmcal from this checkout; it need not be installed

# Real shapes (from the models' config.json), random weights.
SHAPES = {
    "qwen2.5-1.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                         tie_word_embeddings=True)),
    "llama-3.1-8b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                                         tie_word_embeddings=False)),
}
TINY = {"tiny-llama": ("LlamaConfig", dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=4096, tie_word_embeddings=False))}
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")  # llmcal's FinetuneConfig defaults
LETTERS = (32, 33, 34, 35)  # token ids that play the option letters in the random prompts
LOSS_TOL = 1e-4  # float32, CPU against the device: relative difference of a loss
LOGIT_TOL = 1e-3  # float32: absolute difference of an option logit
DEADLINE = [float("inf")]  # perf_counter() after which no new model is started (--budget-s)


def out_of_time(what: str) -> dict | None:
    """A record saying ``what`` was skipped when the time budget is spent, else None."""
    if time.perf_counter() < DEADLINE[0]:
        return None
    print(f"  {what}: skipped, the time budget is spent", flush=True)
    return {"skipped": "time budget (--budget-s) spent"}


# ---- helpers -----------------------------------------------------------------------------------
def device_info(device) -> dict:
    import torch

    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    for pkg in ("transformers", "peft", "accelerate", "trl", "datasets"):
        try:
            from importlib.metadata import version

            info[pkg] = version(pkg)
        except Exception:
            info[pkg] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=p.name, capability=f"{p.major}.{p.minor}", memory_gb=round(p.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, bf16=torch.cuda.is_bf16_supported())
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def build_model(name: str, shapes: dict, device, dtype, seed: int = 0):
    """A causal LM of these shapes with random weights, built on ``device`` in ``dtype``."""
    import torch
    import transformers

    cls_name, kw = shapes[name]
    config = getattr(transformers, cls_name)(**kw, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def linear_params(model) -> int:
    import torch

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return sum(m.weight.numel() for m in inner.get_decoder().modules() if isinstance(m, torch.nn.Linear)
               and not hasattr(m, "base_layer"))


def attn_flops_per_pair(config) -> float:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers * 2 * 2 * heads * head_dim


class FakeTokenizer:
    """What the scoring engine asks of a tokenizer: the pad id."""

    pad_token_id = 0


def random_questions(n: int, vocab: int, seed: int, *, mean_len: int, prefix_len: int = 0, per_prefix: int = 50):
    """Encoded questions with random tokens and MMLU-like lengths; with ``prefix_len``, groups share a prefix."""
    import random

    from llmcal.data.schema import Question
    from llmcal.prompts import EncodedQuestion

    rnd = random.Random(seed)
    out, prefix = [], []
    for i in range(n):
        if prefix_len and i % per_prefix == 0:
            prefix = [rnd.randrange(3, vocab) for _ in range(prefix_len)]
        length = max(8, int(rnd.lognormvariate(math.log(mean_len), 0.45)))
        ids = tuple(prefix) + tuple(rnd.randrange(3, vocab) for _ in range(length))
        q = Question(id=f"r{i}", question="random", choices=("a", "b", "c", "d"), answer=i % 4, subject="random")
        out.append(EncodedQuestion(question=q, input_ids=ids, letter_ids=LETTERS, prefix_len=len(prefix)))
    return out


def scoring_flops(model, encoded) -> float:
    """Matmul work the answers need: linear layers per token, causal attention, prefixes counted once."""
    cfg = model.config
    lin, att = 2.0 * linear_params(model), attn_flops_per_pair(cfg)
    seen, total = set(), 0.0
    for e in encoded:
        p = e.prefix_len
        key = tuple(e.input_ids[:p])
        if p and key not in seen:
            seen.add(key)
            total += lin * p + att * p * (p + 1) / 2
        n = len(e.input_ids) - p
        total += lin * n + att * (n * p + n * (n + 1) / 2)
    return total


def examples_of(encoded):
    from llmcal.train.collator import build_examples

    return build_examples(encoded)


def lora(model, seed: int = 0):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    if next(model.parameters()).device.type == "cpu":
        from llmcal.train.dropout import use_cpu_mask_dropout

        use_cpu_mask_dropout(model)
    return model


# ---- sections ----------------------------------------------------------------------------------
def section_peak(device, tiny: bool) -> dict:
    import torch

    n = 256 if tiny else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    best = float("inf")
    for _ in range(5 if tiny else 20):
        t = time.perf_counter()
        for _ in range(1 if tiny else 5):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t) / (1 if tiny else 5))
    return {"shape": f"{n}x{n}x{n}", "bf16_tflops": round(2 * n ** 3 / best / 1e12, 3)}


def _losses(model, batch, device) -> dict:
    """CFT and RCFT losses of one batch through llmcal's training forward."""
    from llmcal.train.losses import RcftLoss
    from llmcal.train.state import TrainState
    from llmcal.train.trainer import answer_forward, training_precision

    batch = {k: v.to(device) for k, v in batch.items()}
    st = TrainState.initial("rcft", 1.0, 10)
    st.rcft_on = True
    st.targets = [None, 0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85]
    with training_precision(model):
        out = answer_forward(model, batch)
    rcft = RcftLoss(10).total(out.sft_loss, out.letter_logits, st, batch["letter_mask"])
    return {"cft": out.sft_loss.item(), "rcft": rcft.item()}


def section_equal(device, tiny: bool) -> dict:
    """The tiny model: the device's losses and option logits against the CPU's (float32), bf16 reported."""
    import numpy as np
    import torch

    from llmcal.scoring import ScoreOptions, score
    from llmcal.train.collator import McqCollator

    cpu = torch.device("cpu")
    enc = random_questions(12 if tiny else 48, 512, seed=1, mean_len=24)
    enc_fs = random_questions(12 if tiny else 48, 512, seed=2, mean_len=16, prefix_len=60, per_prefix=4)
    batch = McqCollator(0)(examples_of(enc[:8]))
    res: dict = {"ok": True}

    def logits(model, e, **kw):
        preds = score(model, FakeTokenizer(), e, options=ScoreOptions(progress=False, batch_tokens=512, **kw))
        return {p.id: np.asarray(p.logits) for p in preds}

    ref_model = build_model("tiny-llama", TINY, cpu, torch.float32)
    ref = {"losses": _losses(ref_model, batch, cpu), "zero": logits(ref_model, enc), "few": logits(ref_model, enc_fs)}
    state = ref_model.state_dict()
    for dtype in (torch.float32, torch.bfloat16):
        model = build_model("tiny-llama", TINY, device, dtype)
        model.load_state_dict(state)
        name = str(dtype).replace("torch.", "")
        losses = _losses(model, batch, device)
        rel = {k: abs(losses[k] - ref["losses"][k]) / max(1e-12, abs(ref["losses"][k])) for k in losses}
        zero, few, few_nocache = logits(model, enc), logits(model, enc_fs), logits(model, enc_fs, prefix_cache=False)
        dz = max(float(np.abs(zero[k] - ref["zero"][k]).max()) for k in zero)
        df = max(float(np.abs(few[k] - ref["few"][k]).max()) for k in few)
        dn = max(float(np.abs(few[k] - few_nocache[k]).max()) for k in few)
        same = sum(int(few[k].argmax() == ref["few"][k].argmax()) for k in few) + sum(
            int(zero[k].argmax() == ref["zero"][k].argmax()) for k in zero)
        row = {"losses": losses, "loss_rel_diff": rel, "max_logit_diff_zero_shot": dz,
               "max_logit_diff_few_shot": df, "max_logit_diff_prefix_cache_vs_full": dn,
               "same_prediction": f"{same}/{len(zero) + len(few)}"}
        if dtype == torch.float32:
            row["ok"] = (max(rel.values()) < LOSS_TOL and max(dz, df) < LOGIT_TOL and dn < LOGIT_TOL
                         and same == len(zero) + len(few))
            res["ok"] = row["ok"]
        res[name] = row
    res["cpu_losses"] = ref["losses"]
    return res


def section_scoring(device, tiny: bool, names: list[str], n: int) -> dict:
    import torch

    from llmcal.scoring import ScoreOptions, score

    shapes = TINY if tiny else SHAPES
    out = {}
    for name in names:
        if (late := out_of_time(f"scoring {name}")) is not None:
            out[name] = {"runs": {}, **late}
            continue
        reset_memory(device)
        model = build_model(name, shapes, device, torch.bfloat16)
        vocab = model.config.vocab_size
        runs = {}
        cases = [("0-shot", dict(mean_len=130 if not tiny else 24), (2048, 16384) if not tiny else (256,)),
                 ("5-shot", dict(mean_len=130 if not tiny else 24, prefix_len=600 if not tiny else 60,
                                 per_prefix=max(4, n // 4)), (16384,) if not tiny else (256,))]
        for case, kw, budgets in cases:
            enc = random_questions(n, vocab, seed=3, **kw)
            flops = scoring_flops(model, enc)
            tokens = sum(len(e.input_ids) for e in enc)
            for bt in budgets:
                for cache in ((True, False) if case == "5-shot" else (True,)):
                    opts = ScoreOptions(progress=False, batch_tokens=bt, prefix_cache=cache)
                    score(model, FakeTokenizer(), enc[: max(4, n // 8)], options=opts)  # warm-up
                    reset_memory(device)
                    sync(device)
                    t = time.perf_counter()
                    score(model, FakeTokenizer(), enc, options=opts)
                    sync(device)
                    s = time.perf_counter() - t
                    key = f"{case} budget {bt}" + ("" if case == "0-shot" else (" prefix cache" if cache else
                                                                                 " full prompts"))
                    runs[key] = {"questions": n, "prompt_tokens": tokens, "seconds": round(s, 3),
                                 "questions_per_s": round(n / s, 2), "tokens_per_s": round(tokens / s),
                                 "tflops": round(flops / s / 1e12, 3), "peak_memory_gb": peak_memory_gb(device)}
        out[name] = {"linear_params": linear_params(model), "runs": runs}
        del model
        reset_memory(device)
    return out


class StepTimer:
    def __init__(self, device):
        from transformers import TrainerCallback

        timer = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                sync(device)
                timer.t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                sync(device)
                timer.steps.append(time.perf_counter() - timer.t)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    timer.losses.append(float(logs["loss"]))

        self.steps: list[float] = []
        self.losses: list[float] = []
        self.t = 0.0
        self.callback = CB()


def _train_args(out: str, steps: int, batch: int, device, bf16: bool) -> dict:
    return dict(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=2e-4,
                lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, seed=0, data_seed=0,
                logging_strategy="steps", logging_steps=1, save_strategy="no", report_to=[],
                use_cpu=device.type == "cpu", bf16=bf16, dataloader_num_workers=0, dataloader_pin_memory=False,
                remove_unused_columns=False, disable_tqdm=True, gradient_checkpointing=False, optim="adamw_torch")


def section_training(device, tiny: bool, names: list[str], steps: int, batch: int, trl: bool) -> dict:
    import torch
    from transformers import TrainingArguments

    from llmcal.train.collator import ExampleDataset, McqCollator
    from llmcal.train.losses import RcftLoss
    from llmcal.train.state import TrainState
    from llmcal.train.trainer import CalibrationTrainer, packs_questions

    shapes = TINY if tiny else SHAPES
    bf16 = device.type == "cuda"
    out = {}
    for name in names:
        res = {}
        vocab = shapes[name][1]["vocab_size"]
        enc = random_questions((steps + 1) * batch, vocab, seed=4, mean_len=24 if tiny else 150)
        examples = examples_of(enc)
        tokens = sum(len(x["input_ids"]) for x in examples[batch:])
        for method in ("cft", "rcft"):
            if (late := out_of_time(f"training {name} {method}")) is not None:
                res[method] = late
                continue
            reset_memory(device)
            model = lora(build_model(name, shapes, device, torch.bfloat16))
            model.train()
            per_q = 4.0 * linear_params(model)  # forward 2P + activation gradients 2P per token
            att = attn_flops_per_pair(model.config)
            flops = sum(per_q * len(x["input_ids"]) + 3 * att * len(x["input_ids"]) ** 2 / 2 for x in examples[batch:])
            st = TrainState.initial(method, 1.0, 10)
            if method == "rcft":  # the loss with its E-step targets in place (the E-step is a scoring pass)
                st.rcft_on = True
                st.targets = [None, 0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85]
            timer = StepTimer(device)
            with tempfile.TemporaryDirectory() as tmp:
                trainer = CalibrationTrainer(
                    model=model, args=TrainingArguments(**_train_args(tmp, steps + 1, batch, device, bf16)),
                    train_dataset=ExampleDataset(examples), data_collator=McqCollator(0, packed=packs_questions(model)),
                    callbacks=[timer.callback], train_state=st, rcft_loss=RcftLoss(10))
                trainer.train()
            measured = timer.steps[1:]  # the first step warms up kernels and the optimizer state
            s = sum(measured)
            res[method] = {"steps": len(measured), "batch": batch, "seconds": round(s, 3),
                           "steps_per_s": round(len(measured) / s, 3),
                           "examples_per_s": round(len(measured) * batch / s, 2),
                           "tflops": round(flops / s / 1e12, 3), "peak_memory_gb": peak_memory_gb(device),
                           "losses": [round(x, 5) for x in timer.losses],
                           "packed": packs_questions(model)}
            del trainer, model
            reset_memory(device)
        if trl:
            res["trl"] = out_of_time(f"training {name} trl") or section_trl(device, name, shapes, examples, steps, batch, bf16)
        out[name] = res
    return out


def section_trl(device, name, shapes, examples, steps, batch, bf16) -> dict:
    """TRL's SFTTrainer on the same token ids, the loss on the answer letter only (as bench_train.py)."""
    try:
        import torch
        from datasets import Dataset
        from peft import LoraConfig
        from trl import SFTConfig, SFTTrainer
    except ImportError as e:
        return {"skipped": f"not importable: {e}"}
    reset_memory(device)
    model = build_model(name, shapes, device, torch.bfloat16)
    model.train()
    data = Dataset.from_list([{"input_ids": x["input_ids"] + [x["letter_ids"][x["answer"]]],
                               "completion_mask": [0] * len(x["input_ids"]) + [1]} for x in examples])
    timer = StepTimer(device)

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    # SFTTrainer wants a processing class; the data are token ids already
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2},
                                                                             unk_token="<pad>")),
                                  pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SFTConfig(**_train_args(tmp, steps + 1, batch, device, bf16), completion_only_loss=True,
                        max_length=None, packing=False, dataset_num_proc=None)
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok,
                             peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA), callbacks=[timer.callback])
        trainer.train()
    measured = timer.steps[1:]
    s = sum(measured)
    del trainer, model
    reset_memory(device)
    return {"steps": len(measured), "batch": batch, "seconds": round(s, 3), "steps_per_s": round(len(measured) / s, 3),
            "examples_per_s": round(len(measured) * batch / s, 2), "losses": [round(x, 5) for x in timer.losses]}


# ---- main --------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (default on a machine without CUDA)")
    ap.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    ap.add_argument("--models", default=None, help=f"comma-separated, of {', '.join(SHAPES)} (default: all)")
    ap.add_argument("--questions", type=int, default=None, help="scoring questions per case (default 1024; tiny 16)")
    ap.add_argument("--steps", type=int, default=None, help="measured training steps (default 8; tiny 2)")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default 8; tiny 2)")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: peak,equal,scoring,training,trl")
    ap.add_argument("--budget-s", type=float, default=420,
                    help="start no new model after this many seconds (the rest is recorded as skipped)")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--label", default="")
    args = ap.parse_args(argv)

    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = args.tiny or device.type != "cuda"
    names = list(TINY) if tiny else (args.models.split(",") if args.models else list(SHAPES))
    unknown = [m for m in names if m not in (TINY if tiny else SHAPES)]
    if unknown:
        raise SystemExit(f"unknown model shape(s) {unknown}; choose from {', '.join(SHAPES)}")
    n = args.questions or (16 if tiny else 1024)
    steps, batch = args.steps or (2 if tiny else 8), args.batch or (2 if tiny else 8)
    skip = {s for s in args.skip.split(",") if s}
    started = dt.datetime.now(dt.timezone.utc)
    DEADLINE[0] = time.perf_counter() + args.budget_s
    doc: dict = {"label": args.label, "started": started.isoformat(timespec="seconds"), "tiny": tiny,
                 "machine": device_info(device), "shapes": {k: v[1] for k, v in (TINY if tiny else SHAPES).items()
                                                             if k in names},
                 "lora": LORA, "sections": {}, "errors": {}}
    sections = [("peak", lambda: section_peak(device, tiny)),
                ("equal", lambda: section_equal(device, tiny)),
                ("scoring", lambda: section_scoring(device, tiny, names, n)),
                ("training", lambda: section_training(device, tiny, names, steps, batch, "trl" not in skip))]
    for key, fn in sections:
        if key in skip:
            continue
        t0 = time.perf_counter()
        print(f"[{key}] ...", flush=True)
        try:
            doc["sections"][key] = fn()
        except Exception as e:  # recorded, and the other sections still run
            doc["errors"][key] = f"{type(e).__name__}: {e}\n" + traceback.format_exc(limit=6)
            print(f"[{key}] FAILED: {type(e).__name__}: {e}", flush=True)
        doc.setdefault("section_seconds", {})[key] = round(time.perf_counter() - t0, 1)
        print(f"[{key}] {doc['section_seconds'][key]} s", flush=True)
    peak = doc["sections"].get("peak", {}).get("bf16_tflops")
    if peak:
        for part in ("scoring", "training"):
            for model_runs in doc["sections"].get(part, {}).values():
                rows = model_runs.get("runs", model_runs)
                for row in rows.values():
                    if isinstance(row, dict) and "tflops" in row:
                        row["share_of_peak"] = round(row["tflops"] / peak, 3)
    doc["total_seconds"] = round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1)
    ok = doc["sections"].get("equal", {}).get("ok", "equal" in skip)
    doc["ok"] = bool(ok) and not doc["errors"]
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"gpu-{started.strftime('%Y%m%dT%H%M%S')}{'-tiny' if tiny else ''}.json"
    text = json.dumps(doc, indent=2, default=str) + "\n"
    for root in (str(ROOT), str(Path.home())):  # tracebacks name files: keep them relative
        text = text.replace(root + "/", "").replace(root, ".")
    path.write_text(text)
    print(summary(doc))
    print(f"saved {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 2 if doc["errors"] else (0 if ok else 1)


def summary(doc: dict) -> str:
    lines = [f"device: {doc['machine'].get('name')} ({doc['machine']['device']}), {doc['total_seconds']} s"]
    s = doc["sections"]
    if "peak" in s:
        lines.append(f"bf16 matmul peak: {s['peak']['bf16_tflops']} TFLOP/s ({s['peak']['shape']})")
    if "equal" in s:
        e = s["equal"]["float32"]
        lines.append(f"tiny model, device vs CPU float32: losses rel diff {max(e['loss_rel_diff'].values()):.1e}, "
                     f"logits {max(e['max_logit_diff_zero_shot'], e['max_logit_diff_few_shot']):.1e}, prefix cache "
                     f"vs full {e['max_logit_diff_prefix_cache_vs_full']:.1e}, same prediction "
                     f"{e['same_prediction']}: {'ok' if s['equal']['ok'] else 'FAILED'}")
    for name, m in s.get("scoring", {}).items():
        for key, r in m["runs"].items():
            share = f" ({100 * r['share_of_peak']:.0f}% of peak)" if "share_of_peak" in r else ""
            lines.append(f"score {name} {key}: {r['questions_per_s']} q/s, {r['tflops']} TFLOP/s{share}"
                         + (f", peak memory {r['peak_memory_gb']} GB" if r.get("peak_memory_gb") else ""))
    for name, m in s.get("training", {}).items():
        for key, r in m.items():
            if "steps_per_s" in r:
                lines.append(f"train {name} {key}: {r['steps_per_s']} steps/s ({r['examples_per_s']} examples/s)"
                             + (f", {100 * r['share_of_peak']:.0f}% of peak" if "share_of_peak" in r else "")
                             + (f", peak memory {r['peak_memory_gb']} GB" if r.get("peak_memory_gb") else ""))
            elif "skipped" in r:
                lines.append(f"train {name} {key}: skipped ({r['skipped']})")
    for key, err in doc["errors"].items():
        lines.append(f"[{key}] error: {err.splitlines()[0]}")
    return "\n".join(lines)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
