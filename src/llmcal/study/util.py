"""Small helpers every stage of a study uses: study-relative paths, JSON files, times."""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any



def rel(p: str | Path, root: Path) -> str:
    """``p`` relative to the study directory when it is inside it, else as given."""
    try:
        return Path(p).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(p)


def read_json(p: Path) -> dict:
    """The JSON object in ``p``, or {} when it is missing or unreadable (an interrupted write)."""
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def fmt_time(s: Any) -> str:
    if not isinstance(s, (int, float)):
        return "—"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def group_label(model: str, point: str) -> str:
    return f"{model} · {point}" if point else model
