#!/usr/bin/env python
"""Where the resident memory of a CFT training step goes, and its peak.

    python bench/bench_memory.py                     # qwen2.5-coder-1.5b-instruct, its weights, MMLU batch 2, 3 steps
    python bench/bench_memory.py --layers 4          # the same shapes, 4 decoder layers, random weights (seconds)
    python bench/bench_memory.py --checkpoint-every 1   # with activation checkpointing of every decoder layer
    python bench/bench_memory.py --json out.json     # also write the numbers

One process, one thread (``--threads``), the step of ``bench/bench_train.py``'s llmcal side without
the Trainer around it: the model in bfloat16, LoRA r=16 / alpha 32 / dropout 0.05 on all linear
layers (llmcal's ``add_lora``), the questions of ``--data`` (seed 0, llmcal's ``plain`` prompt),
``--batch`` questions per step in one batch as llmcal's run builds it (packed when the model allows),
``answer_forward`` under ``training_precision``, backward, AdamW (lr 2e-4).

What it reports:

* the resident size (``/proc/self/status``: VmRSS, of which RssAnon and RssFile) after importing,
  after loading, after adding LoRA, and the largest seen in each phase of each step (forward,
  backward, optimizer; a thread samples every 2 ms) and the process's high-water mark (VmHWM);
* the parts that can be counted exactly: the frozen weights, the LoRA weights, their gradients and
  AdamW's two moments; the tensors autograd saves for the backward pass during a forward
  (``torch.autograd.graph.saved_tensors_hooks``; each storage counted once, parameters left out:
  saving one copies nothing), grouped by the module that saved them (layer numbers folded into
  ``*``) and by dtype; the vocabulary logits the forward returns.

The difference between the peak and the counted parts is the Python/torch runtime, the data, the
backward's transient tensors (gradients of activations, freed as the pass goes) and the allocator's
free but unreturned memory.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import threading
import time
from pathlib import Path

MB = 1024 * 1024


def proc_status() -> dict:
    out = {}
    for line in open("/proc/self/status"):
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(rest.split()[0]) / 1024  # kB -> MB
    return out


class Sampler:
    """A thread that keeps the largest VmRSS seen in the current phase."""

    def __init__(self, every: float = 0.002):
        self.every = every
        self.phase = "idle"
        self.peaks: dict[str, float] = collections.defaultdict(float)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            rss = proc_status()["VmRSS"]
            if rss > self.peaks[self.phase]:
                self.peaks[self.phase] = rss
            time.sleep(self.every)

    def set(self, phase: str):
        rss = proc_status()["VmRSS"]
        self.peaks[self.phase] = max(self.peaks[self.phase], rss)
        self.phase = phase
        self.peaks[phase] = max(self.peaks[phase], rss)

    def stop(self):
        self._stop.set()
        self._thread.join()


class SavedTensors:
    """Bytes autograd saves for the backward pass, by the module running when they were saved."""

    def __init__(self, model):
        import torch

        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.stack: list[str] = []
        self.seen: set[int] = set()
        self.by_module: dict[str, int] = collections.Counter()
        self.by_dtype: dict[str, int] = collections.Counter()
        self.handles = []
        for name, module in model.named_modules():
            short = re.sub(r"\.\d+\.", ".*.", "." + name + ".").strip(".")
            short = re.sub(r"^(base_model\.model\.)", "", short)
            self.handles.append(module.register_forward_pre_hook(self._enter(short)))
            self.handles.append(module.register_forward_hook(self._leave))
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _enter(self, name: str):
        def hook(module, args):
            self.stack.append(name)
        return hook

    def _leave(self, module, args, output):
        self.stack.pop()

    def _pack(self, t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.params or ptr in self.seen or storage.nbytes() == 0:
            return t
        self.seen.add(ptr)
        where = self.stack[-1] if self.stack else "(outside any module)"
        self.by_module[where] += storage.nbytes()
        self.by_dtype[str(t.dtype).replace("torch.", "")] += storage.nbytes()
        return t

    def reset(self):
        self.seen.clear()
        self.by_module.clear()
        self.by_dtype.clear()


def build(args):
    """(model, tokenizer or None, batches): the real model or its shapes cut to ``--layers`` layers."""
    import torch

    from llmcal.models import resolve_model, weights_dir
    from llmcal.train.config import FinetuneConfig
    from llmcal.train.model import add_lora

    spec = resolve_model(args.model)
    cfg = FinetuneConfig(model=args.model, train=args.data, evals=[args.data], lora_r=16, lora_alpha=32,
                         lora_dropout=0.05, target_modules="all-linear", lr=2e-4, batch_size=args.batch, seed=0)
    if args.layers:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from llmcal.models import LoadedModel, tokenizer_dir

        config = AutoConfig.from_pretrained(weights_dir(spec, "bfloat16"))
        config.num_hidden_layers = args.layers
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        tok = AutoTokenizer.from_pretrained(tokenizer_dir(spec))
        loaded = LoadedModel(model=model, tokenizer=tok, spec=spec, device="cpu", dtype="bfloat16")
    else:
        from llmcal.models import load_model

        loaded = load_model(spec, dtype="bfloat16", device="cpu", trainable=True)
    return loaded, cfg, add_lora


def batches(args, tok, packed: bool):
    from llmcal.data import load_dataset
    from llmcal.prompts import encode_questions
    from llmcal.train.collator import McqCollator, build_examples

    n = args.steps * args.batch
    questions = list(load_dataset(args.data, limit=n, seed=0).questions)
    examples = build_examples(encode_questions(questions, tok, "plain"), tok)
    collate = McqCollator(tok.pad_token_id if tok.pad_token_id is not None else 0, packed=packed)
    return [collate(examples[i:i + args.batch]) for i in range(0, n, args.batch)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--layers", type=int, default=0, help="0: the model's own weights; N: its shapes, N layers, "
                                                         "random weights")
    ap.add_argument("--data", default="mmlu")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                    help="activation checkpointing of every N decoder layers (llmcal's checkpoint_layers; 0: off)")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    sampler = Sampler()
    rec = {"args": {k: v for k, v in vars(args).items() if k != "json"}, "rss_mb": {"imported": proc_status()}}
    from llmcal.train.trainer import answer_forward, packs_questions, training_precision

    try:  # absent from versions before it
        from llmcal.train.trainer import checkpoint_layers
    except ImportError:
        checkpoint_layers = None

    sampler.set("load")
    t0 = time.perf_counter()
    loaded, cfg, add_lora = build(args)
    rec["rss_mb"]["loaded"] = proc_status()
    frozen = collections.Counter()
    for p in loaded.model.parameters():
        frozen[str(p.dtype).replace("torch.", "")] += p.numel() * p.element_size()
    model = add_lora(loaded, cfg)
    if args.checkpoint_every:
        if checkpoint_layers is None:
            raise SystemExit("--checkpoint-every: this llmcal has no checkpoint_layers")
        checkpoint_layers(model, args.checkpoint_every)
    rec["rss_mb"]["lora"] = proc_status()
    print(f"loaded and LoRA added in {time.perf_counter() - t0:.0f} s", flush=True)
    data = batches(args, loaded.tokenizer, packs_questions(model)) if args.steps else []
    rec["rss_mb"]["data"] = proc_status()
    print(f"{len(data)} batches in {time.perf_counter() - t0:.0f} s", flush=True)
    lora = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(lora, lr=2e-4, weight_decay=0.0)
    saved = SavedTensors(model)
    steps = []
    torch.manual_seed(0)  # the same dropout masks with and without --checkpoint-every: the same losses
    for i, batch in enumerate(data):
        saved.reset()
        t_step = time.perf_counter()
        sampler.set(f"step{i}.forward")
        with saved.hooks, training_precision(model):
            out = answer_forward(model, batch)
        sampler.set(f"step{i}.backward")
        out.sft_loss.backward()
        sampler.set(f"step{i}.optimizer")
        opt.step()
        opt.zero_grad(set_to_none=True)
        sampler.set("idle")
        steps.append({"tokens": int(batch["input_ids"].numel()), "loss": out.sft_loss.item(),
                      "seconds": time.perf_counter() - t_step,
                      "saved_mb": sum(saved.by_module.values()) / MB,
                      "saved_by_dtype_mb": {k: v / MB for k, v in saved.by_dtype.items()},
                      "saved_by_module_mb": {k: round(v / MB, 2) for k, v in
                                             sorted(saved.by_module.items(), key=lambda kv: -kv[1])}})
        print(f"step {i}: {steps[-1]['tokens']} tokens, {steps[-1]['seconds']:.1f} s, loss {steps[-1]['loss']:.4f}, saved for backward "
              f"{steps[-1]['saved_mb']:.0f} MB, peak RSS forward/backward/optimizer "
              f"{sampler.peaks[f'step{i}.forward']:.0f}/{sampler.peaks[f'step{i}.backward']:.0f}/"
              f"{sampler.peaks[f'step{i}.optimizer']:.0f} MB", flush=True)
    sampler.stop()
    adam = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    lora_bytes = sum(p.numel() * p.element_size() for p in lora)
    rec.update({
        "weights_mb": {k: v / MB for k, v in frozen.items()},
        "lora_mb": lora_bytes / MB, "lora_grad_mb": lora_bytes / MB, "adam_state_mb": adam / MB,
        "steps": steps, "phase_peaks_mb": dict(sampler.peaks), "vm_hwm_mb": proc_status()["VmHWM"],
        "rss_mb": {**rec["rss_mb"], "end": proc_status()},
    })
    if args.json:
        Path(args.json).write_text(json.dumps(rec, indent=1))
    print(f"\nweights {sum(rec['weights_mb'].values()):.0f} MB {rec['weights_mb']}; LoRA {rec['lora_mb']:.0f} MB "
          f"+ gradients {rec['lora_grad_mb']:.0f} MB + AdamW state {rec['adam_state_mb']:.0f} MB")
    for phase in ("imported", "loaded", "lora", "data"):
        r = rec["rss_mb"][phase]
        print(f"RSS after {phase:8s} {r['VmRSS']:7.0f} MB (anon {r['RssAnon']:.0f}, file {r['RssFile']:.0f})")
    print(f"VmHWM {rec['vm_hwm_mb']:.0f} MB")
    big = max(steps, key=lambda s: s["tokens"], default=None)
    if big is None:  # --steps 0: loading only
        return 0
    print(f"\nsaved for backward, step of {big['tokens']} tokens: {big['saved_mb']:.0f} MB "
          f"{ {k: round(v) for k, v in big['saved_by_dtype_mb'].items()} }")
    for k, v in list(big["saved_by_module_mb"].items())[:24]:
        print(f"  {v:9.1f} MB  {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
