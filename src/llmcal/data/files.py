"""Local MCQ files: JSONL, JSON, CSV and Parquet -> raw records with their positions.

Positions in messages: JSONL "line N" (1-based, blank lines counted), CSV
"row N (line L)" (N = 1-based data row, header not counted; L = physical
line), Parquet "row N" (1-based), JSON "index N" (0-based position in the list).
Text must be UTF-8 (a BOM is allowed); bad bytes are reported with their line.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Mapping

from ..errors import LlmcalError
from .schema import Question
from .validate import Where, build_questions, check_mapped_columns, fail, normalize_mapping

EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")

Records = list[tuple[Any, Where]]


def _decode(data: bytes, file: str, line_offset: int = 0) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1 + line_offset
        raise LlmcalError(
            f"{file} line {line}: undecodable bytes {data[e.start:e.end]!r} (the file must be UTF-8)"
        ) from None


def read_jsonl(path: Path, file: str) -> Records:
    """One JSON object per line; blank lines are skipped but counted."""
    records = []
    for n, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        text = _decode(raw, file, line_offset=n - 1)
        if not text.strip():
            continue
        where = Where(file, f"line {n}")
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise fail(where, f"malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise fail(where, f"expected a JSON object, got {type(record).__name__}")
        records.append((record, where))
    return records


def read_json(path: Path, file: str) -> Records:
    """A list of objects, or ``{"questions": [...]}``."""
    text = _decode(path.read_bytes(), file)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LlmcalError(f"{file} line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("questions"), list):
        data = data["questions"]
    if not isinstance(data, list):
        raise LlmcalError(f"{file}: expected a JSON list of question objects or {{\"questions\": [...]}}, got {type(data).__name__}")
    records = []
    for i, record in enumerate(data):
        where = Where(file, f"index {i}")
        if not isinstance(record, dict):
            raise fail(where, f"expected a JSON object, got {type(record).__name__}")
        records.append((record, where))
    return records


def read_csv(path: Path, file: str) -> tuple[Records, list[str]]:
    """A header row, then one question per row; empty cells are missing values."""
    text = _decode(path.read_bytes(), file)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise LlmcalError(f"{file}: empty CSV file (expected a header row)")
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes:
            raise LlmcalError(f"{file} line 1: duplicate column name(s) {', '.join(map(repr, dupes))} in the header")
        records = []
        row_no = 0
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue  # blank line
            row_no += 1
            where = Where(file, f"row {row_no} (line {reader.line_num})")
            if len(cells) != len(header):
                raise fail(where, f"has {len(cells)} cells but the header has {len(header)} columns")
            records.append((dict(zip(header, cells)), where))
    except csv.Error as e:
        raise LlmcalError(f"{file} line {reader.line_num}: malformed CSV ({e})") from None
    return records, header


def read_parquet(path: Path, file: str) -> tuple[Records, list[str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LlmcalError(
            f"{file}: reading Parquet needs pyarrow: pip install pyarrow (or pip install llmcal[parquet])"
        ) from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise LlmcalError(f"{file}: cannot read Parquet file ({e})") from None
    rows = table.to_pylist()
    return [(row, Where(file, f"row {i}")) for i, row in enumerate(rows, start=1)], list(table.column_names)


def load_file(path: str | Path, mapping: Mapping[str, Any] | None = None) -> tuple[Question, ...]:
    """Read and validate every question of a local file (see the module docstring for positions).

    Ids: the id column (``mapping["id"]``, default ``id``) when the file has it;
    only when that column is absent from the whole file, ``{file stem}/{i}`` with
    i the 0-based record index.  A column the mapping names explicitly must exist
    (``check_mapped_columns``): an option, an id or a subject column mistyped in
    ``--mapping`` is refused instead of read as missing.
    """
    path = Path(path)
    file = str(path)
    ext = path.suffix.lower()
    if ext not in EXTENSIONS:
        raise LlmcalError(f"{file}: unknown file type {path.suffix or '(none)'!r}; use one of {', '.join(EXTENSIONS)}")
    if not path.exists():
        raise LlmcalError(f"{file}: no such file")
    if not path.is_file():
        raise LlmcalError(f"{file}: not a file")
    m = normalize_mapping(mapping)
    has_id: bool | None = None
    if ext == ".jsonl":
        records = read_jsonl(path, file)
    elif ext == ".json":
        records = read_json(path, file)
    elif ext == ".csv":
        records, header = read_csv(path, file)
        has_id = m["id"] in header
    else:
        records, header = read_parquet(path, file)
        has_id = m["id"] in header
    if not records:
        raise LlmcalError(f"{file}: no questions in the file")
    if ext in (".jsonl", ".json"):  # the union of the records' keys, in the order they first appear
        header = list(dict.fromkeys(k for r, _ in records for k in r))
    check_mapped_columns(mapping, header, file)
    return build_questions(records, m, path.stem, has_id_column=has_id)
