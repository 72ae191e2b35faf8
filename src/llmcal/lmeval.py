"""Calibration from lm-evaluation-harness runs: ``lm_eval --log_samples`` outputs as llmcal predictions.

lm-eval scores a multiple-choice document by the log-likelihood of each
option's continuation given the prompt, and logs per document (one line of
``samples_<task>_<date>.jsonl``) the requests (``arguments``: context and
continuation per option), the responses (``filtered_resps``: ``[loglik,
is_greedy]`` per option), the gold (``target``) and its per-document metrics.
This module turns those lines into :class:`~llmcal.predictions.Prediction`
records, so every metric, diagram, calibrator and report of llmcal applies to
a run made with lm-eval, without running the model again::

    data = read_lm_eval("out/", norm="none")                    # a folder of one lm_eval run, or one file
    record = run_from_lm_eval("out/", "runs/from-lmeval")       # the usual run directory

The option "logits" are, per ``norm`` (docs/reference.md, "Calibration from
lm-evaluation-harness runs"):

- ``none``: the log-likelihoods ``l_k``; softmax over them, argmax = lm-eval's ``acc``;
- ``acc_norm``: ``l_k / len(choice_k)`` in characters, lm-eval's ``acc_norm``
  (``lm_eval/api/task.py``: ``lls / completion_len``, ``completion_len`` the
  ``len()`` of each ``doc_to_choice`` string, without the target delimiter);
- ``acc_bytes``: ``l_k / len(choice_k.encode("utf-8"))``, lm-eval's ``acc_bytes``.

Ids are ``<task>/<doc_id>``; the subject is the document's ``subject`` field
when it has one, otherwise the task name (``mmlu_anatomy`` -> ``anatomy``).
"""
from __future__ import annotations

import ast
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
import typing
from typing import Any, Literal, Sequence

import numpy as np

from .errors import LlmcalError
from .predictions import Prediction
from .validation import PositiveInt, validated

log = logging.getLogger(__name__)

Norm = Literal["none", "acc_norm", "acc_bytes"]
NORMS = typing.get_args(Norm)
# The metric whose per-document argmax each norm reproduces.
NORM_METRIC = {"none": "acc", "acc_norm": "acc_norm", "acc_bytes": "acc_bytes"}
ACC_METRICS = ("acc", "acc_norm", "acc_bytes")
DEFAULT_DELIMITER = " "  # lm-eval's default target_delimiter, used when no results file names the task's
# lm-eval names its files samples_<task>_<date_id>.jsonl and results_<date_id>.json (date_id: 2024-05-01T12-34-56.123456).
SAMPLES_RE = re.compile(r"^samples_(?P<task>.+)_(?P<date>\d{4}-\d{2}-\d{2}T[0-9.\-]+)\.jsonl$")
SUBJECT_PREFIXES = ("mmlu_continuation_", "mmlu_")


class UnsupportedTask(LlmcalError):
    """A samples file of a task llmcal cannot read as multiple choice (generation, single continuation, ...)."""


@dataclass(frozen=True)
class SamplesFile:
    """One ``samples_*.jsonl`` file, its task, and the ``results_*.json`` of the same run when present."""

    path: Path
    task: str
    results: Path | None = None


@dataclass(frozen=True)
class TaskSamples:
    """One task's predictions and lm-eval's own numbers for it.

    ``acc``/``acc_norm``/``acc_bytes``: recomputed from the logged log-likelihoods
    exactly as lm-eval does; ``logged``: the means of the per-document metric
    values the samples carry; ``reported``: the values in the run's results file.
    """

    task: str
    path: Path
    norm: str
    predictions: tuple[Prediction, ...]
    acc: float
    acc_norm: float | None
    acc_bytes: float | None
    logged: dict[str, float] = field(default_factory=dict)
    reported: dict[str, float] = field(default_factory=dict)
    disagreements: int | None = None  # documents where llmcal's correctness differs from the logged metric

    @property
    def accuracy(self) -> float:
        return float(np.mean([p.correct for p in self.predictions]))

    def summary(self) -> dict:
        return {"task": self.task, "file": str(self.path.resolve()), "n": len(self.predictions), "norm": self.norm,
                "llmcal_accuracy": self.accuracy, "acc": self.acc, "acc_norm": self.acc_norm,
                "acc_bytes": self.acc_bytes, "logged": dict(self.logged), "results_json": dict(self.reported),
                "per_sample_disagreements": self.disagreements}


@dataclass(frozen=True)
class LmEvalSamples:
    """Everything read from one lm-eval output: the tasks in order, and tasks left out with the reason."""

    tasks: tuple[TaskSamples, ...]
    skipped: dict[str, str]
    model: str | None

    @property
    def predictions(self) -> list[Prediction]:
        return [p for t in self.tasks for p in t.predictions]


# ---- finding the files -----------------------------------------------------------------------
def task_of(path: Path) -> tuple[str, str | None]:
    """(task, date_id) from lm-eval's file name; a renamed file keeps its stem as the task."""
    m = SAMPLES_RE.match(path.name)
    if m:
        return m["task"], m["date"]
    stem = path.name[:-len(".jsonl")] if path.name.endswith(".jsonl") else path.stem
    return (stem[len("samples_"):] if stem.startswith("samples_") else stem) or stem, None


def _samples_file(path: Path) -> SamplesFile:
    task, date = task_of(path)
    results = path.parent / f"results_{date}.json" if date else None
    return SamplesFile(path, task, results if results is not None and results.is_file() else None)


def _groups(files: Sequence[SamplesFile]) -> dict[str, list[str]]:
    """lm-eval's ``group_subtasks`` (group -> its tasks and subgroups) from the results files present."""
    out: dict[str, list[str]] = {}
    for r in sorted({f.results for f in files if f.results is not None}):
        for g, subs in (_read_results(r).get("group_subtasks") or {}).items():
            out.setdefault(g, []).extend(s for s in subs if s not in out.get(g, []))
    return out


def find_samples(path: str | Path, task: str | Sequence[str] | None = None) -> list[SamplesFile]:
    """The samples files to read: ``path`` itself, or those of the chosen tasks under the folder ``path``.

    A folder is searched recursively (lm-eval writes ``<output>/<model>/samples_<task>_<date>.jsonl``).
    ``task``: a task name, a group name of the run's results file, or several; None: every task.
    Two files of one task (two runs in one folder) are ambiguous: pass the file itself.
    """
    p = Path(path).expanduser()
    wanted = [task] if isinstance(task, str) else list(task) if task is not None else None
    if not p.exists():
        raise LlmcalError(f"{p}: no such file or folder (an lm-eval samples_*.jsonl file or a --log_samples "
                          f"output folder)")
    if p.is_file():
        sf = _samples_file(p)
        if wanted is not None and wanted != [sf.task]:
            raise LlmcalError(f"{p}: holds the samples of task {sf.task!r}, not {', '.join(wanted)}")
        return [sf]
    files = [_samples_file(f) for f in sorted(p.rglob("samples_*.jsonl")) if f.is_file()]
    if not files:
        raise LlmcalError(f"{p}: no samples_*.jsonl file in this folder or below it (was lm_eval run with "
                          f"--log_samples?)")
    by_task: dict[str, list[SamplesFile]] = {}
    for f in files:
        by_task.setdefault(f.task, []).append(f)
    if wanted is None:
        names = sorted(by_task)
    else:
        groups, names = _groups(files), []

        def add(name: str, seen: tuple[str, ...] = ()) -> None:
            if name in by_task:
                if name not in names:
                    names.append(name)
            elif name in groups and name not in seen:
                for sub in groups[name]:
                    add(sub, seen + (name,))
            elif not seen:
                raise LlmcalError(f"{p}: no samples of task {name!r}; the folder has {', '.join(sorted(by_task))}")

        for name in wanted:
            before = len(names)
            add(name)
            if len(names) == before and name not in by_task:
                raise LlmcalError(f"{p}: group {name!r} has no samples files of its tasks in this folder")
    chosen = []
    for name in names:
        if len(by_task[name]) > 1:
            listed = ", ".join(str(f.path.relative_to(p)) for f in by_task[name])
            raise LlmcalError(f"{p}: {len(by_task[name])} samples files for task {name!r} ({listed}): several "
                              f"runs share this folder; pass one of the files, or the folder of one run")
        chosen.append(by_task[name][0])
    return chosen


def _read_results(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlmcalError(f"{path}: not a readable lm-eval results file ({e})") from e
    if not isinstance(doc, dict):
        raise LlmcalError(f"{path}: not an lm-eval results file (a JSON object was expected)")
    return doc


# ---- one document --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Doc:
    doc_id: Any
    subject: str
    answer: int
    lls: np.ndarray  # float64, one per option
    choices: tuple[str, ...]
    filter: str
    logged: dict[str, float]


def task_subject(task: str) -> str:
    """The subject a task name stands for: ``mmlu_anatomy`` -> ``anatomy``; other tasks are their own."""
    for prefix in SUBJECT_PREFIXES:
        if task.startswith(prefix) and len(task) > len(prefix):
            return task[len(prefix):]
    return task


def _requests(rec: dict, where: str) -> list[tuple[Any, Any]]:
    args = rec.get("arguments")
    if isinstance(args, dict):  # lm-eval >= 0.4: {"gen_args_0": {"arg_0": context, "arg_1": continuation}, ...}
        try:
            return [(args[f"gen_args_{i}"].get("arg_0"), args[f"gen_args_{i}"].get("arg_1")) for i in range(len(args))]
        except (KeyError, AttributeError) as e:
            raise LlmcalError(f"{where}: 'arguments' is not lm-eval's gen_args_0..N layout ({e})") from e
    if isinstance(args, list) and all(isinstance(a, (list, tuple)) and len(a) >= 2 for a in args):
        return [(a[0], a[1]) for a in args]  # older lm-eval: [[context, continuation], ...]
    raise LlmcalError(f"{where}: no usable 'arguments' (the requests lm-eval made for this document)")


def _responses(rec: dict, where: str) -> list[Any]:
    resps = rec.get("filtered_resps")
    if resps is None and isinstance(rec.get("resps"), list):  # unfiltered: one list per request
        resps = [r[0] if isinstance(r, list) and len(r) == 1 else r for r in rec["resps"]]
    if not isinstance(resps, list):
        raise LlmcalError(f"{where}: no 'filtered_resps' or 'resps' list (the log-likelihoods lm-eval computed)")
    return resps


def _number(x: Any, where: str, what: str) -> float:
    try:
        v = float(x)  # lm-eval writes the log-likelihoods as strings ("-2.53...")
    except (TypeError, ValueError):
        raise LlmcalError(f"{where}: {what} {x!r} is not a number") from None
    if np.isnan(v) or v == np.inf:
        raise LlmcalError(f"{where}: {what} is {v}")
    return v


def target_kind(cfg: dict, doc: dict) -> str | None:
    """How lm-eval read this task's target (``Task.doc_to_target``): "index", "text", or None when unknown.

    The samples file writes ``str(target)``, so a target "1" is the option index 1
    or the option spelled "1"; the task's config (in the results file) decides, as
    in lm-eval: a document field keeps its JSON type, a template's digits become
    an index.
    """
    dtt = cfg.get("doc_to_target")
    if isinstance(dtt, bool) or dtt is None:
        return None
    if isinstance(dtt, int):
        return "index"
    if isinstance(dtt, str) and dtt in doc:
        v = doc[dtt]
        return "index" if isinstance(v, int) and not isinstance(v, bool) else "text" if isinstance(v, str) else None
    if isinstance(dtt, str) and "{{" in dtt and cfg.get("doc_to_choice") is not None:
        return "index"  # lm-eval: a rendered template that isdigit() is literal_eval'ed to an int
    return None


def _gold(target: Any, choices: Sequence[str], where: str, kind: str | None = None,
          agrees: Any = None) -> int:
    """The gold option index from the logged target: an index, an option's text, or a one-element list.

    ``kind``: :func:`target_kind`; ``agrees(index)``: whether an index agrees with
    the per-document metrics the record carries (decides a digit target of unknown kind).
    """
    if isinstance(target, bool):
        raise LlmcalError(f"{where}: target {target!r} is not an option")
    if isinstance(target, str):
        t = target.strip()
        listed = None
        if re.fullmatch(r"\[.*\]", t, flags=re.S):  # lm-eval writes str(list) for several gold options
            try:
                listed = ast.literal_eval(t)
            except (ValueError, SyntaxError):
                pass  # as lm-eval does: then it is text ("[citation needed]" may be an option)
        if isinstance(listed, list):
            target = listed
        elif t.isdigit() and kind != "text":
            idx = int(t)
            if kind is None and target in choices and choices.index(target) != idx:
                fits = [c for c in (idx, choices.index(target)) if c < len(choices) and agrees is not None
                        and agrees(c)]
                if len(fits) != 1:
                    raise LlmcalError(f"{where}: target {target!r} is ambiguous: option index {idx} or the option "
                                      f"spelled {target!r} (index {choices.index(target)}); lm-eval's results "
                                      f"file beside the samples (its task config) decides it")
                idx = fits[0]
            target = idx
        elif target in choices:
            return choices.index(target)
        else:
            raise LlmcalError(f"{where}: target {target!r} is neither an option index nor one of the options "
                              f"({', '.join(repr(c) for c in choices)})")
    if isinstance(target, list):
        if len(target) != 1:
            raise LlmcalError(f"{where}: target {target!r} names {len(target)} gold options; llmcal needs exactly "
                              f"one per question")
        target = target[0]
    if isinstance(target, int) and not isinstance(target, bool):
        if not 0 <= target < len(choices):
            raise LlmcalError(f"{where}: target {target} is outside the {len(choices)} options (lm-eval scores "
                              f"such a document as wrong whatever the model says)")
        return target
    raise LlmcalError(f"{where}: target {target!r} is not an option index")


def parse_record(rec: Any, where: str, task: str, delimiter: str = DEFAULT_DELIMITER, cfg: dict | None = None) -> _Doc:
    """One line of a samples file as a document (raises for anything but a readable multiple-choice document).

    ``delimiter``: the task's ``target_delimiter`` (stripped from each continuation to give the
    option as ``doc_to_choice`` wrote it); ``cfg``: the task's config from the results file, if any.
    """
    if not isinstance(rec, dict):
        raise LlmcalError(f"{where}: not a JSON object")
    for key in ("doc_id", "target"):
        if key not in rec:
            raise LlmcalError(f"{where}: no {key!r} (not an lm-eval samples record)")
    reqs = _requests(rec, where)
    if any(not isinstance(cont, str) for _, cont in reqs):
        raise UnsupportedTask(f"{where}: task {task!r} is not a multiple-choice task: its requests are "
                              f"generations (generate_until), not per-option log-likelihoods")
    resps = _responses(rec, where)
    if len(resps) != len(reqs):
        raise LlmcalError(f"{where}: {len(resps)} responses for {len(reqs)} requests")
    metrics = rec.get("metrics") or []
    k = len(reqs)
    if "acc_mutual_info" in metrics and k % 2 == 0 and all(ctx == "" for ctx, _ in reqs[k // 2:]):
        k //= 2  # the second half are the unconditional ("", continuation) requests of acc_mutual_info
    if k < 2:
        raise UnsupportedTask(f"{where}: task {task!r} is not a multiple-choice task: one continuation per "
                              f"document (output_type loglikelihood)")
    reqs, resps = reqs[:k], resps[:k]
    conts = [c for _, c in reqs]
    if len(set(conts)) == 1 and len({ctx for ctx, _ in reqs}) > 1:
        raise UnsupportedTask(f"{where}: task {task!r} puts its options in the contexts (multiple_input, as "
                              f"winogrande does): the logged target is not the gold option; llmcal cannot read it")
    lls = []
    for j, r in enumerate(resps):
        if not isinstance(r, (list, tuple)) or len(r) != 2:
            raise UnsupportedTask(f"{where}: task {task!r}: response {j} is {r!r}, not [loglikelihood, is_greedy] "
                                  f"(not a multiple-choice task?)")
        lls.append(_number(r[0], where, f"option {j}'s log-likelihood"))
    if all(v == -np.inf for v in lls):
        raise LlmcalError(f"{where}: every option's log-likelihood is -inf")
    choices = tuple(c[len(delimiter):] if delimiter and c.startswith(delimiter) else c for c in conts)
    doc = rec.get("doc") if isinstance(rec.get("doc"), dict) else {}
    subj = doc.get("subject")
    logged = {m: float(rec[m]) for m in ACC_METRICS
              if isinstance(rec.get(m), (int, float)) and not isinstance(rec.get(m), bool)}
    lls_a = np.asarray(lls, dtype=np.float64)

    def agrees(c: int) -> bool:  # gold index c reproduces every per-document metric the record carries
        units = {"acc": None, "acc_norm": "chars", "acc_bytes": "bytes"}
        for m, v in logged.items():
            n = _lengths(choices, units[m]) if units[m] else 1.0
            if n is None or (int(np.argmax(lls_a / n)) == c) != bool(v):
                return False
        return bool(logged)

    answer = _gold(rec["target"], choices, where, target_kind(cfg or {}, doc), agrees)
    return _Doc(doc_id=rec["doc_id"], subject=subj.strip() if isinstance(subj, str) and subj.strip()
                else task_subject(task), answer=answer, lls=lls_a, choices=choices,
                filter=str(rec.get("filter", "none")), logged=logged)


# ---- one file --------------------------------------------------------------------------------------
def _lengths(choices: Sequence[str], unit: str) -> np.ndarray | None:
    n = np.array([float(len(c.encode("utf-8")) if unit == "bytes" else len(c)) for c in choices])
    return n if np.all(n > 0) else None


def _logits(d: _Doc, norm: str, where: str) -> np.ndarray:
    if norm == "none":
        return d.lls
    n = _lengths(d.choices, "bytes" if norm == "acc_bytes" else "chars")
    if n is None:
        raise LlmcalError(f"{where}: an option is empty, so its length-normalised log-likelihood ({norm}) is "
                          f"undefined; use norm 'none'")
    return d.lls / n  # lm-eval's own expression (lls / completion_len), so ties break the same way


@validated
def read_samples(sf: SamplesFile, norm: Norm = "none", results: dict | None = None) -> TaskSamples:
    """One samples file as a :class:`TaskSamples` (every line checked; errors name the file and line).

    ``results``: the parsed ``sf.results`` when the caller has it (every task of a run shares one file).
    """
    if results is None:
        results = _read_results(sf.results) if sf.results else {}
    cfg = (results.get("configs") or {}).get(sf.task) or {}
    delimiter = cfg.get("target_delimiter", DEFAULT_DELIMITER)
    docs: list[_Doc] = []
    preds: list[Prediction] = []
    seen: dict[str, int] = {}
    try:
        f = open(sf.path, encoding="utf-8")
    except OSError as e:
        raise LlmcalError(f"{sf.path}: cannot read ({e.strerror})") from e
    with f:
        for lineno, line in enumerate(f, 1):
            where = f"{sf.path}:{lineno}"
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise LlmcalError(f"{where}: not a JSON line ({e.msg} at column {e.colno}); a truncated "
                                  f"file?") from None
            d = parse_record(rec, where, sf.task, delimiter, cfg)
            pid = f"{sf.task}/{d.doc_id}"
            if pid in seen:
                raise LlmcalError(f"{where}: document {d.doc_id!r} already on line {seen[pid]}"
                                  + (" (several filters in one file: llmcal reads one)" if docs and
                                     any(x.filter != d.filter for x in docs) else ""))
            seen[pid] = lineno
            docs.append(d)
            preds.append(Prediction.from_logits(pid, d.subject, d.answer, _logits(d, norm, where)))
    if not docs:
        raise LlmcalError(f"{sf.path}: no samples in this file")
    gold = np.array([d.answer for d in docs])

    def lm_eval_acc(unit: str | None) -> float | None:  # lm-eval's np.argmax on the same arrays
        if unit is None:
            return float(np.mean(np.array([np.argmax(d.lls) for d in docs]) == gold))
        lens = [_lengths(d.choices, unit) for d in docs]
        if any(n is None for n in lens):
            return None
        return float(np.mean(np.array([np.argmax(d.lls / n) for d, n in zip(docs, lens)]) == gold))

    logged = {m: float(np.mean([d.logged[m] for d in docs])) for m in ACC_METRICS if all(m in d.logged for d in docs)}
    flt = docs[0].filter
    row = (results.get("results") or {}).get(sf.task) or {}
    reported = {m: float(row[f"{m},{flt}"]) for m in ACC_METRICS if isinstance(row.get(f"{m},{flt}"), (int, float))}
    metric = NORM_METRIC[norm]
    disagree = (sum(int(p.correct) != int(d.logged[metric]) for p, d in zip(preds, docs))
                if metric in logged else None)
    ts = TaskSamples(task=sf.task, path=sf.path, norm=norm, predictions=tuple(preds), acc=lm_eval_acc(None),
                     acc_norm=lm_eval_acc("chars"), acc_bytes=lm_eval_acc("bytes"), logged=logged,
                     reported=reported, disagreements=disagree)
    if disagree:
        log.warning("%s: llmcal's correctness differs from lm-eval's logged %s on %d documents",
                    sf.path, metric, disagree)
    return ts


@validated
def read_lm_eval(path: str | Path, *, norm: Norm = "none", task: str | Sequence[str] | None = None) -> LmEvalSamples:
    """Read an lm-eval samples file, or the samples of an output folder, as llmcal predictions.

    From a folder without ``task``, tasks llmcal cannot read (generation tasks,
    ...) are left out and named in ``skipped``; a file or a task asked for by
    name must be readable.
    """
    files = find_samples(path, task)
    lenient = Path(path).expanduser().is_dir() and task is None
    docs = {r: _read_results(r) for r in {sf.results for sf in files} if r is not None}
    tasks, skipped = [], {}
    for sf in files:
        try:
            tasks.append(read_samples(sf, norm, docs.get(sf.results, {})))
        except UnsupportedTask as e:
            if not lenient:
                raise
            log.warning("skipping %s", e)
            skipped[sf.task] = str(e)
    if not tasks:
        raise LlmcalError(f"{path}: no multiple-choice task llmcal can read"
                          + (" (" + "; ".join(skipped.values()) + ")" if skipped else ""))
    model = next((docs[sf.results].get("model_name") for sf in files if sf.results is not None), None)
    return LmEvalSamples(tasks=tuple(tasks), skipped=skipped, model=model)


# ---- the run ---------------------------------------------------------------------------------------
def _dataset_label(tasks: Sequence[str]) -> str:
    return "lm-eval:" + (",".join(tasks) if len(tasks) <= 3 else f"{tasks[0]},... ({len(tasks)} tasks)")


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def agreement_markdown(data: LmEvalSamples, norm: str) -> str:
    """The report section: llmcal's accuracy next to lm-eval's own, per task."""
    metric = NORM_METRIC[norm]
    lines = [
        f"Predictions read from lm-evaluation-harness samples; option logits = "
        + {"none": "the options' log-likelihoods (softmax = lm-eval's `acc` argmax)",
           "acc_norm": "log-likelihood / characters of the option (lm-eval's `acc_norm`)",
           "acc_bytes": "log-likelihood / UTF-8 bytes of the option (lm-eval's `acc_bytes`)"}[norm]
        + f". llmcal's accuracy should equal lm-eval's `{metric}`.", "",
        "| task | n | llmcal accuracy | acc | acc_norm | acc_bytes | logged per sample | results file |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for t in data.tasks:
        logged = ", ".join(f"{k} {v:.4f}" for k, v in t.logged.items()) or "-"
        reported = ", ".join(f"{k} {v:.4f}" for k, v in t.reported.items()) or "-"
        lines.append(f"| {t.task} | {len(t.predictions)} | {t.accuracy:.4f} | {_fmt(t.acc)} | {_fmt(t.acc_norm)} | "
                     f"{_fmt(t.acc_bytes)} | {logged} | {reported} |")
    lines += ["", "acc, acc_norm, acc_bytes: recomputed from the logged log-likelihoods as lm-eval computes them."]
    if data.skipped:
        lines += ["", "Left out: " + "; ".join(f"`{k}` ({v.split(': ', 1)[-1]})" for k, v in data.skipped.items())]
    return "\n".join(lines)


@validated
def run_from_lm_eval(path: str | Path, out: str | Path, *, norm: Norm = "none", task: str | Sequence[str] | None = None,
                     n_bins: PositiveInt = 10, n_bootstrap: PositiveInt = 1000, seed: int = 0, overwrite: bool = False,
                     progress: bool = True):
    """An lm-eval run's samples as an llmcal evaluation run: predictions, metrics, diagram, report.

    Returns the finished :class:`~llmcal.runs.RunRecord`. The run's meta holds,
    per task, llmcal's accuracy and lm-eval's ``acc``/``acc_norm``/``acc_bytes``
    recomputed from the samples, the per-sample values the samples carry and the
    results file's values.
    """
    from .pipeline import Run
    from .predictions import write_predictions

    data = read_lm_eval(path, norm=norm, task=task)
    names = [t.task for t in data.tasks]
    model = data.model or "lm-eval samples"
    config = {"kind": "eval", "model": model, "data": _dataset_label(names),
              # absolute here; RunDir.start records it relative to the run folder (runs.portable)
              "from_lm_eval": str(Path(path).expanduser().resolve()), "lm_eval_norm": norm,
              "lm_eval_task": [task] if isinstance(task, str) else list(task) if task is not None else None,
              "n_bins": n_bins, "n_bootstrap": n_bootstrap, "seed": seed}
    run = Run.start(out, config, device="cpu", overwrite=overwrite, progress=progress)
    preds = data.predictions
    run.on_main(lambda: write_predictions(run.file("predictions.jsonl"), preds), what="writing the predictions")
    res = run.result("none", preds, dataset=config["data"], split="all", pred_file="predictions.jsonl",
                     png="reliability.png", title=f"{model} on {config['data']} (lm-eval samples, norm {norm})")
    run.section("lm-evaluation-harness", agreement_markdown(data, norm))
    meta = {"source": "lm-eval", "norm": norm, "n_questions": len(preds),
            "lm_eval": {t.task: t.summary() for t in data.tasks}, "lm_eval_skipped": data.skipped}
    return run.finish(model=model, results=[res], meta=meta)
