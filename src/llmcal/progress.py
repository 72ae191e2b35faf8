"""Progress bars for long steps (rich, on stderr).

Library functions take ``progress: bool``; bars are also off when the
environment sets ``LLMCAL_PROGRESS=0`` (tests, CI logs).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator


class _NullTask:
    def advance(self, n: int = 1) -> None:
        pass

    def update(self, **kw) -> None:
        pass


class _Task:
    def __init__(self, progress, task_id):
        self._p, self._id = progress, task_id

    def advance(self, n: int = 1) -> None:
        self._p.advance(self._id, n)

    def update(self, **kw) -> None:
        self._p.update(self._id, **kw)


def enabled(flag: bool = True) -> bool:
    return flag and os.environ.get("LLMCAL_PROGRESS", "1") != "0"


@contextlib.contextmanager
def bar(description: str, total: int | None, *, show: bool = True, completed: int = 0) -> Iterator[_Task | _NullTask]:
    if not enabled(show):
        yield _NullTask()
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                  console=Console(stderr=True)) as p:
        tid = p.add_task(description, total=total, completed=completed)
        yield _Task(p, tid)
