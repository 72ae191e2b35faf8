#!/usr/bin/env python
"""llmcal against lm-evaluation-harness: same model, same questions, same machine, one command.

    python bench/bench_eval.py                  # smollm2-135m-instruct, 200 MMLU questions, 3 rounds
    python bench/bench_eval.py --rounds 5 --label "after X"

What it does (bench/README.md has the details):
1. writes the model once as a local float32 Hugging Face directory (both tools load it),
   and the questions as a JSONL file plus an lm-eval task YAML (the zero-shot MMLU
   format, byte for byte the same prompt as llmcal's ``plain`` template);
2. measures this machine's matmul peak (torch.matmul, float32 and bfloat16);
3. runs, as separate processes and alternating the order every round, ``lm-eval run``
   (hf model, float32, --log_samples) and ``llmcal eval`` (float32, and bfloat16);
   before each run it waits until the machine is quiet, and it records how much CPU
   other processes took during the run;
4. checks agreement: same predicted option on every question, option probabilities
   within 1e-4 (lm-eval's per-option log-likelihoods, softmaxed over the options),
   the prompts lm-eval logged equal llmcal's byte for byte; bfloat16 against float32:
   agreement and calibration metrics;
5. prints the table (Markdown) and the targets, and saves everything to
   bench/results/<time>-<label>.json.

With ``--num-fewshot 5`` the same comparison runs on lm-eval's 5-shot MMLU prompt: the
questions come from llmcal's ``test`` split of ``--fewshot-subjects`` subjects (a seeded
choice), each subject's examples are the ones ``llmcal eval --num-fewshot`` picks from the
``train`` split, and lm-eval gets one task per subject whose few-shot split holds exactly those
examples in that order (``sampler: first_n``), so lm-eval renders the few-shot context itself
and the script checks it against llmcal's prompt byte for byte.

    python bench/bench_eval.py --num-fewshot 5 --n 120 --rounds 2 --no-bf16

Exit status 0 when the agreement checks pass (targets are reported, not enforced), 1 otherwise.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "_runner.py"
TASK = "llmcal_bench_mmlu"

# lm-eval's zero-shot MMLU task (tasks/mmlu/default/_default_template_yaml), with the
# per-subject description templated on the document's subject and a local data file.
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
description: "The following are multiple choice questions (with answers) about {{{{subject}}}}.\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

# The few-shot variant: lm-eval's MMLU task (tasks/mmlu/default) with its own description and a
# few-shot split that holds exactly llmcal's examples for the subject, in llmcal's order.
FEWSHOT_TASK = "llmcal_bench_fs"
FEWSHOT_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
    train: {shots}
test_split: test
fewshot_split: train
fewshot_config:
  sampler: first_n
num_fewshot: {n}
output_type: multiple_choice
description: {description}
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

PROB_TOL = 1e-4  # float32: |p_llmcal - p_lmeval| per option
BF16_AGREE = 0.99
BF16_METRIC_TOL = 0.005
BF16_METRICS = ("accuracy", "conf_ece", "cw_ece", "brier", "mean_conf")
RSS_LIMIT_MB = 1.5 * 1024
TARGETS = {"fp32_speedup": 1.3, "bf16_speedup": 2.0, "peak_fraction": 0.60, "fewshot_speedup": 3.0}


# ---- machine -----------------------------------------------------------------------------------
def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4]  # all but idle and iowait


HZ = os.sysconf("SC_CLK_TCK")


def wait_quiet(threshold: float, max_wait: float, window: float = 1.0, need: int = 3) -> dict:
    """Wait until other processes use less than ``threshold`` cores for ``need`` windows in a row."""
    t0 = time.perf_counter()
    ok, last = 0, None
    while True:
        b0 = _busy_jiffies()
        time.sleep(window)
        last = (_busy_jiffies() - b0) / HZ / window
        ok = ok + 1 if last < threshold else 0
        waited = time.perf_counter() - t0
        if ok >= need:
            return {"waited_s": round(waited, 1), "quiet": True, "busy_cores": round(last, 2)}
        if waited > max_wait:
            return {"waited_s": round(waited, 1), "quiet": False, "busy_cores": round(last, 2)}


def machine_info() -> dict:
    import torch

    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        flags = []
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": _version("transformers"), "lm_eval": _version("lm_eval"),
            "llmcal": _version("llmcal"), "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                                          / 2**30, 1)}


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg.replace("_", "-"))
    except PackageNotFoundError:
        return "not installed"


def matmul_peak(reps: int = 10) -> dict:
    """Best torch.matmul GFLOP/s over a few shapes, float32 and bfloat16, default threads."""
    import torch

    shapes = [(1024, 1024, 1024), (2048, 2048, 2048), (2048, 576, 1536), (2048, 1536, 576)]
    out: dict = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        per_shape = {}
        for m, k, n in shapes:
            a = torch.randn(m, k).to(dtype)
            b = torch.randn(k, n).to(dtype)
            for _ in range(3):
                torch.matmul(a, b)
            best = float("inf")
            for _ in range(reps):
                t = time.perf_counter()
                torch.matmul(a, b)
                best = min(best, time.perf_counter() - t)
            per_shape[f"{m}x{k}x{n}"] = round(2 * m * k * n / best / 1e9, 1)
        out[name] = {"gflops": max(per_shape.values()), "shapes": per_shape}
    return out


# ---- model and questions -----------------------------------------------------------------------
def _doc(q) -> dict:
    return {"id": q.id, "subject": q.subject, "question": q.question, "choices": list(q.choices), "answer": q.answer}


def _write_jsonl(path: Path, questions) -> None:
    path.write_text("".join(json.dumps(_doc(q)) + "\n" for q in questions), encoding="utf-8")


def fewshot_subjects(data: str, k: int, n: int, seed: int) -> list[str]:
    """``k`` subjects of ``data``'s test split with at least n/k questions each, the first by a seeded hash."""
    from llmcal.data import hash_unit, load_dataset

    counts: dict[str, int] = {}
    for q in load_dataset(data, split="test", seed=seed).questions:
        counts[q.subject or ""] = counts.get(q.subject or "", 0) + 1
    big = [s for s, c in counts.items() if s and c >= -(-n // k)]
    return sorted(sorted(big, key=lambda s: hash_unit(s, f"bench-subjects:{seed}"))[:k])


def fewshot_questions(args) -> tuple[list, dict, list[str]]:
    """(test-split questions, their examples, subjects): what ``llmcal eval --num-fewshot`` scores."""
    from llmcal.data import load_dataset
    from llmcal.data.fewshot import choose_shots

    subjects = fewshot_subjects(args.data, args.fewshot_subjects, args.n, args.seed)
    qs = list(load_dataset(args.data, split="test", subjects=subjects, limit=args.n, seed=args.seed).questions)
    pool = load_dataset(args.data, split="train", subjects=subjects, seed=args.seed).questions
    return qs, choose_shots(qs, pool, args.num_fewshot, args.seed), subjects


def prepare(args) -> dict:
    """The float32 HF directory, the questions, the lm-eval task(s), per-question tokens and FLOPs."""
    from transformers import AutoConfig, AutoTokenizer

    from llmcal.data import load_dataset
    from llmcal.models import resolve_model, weights_dir
    from llmcal.prompts import encode_questions

    model_dir = Path(weights_dir(resolve_model(args.model), "float32"))  # lm-eval is compared in float32
    shots, subjects = {}, []
    if args.num_fewshot:
        questions, shots, subjects = fewshot_questions(args)
    else:
        questions = list(load_dataset(args.data, limit=args.n, seed=args.seed).questions)
    if any(q.k != 4 for q in questions):
        raise SystemExit("the lm-eval task here is the 4-option MMLU format; use a 4-option dataset")
    work = Path(args.work)
    (work / "tasks").mkdir(parents=True, exist_ok=True)
    for old in (work / "tasks").glob("*.yaml"):  # only this run's tasks on the include path
        old.unlink()
    tasks = []
    if not args.num_fewshot:
        data = work / f"{args.data}-{args.n}-seed{args.seed}.jsonl"
        _write_jsonl(data, questions)
        (work / "tasks" / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data.resolve()))
        tasks = [TASK]
    else:
        data = work / f"{args.data}-{args.n}-seed{args.seed}-{args.num_fewshot}shot"
        data.mkdir(exist_ok=True)
        for subject in subjects:
            slug = "".join(c if c.isalnum() else "_" for c in subject)
            task = f"{FEWSHOT_TASK}_{slug}"
            mine = [q for q in questions if q.subject == subject]
            examples = {shots[q.id] for q in mine}
            if len(examples) != 1:
                raise SystemExit(f"{subject}: the questions do not share one set of examples")
            _write_jsonl(data / f"{slug}.test.jsonl", mine)
            _write_jsonl(data / f"{slug}.shots.jsonl", next(iter(examples)))
            description = json.dumps(f"The following are multiple choice questions (with answers) about {subject}.\n\n")
            (work / "tasks" / f"{task}.yaml").write_text(FEWSHOT_YAML.format(
                task=task, data=(data / f"{slug}.test.jsonl").resolve(), shots=(data / f"{slug}.shots.jsonl").resolve(),
                n=args.num_fewshot, description=description))
            tasks.append(task)
    tok = AutoTokenizer.from_pretrained(model_dir)
    encoded = encode_questions(questions, tok, "plain", shots)
    lengths = [len(e.input_ids) for e in encoded]
    config = AutoConfig.from_pretrained(model_dir)
    flops, per_token = model_flops(model_dir, config, lengths, prefixes=_prefix_groups(encoded))
    return {"model_dir": str(model_dir), "questions": questions, "lengths": lengths, "flops": flops,
            "flops_per_token_linear": per_token, "work": work, "data": str(data), "tasks": tasks,
            "shots": shots, "subjects": subjects,
            "prefix_tokens": sum(p for p, _ in _prefix_groups(encoded))}


def _prefix_groups(encoded) -> list[tuple[int, list[int]]]:
    """(shared prefix length, suffix lengths of its questions) per group of questions with one prefix."""
    groups: dict[tuple, list] = {}
    for e in encoded:
        groups.setdefault(tuple(e.input_ids[: e.prefix_len]), []).append(len(e.input_ids) - e.prefix_len)
    return [(len(k), v) for k, v in groups.items()]


def model_flops(model_dir: Path, config, lengths: list[int], prefixes=None) -> tuple[float, float]:
    """Matmul FLOPs to score the questions: 2 x (linear-layer parameters) per token, plus causal
    attention scores and values (2 x 2 x heads x head_dim per query-key pair), plus the K letter rows
    of the output layer at the answer position.  Counted once per real token (padding is not work).

    ``prefixes``: (prefix length, suffix lengths) per group of questions sharing their first tokens
    (few-shot): the prefix is work once per group, and each suffix token attends to the prefix too."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    decoder = model.get_decoder()
    linear = sum(m.weight.numel() for m in decoder.modules() if isinstance(m, torch.nn.Linear))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    layers = text.num_hidden_layers
    attn = layers * 2 * 2 * heads * head_dim  # QK^T and AV per query-key pair
    total = 0.0
    for p, suffixes in (prefixes if prefixes and any(p for p, _ in prefixes) else [(0, lengths)]):
        total += 2.0 * linear * p + attn * p * (p + 1) / 2  # the shared prefix, once
        for n in suffixes:
            total += 2.0 * linear * n  # q, k, v, o, gate, up, down
            total += attn * (n * p + n * (n + 1) / 2)  # causal, over the prefix and the question
            total += 2 * text.hidden_size * 4  # the 4 letter rows at the answer position
    return total, 2.0 * linear


# ---- runs --------------------------------------------------------------------------------------
VARIANTS: dict[str, dict] = {}  # --variant NAME=SRC[@BATCH_TOKENS][:DTYPE]


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME=SRC[@BATCH_TOKENS][:DTYPE]``: llmcal from source tree SRC ("." = this checkout)."""
    if "=" not in text:
        raise SystemExit(f"--variant {text!r}: expected NAME=SRC[@BATCH_TOKENS][:DTYPE]")
    name, rest = text.split("=", 1)
    dtype = "float32"
    if ":" in rest:
        rest, dtype = rest.rsplit(":", 1)
    bt = None
    if "@" in rest:
        rest, bt_text = rest.rsplit("@", 1)
        bt = int(bt_text)
    src = None if rest in ("", ".") else str(Path(rest).resolve())
    if src and not (Path(src) / "llmcal" / "__init__.py").exists():
        raise SystemExit(f"--variant {text!r}: {src} holds no llmcal package")
    return name, {"src": src, "batch_tokens": bt, "dtype": dtype}


def run_tool(kind: str, rnd: int, prep: dict, args, limit: int | None = None) -> dict:
    """One timed process: ``llmcal`` (float32), ``llmcal-bf16`` or ``lmeval``; ``limit``: warm-up only."""
    work: Path = prep["work"]
    slug = kind.replace(":", "-")
    out = work / "runs" / f"{slug}-{rnd}"
    timing = work / "runs" / f"{slug}-{rnd}.timing.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    src = args.llmcal_src
    if kind.startswith("llmcal") or kind.startswith("variant:"):
        from llmcal.scoring import DEFAULT_BATCH_TOKENS

        dtype = "bfloat16" if kind.endswith("bf16") else "float32"
        bt = args.batch_tokens or DEFAULT_BATCH_TOKENS
        if kind.startswith("variant:"):
            v = VARIANTS[kind.split(":", 1)[1]]
            src, dtype, bt = v["src"], v["dtype"], v["batch_tokens"] or bt
        argv = ["eval", "--model", prep["model_dir"], "--data", args.data, "--limit", str(limit or args.n),
                "--seed", str(args.seed) if limit is None else "1", "--template", "plain", "--dtype", dtype,
                "--device", "cpu", "--batch-tokens", str(bt), "--out", str(out), "--overwrite"]
        if args.num_fewshot:  # the questions and examples of fewshot_questions()
            argv += ["--split", "test", "--num-fewshot", str(args.num_fewshot), "--seed", str(args.seed)]
            argv += [a for subject in prep["subjects"] for a in ("--subject", subject)]
        tool = "llmcal"
    else:
        dtype = "float32"
        tasks = prep["tasks"] if limit is None else prep["tasks"][:2]
        argv = ["run", "--model", "hf", "--model_args", f"pretrained={prep['model_dir']},dtype=float32",
                "--tasks", ",".join(tasks), "--include_path", str(work / "tasks"),
                "--batch_size", str(args.lmeval_batch_size),
                "--device", "cpu", "--log_samples", "--output_path", str(out)]
        if limit is not None:
            argv += ["--limit", str(limit)]
        tool = "lmeval"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "LLMCAL_PROGRESS": "0", "TRANSFORMERS_VERBOSITY": "error", "LLMCAL_SCORE_CACHE": "0"}
    if args.threads:  # both tools read it at start-up (torch's intra-op threads)
        env["OMP_NUM_THREADS"] = str(args.threads)
    if src and tool == "llmcal":
        env["PYTHONPATH"] = os.pathsep.join([str(Path(src).resolve()), env.get("PYTHONPATH", "")])
    quiet = (wait_quiet(args.quiet_cores, args.max_wait) if args.quiet_cores > 0 and limit is None
             else {"quiet": None})
    b0 = _busy_jiffies()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(RUNNER), tool, str(timing), "--", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(work))
    log_lines = proc.stdout.read().decode("utf-8", "replace")
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    busy = (_busy_jiffies() - b0) / HZ
    own_cpu = usage.ru_utime + usage.ru_stime
    code = os.waitstatus_to_exitcode(status)
    (work / "runs" / f"{slug}-{rnd}.log").write_text(log_lines)
    if code != 0:
        raise SystemExit(f"{kind} run {rnd} failed (exit {code}); log: {work / 'runs' / f'{slug}-{rnd}.log'}\n"
                         + log_lines[-3000:])
    t = json.loads(timing.read_text())
    rec = {"kind": kind, "round": rnd, "dtype": dtype, "wall_s": wall, "eval_s": t["eval_s"],
           "load_s": t["load_s"], "imports_s": t["imports_s"], "threads": t["threads"],
           "llmcal_file": t.get("llmcal_file"),
           "rss_mb": usage.ru_maxrss / 1024, "cpu_s": own_cpu, "sys_s": usage.ru_stime,
           "minor_faults": usage.ru_minflt, "other_cores": max(0.0, (busy - own_cpu) / wall),
           "quiet_before": quiet, "out": str(out)}
    print(f"  {kind:16s} round {rnd}: wall {wall:6.1f}s  eval {t['eval_s']:6.1f}s  load {t['load_s']:4.1f}s  "
          f"rss {rec['rss_mb']:6.0f} MB  sys {usage.ru_stime:4.1f}s  other processes {rec['other_cores']:.2f} cores",
          flush=True)
    return rec


def read_llmcal(out: str) -> dict:
    from llmcal.predictions import load_predictions

    preds = load_predictions(Path(out) / "predictions.jsonl")
    metrics = json.loads((Path(out) / "metrics.json").read_text())["results"][0]["metrics"]
    return {"preds": {p.id: p for p in preds}, "metrics": metrics}


def read_lmeval(out: str) -> dict:
    """Per question: lm-eval's option log-likelihoods, contexts and continuations (its latest samples files)."""
    latest: dict[str, Path] = {}
    for f in sorted(Path(out).rglob("samples_*.jsonl")):  # samples_<task>_<time>.jsonl; the time sorts
        latest[f.name.rsplit("_", 1)[0]] = f
    if not latest:
        raise SystemExit(f"{out}: lm-eval wrote no samples file (was --log_samples passed?)")
    recs = {}
    for line in (x for f in latest.values() for x in f.read_text(encoding="utf-8").splitlines()):
        s = json.loads(line)
        ll = np.array([float(r[0]) for r in s["filtered_resps"]], dtype=np.float64)
        args = [s["arguments"][f"gen_args_{j}"] for j in range(len(ll))]
        recs[s["doc"]["id"]] = {"loglik": ll, "contexts": [a["arg_0"] for a in args],
                                "continuations": [a["arg_1"] for a in args]}
    return recs


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


# ---- checks ------------------------------------------------------------------------------------
def check_vs_lmeval(questions, ours: dict, theirs: dict, shots: dict | None = None) -> dict:
    from llmcal.prompts import plain_prompt

    shots = shots or {}
    missing = [q.id for q in questions if q.id not in theirs or q.id not in ours["preds"]]
    if missing:
        return {"ok": False, "error": f"{len(missing)} questions missing (first {missing[0]})"}
    diffs, disagree, prompt_mismatch = [], [], []
    for q in questions:
        p = ours["preds"][q.id]
        t = theirs[q.id]
        pt = softmax(t["loglik"])
        diffs.append(float(np.abs(np.asarray(p.probs) - pt).max()))
        if int(np.argmax(pt)) != p.pred:
            disagree.append(q.id)
        want = plain_prompt(q, shots.get(q.id, ()))
        if any(c != want for c in t["contexts"]) or t["continuations"] != [" A", " B", " C", " D"]:
            prompt_mismatch.append(q.id)
    worst = int(np.argmax(diffs))
    return {"ok": not disagree and max(diffs) < PROB_TOL and not prompt_mismatch,
            "n": len(questions), "same_prediction": len(questions) - len(disagree), "disagree": disagree,
            "max_prob_diff": max(diffs), "median_prob_diff": float(np.median(diffs)),
            "worst_question": questions[worst].id, "prompt_mismatch": prompt_mismatch}


def check_bf16(questions, fp32: dict, bf16: dict) -> dict:
    agree = sum(fp32["preds"][q.id].pred == bf16["preds"][q.id].pred for q in questions) / len(questions)
    deltas = {k: abs(fp32["metrics"][k] - bf16["metrics"][k]) for k in BF16_METRICS}
    also = {k: abs(fp32["metrics"][k] - bf16["metrics"][k]) for k in ("nll", "mce", "em_ece")
            if k in fp32["metrics"] and k in bf16["metrics"]}
    maxp = max(float(np.abs(np.subtract(fp32["preds"][q.id].probs, bf16["preds"][q.id].probs)).max())
               for q in questions)
    return {"ok": agree >= BF16_AGREE and max(deltas.values()) <= BF16_METRIC_TOL, "agreement": agree,
            "metric_deltas": deltas, "other_metric_deltas": also, "max_prob_diff": maxp}


def identical_across_rounds(kind: str, runs: list[dict], reader) -> bool:
    outs = [reader(r["out"]) for r in runs if r["kind"] == kind]
    if kind != "lmeval":
        first = {k: p.logits for k, p in outs[0]["preds"].items()}
        return all({k: p.logits for k, p in o["preds"].items()} == first for o in outs[1:])
    first = {k: v["loglik"].tolist() for k, v in outs[0].items()}
    return all({k: v["loglik"].tolist() for k, v in o.items()} == first for o in outs[1:])


# ---- summary -----------------------------------------------------------------------------------
def summarise(runs: list[dict], prep: dict, peak: dict) -> dict:
    n, tokens, flops = len(prep["questions"]), sum(prep["lengths"]), prep["flops"]
    rows = {}
    kinds = ["lmeval", "llmcal", "llmcal-bf16"] + sorted({r["kind"] for r in runs if r["kind"].startswith("variant:")})
    for kind in kinds:
        rs = [r for r in runs if r["kind"] == kind]
        if not rs:
            continue
        med = {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "eval_s", "load_s", "rss_mb")}
        pk = peak[rs[0]["dtype"]]["gflops"]
        gflops = flops / med["eval_s"] / 1e9
        rows[kind] = {**med, "dtype": rs[0]["dtype"], "rounds": len(rs), "q_per_s": n / med["eval_s"],
                      "tok_per_s": tokens / med["eval_s"], "gflops": gflops, "peak_gflops": pk,
                      "peak_fraction": gflops / pk, "rss_max_mb": max(r["rss_mb"] for r in rs),
                      "eval_s_all": [round(r["eval_s"], 2) for r in rs],
                      "other_cores_max": max(r["other_cores"] for r in rs)}
    base = rows.get("lmeval")
    for kind, row in rows.items():
        if base is None:
            continue
        row["speedup_eval"] = base["eval_s"] / row["eval_s"]
        row["speedup_wall"] = base["wall_s"] / row["wall_s"]
        # paired: each round's lm-eval run against the same round's run of this kind
        paired = []
        for r in (x for x in runs if x["kind"] == kind):
            b = next((x for x in runs if x["kind"] == "lmeval" and x["round"] == r["round"]), None)
            if b:
                paired.append(b["eval_s"] / r["eval_s"])
        row["speedup_eval_paired"] = statistics.median(paired) if paired else None
    return rows


def table(rows: dict) -> str:
    names = {"lmeval": "lm-eval (hf)", "llmcal": "llmcal", "llmcal-bf16": "llmcal"}
    head = ("| run | dtype | wall s (with load) | eval s (no load) | load s | questions/s | tokens/s | "
            "GFLOP/s | % of matmul peak | peak RSS MB | llmcal/lm-eval (eval) | llmcal/lm-eval (wall) |")
    lines = [head, "|" + "|".join(["---"] * 12) + "|"]
    for kind, r in rows.items():
        name = names.get(kind) or kind.split(":", 1)[1]
        sp = f"{r['speedup_eval']:.2f}x (paired {r['speedup_eval_paired']:.2f}x)" if "speedup_eval" in r else ""
        sw = f"{r['speedup_wall']:.2f}x" if "speedup_wall" in r else ""
        lines.append(f"| {name} | {r['dtype']} | {r['wall_s']:.1f} | {r['eval_s']:.1f} | {r['load_s']:.1f} | "
                     f"{r['q_per_s']:.2f} | {r['tok_per_s']:.0f} | {r['gflops']:.1f} | "
                     f"{100 * r['peak_fraction']:.0f}% of {r['peak_gflops']:.0f} | {r['rss_max_mb']:.0f} | "
                     f"{sp} | {sw} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default="mmlu")
    ap.add_argument("--n", type=int, default=200, help="questions (a fixed, seeded subset)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-fewshot", type=int, default=0,
                    help="lm-eval's N-shot MMLU prompt (test-split questions, train-split examples); 0: zero-shot")
    ap.add_argument("--fewshot-subjects", type=int, default=4,
                    help="with --num-fewshot: the questions come from this many subjects (a seeded choice)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (each runs every tool once)")
    ap.add_argument("--lmeval-batch-size", type=int, default=8)
    ap.add_argument("--batch-tokens", type=int, default=None, help="llmcal's budget (default: the library's)")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 llmcal runs")
    ap.add_argument("--quiet-cores", type=float, default=0.25,
                    help="before each run, wait until other processes use fewer cores than this (0: do not wait)")
    ap.add_argument("--max-wait", type=float, default=600, help="seconds to wait for a quiet machine per run")
    ap.add_argument("--retries", type=int, default=3,
                    help="run again (up to this many times) when other processes took more than --quiet-cores "
                         "during a run; such runs are kept in the result file but not in the table")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of every run and of the matmul peak (default: torch's, one per core); on a "
                         "shared machine 1 is the honest measurement (bench/README.md)")
    ap.add_argument("--label", default="", help="what changed (goes into the result file)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=SRC[@BATCH_TOKENS][:DTYPE]",
                    help="also run this llmcal variant (float32 unless :bfloat16) in every round: from source "
                         "tree SRC ('.' = this checkout), with its own --batch-tokens; repeatable")
    ap.add_argument("--llmcal-src", default=None,
                    help="run llmcal from this source tree (a directory holding the llmcal package), to "
                         "measure another version of the engine against the same lm-eval runs")
    ap.add_argument("--work", default=str(HERE / "work"))
    ap.add_argument("--results", default=str(HERE / "results"))
    args = ap.parse_args()

    if _version("lm_eval") == "not installed":
        raise SystemExit("lm-evaluation-harness is not installed: pip install -e '.[bench]' "
                         "(check first with --dry-run that it keeps your torch)")
    started = dt.datetime.now(dt.timezone.utc)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(f"preparing {args.model} and {args.n} {args.data} questions (seed {args.seed})", flush=True)
    prep = prepare(args)
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads)")
    print(f"{len(prep['questions'])} questions, {sum(prep['lengths'])} prompt tokens, "
          f"{prep['flops'] / 1e12:.2f} TFLOP to score")
    if args.num_fewshot:
        print(f"{args.num_fewshot}-shot, subjects {', '.join(prep['subjects'])}: {prep['prefix_tokens']} tokens of "
              f"shared prefixes, {sum(prep['lengths']) / len(prep['lengths']):.0f} tokens per prompt")
    print("warm-up (untimed: page cache, datasets cache)", flush=True)
    run_tool("llmcal", -1, prep, args, limit=4)
    run_tool("lmeval", -1, prep, args, limit=4)

    for text in args.variant:
        name, spec = parse_variant(text)
        VARIANTS[name] = spec
    kinds = ["llmcal", "lmeval"] + ([] if args.no_bf16 else ["llmcal-bf16"]) + [f"variant:{n}" for n in VARIANTS]
    wq = wait_quiet(args.quiet_cores, args.max_wait) if args.quiet_cores > 0 else {}
    peaks = [matmul_peak()]
    print(f"matmul peak: float32 {peaks[0]['float32']['gflops']} GFLOP/s, "
          f"bfloat16 {peaks[0]['bfloat16']['gflops']} GFLOP/s ({wq})", flush=True)
    runs, rejected = [], []
    for rnd in range(args.rounds):
        order = kinds if rnd % 2 == 0 else kinds[::-1]  # every run swaps its neighbours every round
        print(f"round {rnd + 1}/{args.rounds}: {', '.join(order)}", flush=True)
        for kind in order:
            for attempt in range(args.retries + 1):
                rec = run_tool(kind, rnd, prep, args)
                if args.quiet_cores <= 0 or rec["other_cores"] <= args.quiet_cores or attempt == args.retries:
                    rec["contended"] = args.quiet_cores > 0 and rec["other_cores"] > args.quiet_cores
                    runs.append(rec)
                    break
                print(f"    other processes took {rec['other_cores']:.2f} cores: run again", flush=True)
                rejected.append(rec)
    (prep["work"] / "last-runs.json").write_text(json.dumps({"runs": runs, "rejected": rejected}, indent=1))
    if args.quiet_cores > 0:
        wait_quiet(args.quiet_cores, args.max_wait)
    peaks.append(matmul_peak())
    peak = {d: max(peaks, key=lambda p: p[d]["gflops"])[d] for d in ("float32", "bfloat16")}
    print(f"matmul peak (best of start and end): float32 {peak['float32']['gflops']} GFLOP/s, "
          f"bfloat16 {peak['bfloat16']['gflops']} GFLOP/s")

    questions = prep["questions"]
    last = {k: next(r for r in reversed(runs) if r["kind"] == k) for k in kinds}
    fp32 = read_llmcal(last["llmcal"]["out"])
    shots = prep["shots"]
    checks = {"vs_lmeval": check_vs_lmeval(questions, fp32, read_lmeval(last["lmeval"]["out"]), shots),
              "deterministic": {k: identical_across_rounds(k, runs, read_lmeval if k == "lmeval" else read_llmcal)
                                for k in kinds}}
    lm_last = read_lmeval(last["lmeval"]["out"])
    for k in kinds:
        if k.startswith("variant:"):
            c = check_vs_lmeval(questions, read_llmcal(last[k]["out"]), lm_last, shots)
            checks.setdefault("variants_vs_lmeval", {})[k] = {
                key: c.get(key) for key in ("same_prediction", "max_prob_diff", "ok")}
    if "llmcal-bf16" in last:
        checks["bf16"] = check_bf16(questions, fp32, read_llmcal(last["llmcal-bf16"]["out"]))
    rows = summarise(runs, prep, peak)

    print("\n" + table(rows) + "\n")
    v = checks["vs_lmeval"]
    print(f"agreement llmcal float32 vs lm-eval: same option on {v['same_prediction']}/{v['n']} questions, "
          f"max |dp| {v['max_prob_diff']:.2e} (median {v['median_prob_diff']:.1e}; tolerance {PROB_TOL:g}), "
          f"prompts identical: {not v['prompt_mismatch']}")
    if "bf16" in checks:
        b = checks["bf16"]
        print(f"bfloat16 vs float32 (llmcal): agreement {100 * b['agreement']:.1f}%, max |dp| "
              f"{b['max_prob_diff']:.3f}, metric deltas "
              + ", ".join(f"{k} {d:.4f}" for k, d in b["metric_deltas"].items()))
    print("same numbers in every round: " + ", ".join(f"{k} {v}" for k, v in checks["deterministic"].items()))
    contended = [f"{r['kind']}#{r['round']} ({r['other_cores']:.2f})" for r in runs if r.get("contended")]
    print(f"runs in the table that shared the CPU with other processes (> {args.quiet_cores} cores): "
          + (", ".join(contended) or "none") + f"; {len(rejected)} contended run(s) repeated")

    targets = {}
    if args.num_fewshot and "llmcal" in rows and "lmeval" in rows:
        targets[f"{args.num_fewshot}-shot float32 >= 3x lm-eval, identical predictions"] = (
            rows["llmcal"]["speedup_eval"] >= TARGETS["fewshot_speedup"] and not v["disagree"])
    elif "llmcal" in rows and "lmeval" in rows:
        targets["float32 >= 1.3x lm-eval, identical predictions"] = (
            rows["llmcal"]["speedup_eval"] >= TARGETS["fp32_speedup"] and not v["disagree"])
    if "llmcal-bf16" in rows and "lmeval" in rows:
        targets["bfloat16 >= 2x lm-eval float32, >= 99% agreement, metrics within 0.005"] = (
            rows["llmcal-bf16"]["speedup_eval"] >= TARGETS["bf16_speedup"] and checks["bf16"]["ok"])
    for kind in ("llmcal", "llmcal-bf16"):
        if kind in rows:
            targets[f"{kind}: matmul throughput >= 60% of the {rows[kind]['dtype']} peak"] = (
                rows[kind]["peak_fraction"] >= TARGETS["peak_fraction"])
    llm_rss = max((r["rss_mb"] for r in runs if r["kind"] != "lmeval"), default=0)
    targets["llmcal peak RSS < 1.5 GB"] = llm_rss < RSS_LIMIT_MB
    print("\ntargets:")
    for k, ok in targets.items():
        print(f"  [{'met' if ok else 'NOT met'}] {k}")

    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in args.label.lower()).strip("-")[:40] or "run"
    path = results / f"{started.strftime('%Y%m%dT%H%M%S')}-{slug}.json"
    doc = {"label": args.label, "started": started.isoformat(timespec="seconds"), "args": vars(args),
           "machine": info, "model_dir": prep["model_dir"], "n_questions": len(questions),
           "prompt_tokens": sum(prep["lengths"]), "flops": prep["flops"],
           "num_fewshot": args.num_fewshot, "subjects": prep["subjects"], "prefix_tokens": prep["prefix_tokens"],
           "flops_per_token_linear": prep["flops_per_token_linear"], "matmul_peak": peak, "matmul_peaks": peaks,
           "summary": rows, "checks": checks, "targets": targets, "runs": runs, "rejected_runs": rejected,
           "table": table(rows)}
    from llmcal.runs import portable  # no absolute path of this machine in a committed result
    text = json.dumps(portable(json.loads(json.dumps(doc, default=str)), results), indent=2) + "\n"
    path.write_text(text.replace('"../work/', '"<bench-work>/'))  # bench/work, named like the other roots
    print(f"\nsaved {path}")
    ok = checks["vs_lmeval"]["ok"] and checks.get("bf16", {"ok": True})["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
