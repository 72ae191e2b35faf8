"""One writer per run directory: an advisory lock (``fcntl.flock``) on ``RUN/.llmcal.lock``.

The process that starts a run takes the lock before it looks at what the
directory holds, and keeps it until the run has finished (``RunDir.finish``
releases it and removes the file).  A second process on the same directory is
refused at once, naming the owner's pid from the file; without the lock it
would "resume" the live run and both would score the same questions.

A lock whose owner died is stale: the kernel dropped the owner's lock with its
process, so the next process simply takes it (and writes its own pid).  The
file is removed on release while still locked, so a process that opened the
old file re-checks, after locking it, that the path still names the file it
locked, and starts over if not.

Within one process the lock is re-entrant per directory: a run that failed and
is started again by the same process (a library caller, a study's next
attempt) takes over its own lock.  Where ``fcntl`` does not exist (Windows)
nothing is locked.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from .errors import LlmcalError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_NAME = ".llmcal.lock"
_HELD: dict[str, "RunLock"] = {}  # realpath of the directory -> the lock this process holds on it


def _read_owner(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").split()[0]
    except (OSError, IndexError):
        return ""


class RunLock:
    """The held lock of one directory (``RunLock.acquire``); ``release`` gives it up."""

    def __init__(self, directory: Path, fd: int | None, key: str):
        self.directory, self._fd, self._key = directory, fd, key

    @property
    def path(self) -> Path:
        return self.directory / LOCK_NAME

    @classmethod
    def acquire(cls, directory: str | os.PathLike) -> "RunLock":
        """Lock ``directory`` (created if needed) for this process; LlmcalError naming the owner if another holds it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(directory)
        if key in _HELD:  # this process holds it already: a failed attempt of the same run
            return _HELD[key]
        if fcntl is None:  # pragma: no cover
            lock = cls(directory, None, key)
            _HELD[key] = lock
            return lock
        path = directory / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                for _ in range(20):  # the owner writes its pid right after locking
                    if owner:
                        break
                    time.sleep(0.01)
                    owner = _read_owner(fd)
                os.close(fd)
                raise LlmcalError(
                    f"{directory}: another llmcal process (pid {owner or 'unknown'}) is writing this run; two "
                    f"writers would score the same questions twice. Wait for it to finish (or stop it), or choose "
                    f"another --out") from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous owner removed the file after we opened it: lock the new one
        stale = _read_owner(fd)
        if stale and stale != str(os.getpid()):
            log.info("%s: taking over the lock of pid %s, which is no longer running", directory, stale)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        lock = cls(directory, fd, key)
        _HELD[key] = lock
        return lock

    def release(self) -> None:
        """Remove the lock file and give up the lock (idempotent)."""
        if _HELD.get(self._key) is self:
            del _HELD[self._key]
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: see the module docstring
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def holds(directory: str | os.PathLike) -> bool:
    """Whether this process holds the lock of ``directory``."""
    return os.path.realpath(directory) in _HELD
