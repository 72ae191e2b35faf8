"""Atomic writers: every file in a run directory goes through here.

A reader (or a resumed run) must never see a half-written file, so each write
goes to a temporary file in the same directory and is renamed into place;
rename is atomic on POSIX filesystems.  Append-only JSONL (predictions as they
are computed) is the one exception: each record is one line written and
flushed, and a torn last line is detected and dropped on resume.

A failed write (a full disk, a read-only directory) raises OSError with the
path it was writing, which the CLI turns into one line naming it.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def dumps(obj: Any, indent: int | None = None) -> str:
    return json.dumps(obj, default=_default, indent=indent, ensure_ascii=False, allow_nan=True)


def _with_path(e: OSError, path: Path) -> OSError:
    """``e`` naming ``path`` when it names no file (a write to an open file descriptor)."""
    if e.filename is None:
        return type(e)(e.errno, e.strerror or str(e), str(path)) if e.errno else OSError(f"{path}: {e}")
    return e


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.filename is None:
            raise _with_path(e, path) from None
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, dumps(obj, indent=2) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> Path:
    return atomic_write_text(path, "".join(dumps(r) + "\n" for r in records))


def atomic_savefig(fig: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Save a matplotlib figure atomically (format taken from the suffix)."""
    import io as _io

    path = Path(path)
    buf = _io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", **kwargs)
    return atomic_write_bytes(path, buf.getvalue())


class JsonlAppender:
    """Append one JSON record per line, flushed as it is written (for resumable output)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: Any) -> None:
        try:
            self._f.write(dumps(record) + "\n")
            self._f.flush()
        except OSError as e:
            raise _with_path(e, self.path) from None

    def close(self) -> None:
        try:
            self._f.close()
        except OSError as e:
            raise _with_path(e, self.path) from None

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_jsonl_tolerant(path: str | os.PathLike, *, hint: str = "", numbered: bool = False) -> Iterator[Any]:
    """Read a JSONL file we wrote ourselves, dropping a torn final line.

    Only for our own append-only outputs (resume); user data goes through the
    strict loaders in ``llmcal.data``.  Any other line that is not JSON (or not
    UTF-8) is damage, not an interruption: an LlmcalError naming the file and the
    line, followed by ``hint`` (what the user can do).  ``numbered``: yield
    (line number, record) pairs.
    """
    from .errors import LlmcalError

    path = Path(path)
    if not path.exists():
        return
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the file ends with a newline
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if i == len(lines) - 1:
                return  # interrupted mid-write; the question will be scored again
            why = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
            raise LlmcalError(f"{path} line {i + 1}: not a JSON record ({why})" + (f"; {hint}" if hint else "")) \
                from None
        yield (i + 1, rec) if numbered else rec
