"""Small helpers every stage of a study uses: study-relative paths, JSON files, times, the study lock."""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)


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


@contextlib.contextmanager
def study_lock(out: Path, poll_s: float = 0.1) -> Iterator[None]:
    """Hold the lock of a study directory (``DIR/.llmcal.lock``, ``llmcal.lock.RunLock``) for the block, waiting
    for it while another process holds it.

    It serialises the writers of the files every process of a fanned-out study shares (timings.json, the
    assembled study.json and report); they hold it for a read and a rewrite, seconds at most.  A holder that
    dies loses it with its process.  Not re-entrant: do not nest.
    """
    from ..errors import LlmcalError
    from ..lock import RunLock

    waited = False
    while True:
        try:
            lock = RunLock.acquire(out)
            break
        except LlmcalError as e:
            if not waited:
                log.info("waiting for the study lock of %s: %s", out, e)
                waited = True
            time.sleep(poll_s)
    try:
        yield
    finally:
        lock.release()
