"""Run directories: the unit of output.

Layout (every file written atomically through ``llmcal.io``)::

    RUN/
      INCOMPLETE          present from the start until the run has finished
      config.json         the resolved configuration (written first)
      predictions.jsonl   per question: id, subject, answer, probs, pred, conf, logits
      metrics.json        written last; see ``RunResult`` for its shape
      reliability.png     reliability diagram with a confidence histogram
      report.md

A run is complete when ``metrics.json`` exists and ``INCOMPLETE`` does not.
Starting a run on a directory that holds an incomplete run of the same config
resumes it; a complete run is only replaced with ``overwrite=True``.
"""
from __future__ import annotations

import datetime as _dt
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LlmcalError
from .io import atomic_write_json, atomic_write_text

MARKER = "INCOMPLETE"
CONFIG = "config.json"
METRICS = "metrics.json"

# Keys of config.json that must match for a run to be resumed.
RESUME_KEYS_IGNORED = {"created", "resume", "overwrite", "out", "progress"}


def version() -> str:
    from . import __version__

    return __version__


@dataclass
class RunResult:
    """One evaluated (method, dataset, split) inside a run; a row of the comparison table."""

    label: str
    method: str
    dataset: str
    split: str | None
    predictions: str
    metrics: dict
    reliability: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class RunRecord:
    """A finished run read back from disk."""

    path: Path
    config: dict
    kind: str
    model: str
    results: list[RunResult]
    meta: dict


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # ---- state -------------------------------------------------------
    @property
    def is_complete(self) -> bool:
        return (self.path / METRICS).exists() and not (self.path / MARKER).exists()

    @property
    def is_started(self) -> bool:
        return (self.path / CONFIG).exists()

    def file(self, name: str) -> Path:
        return self.path / name

    # ---- lifecycle ---------------------------------------------------
    def start(self, config: dict, *, overwrite: bool = False) -> bool:
        """Create or reopen the run; returns True when it resumes an interrupted run."""
        if self.path.exists() and not self.path.is_dir():
            raise LlmcalError(f"{self.path}: exists and is not a directory")
        if self.is_complete:
            if not overwrite:
                raise LlmcalError(
                    f"{self.path}: already holds a complete run; pass --overwrite to replace it "
                    f"or choose another --out"
                )
            shutil.rmtree(self.path)
        resumed = False
        if self.is_started:
            old = json.loads((self.path / CONFIG).read_text(encoding="utf-8"))
            a = {k: v for k, v in old.items() if k not in RESUME_KEYS_IGNORED}
            b = {k: v for k, v in _jsonable(config).items() if k not in RESUME_KEYS_IGNORED}
            if a == b:
                resumed = True
            elif overwrite:  # a different run was interrupted here: start this one from nothing
                shutil.rmtree(self.path)
            else:
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                raise LlmcalError(
                    f"{self.path}: holds an interrupted run with a different configuration "
                    f"({', '.join(diff)} differ); resume with the same options, or pass --overwrite"
                )
        elif self.path.exists() and any(self.path.iterdir()) and not overwrite:
            raise LlmcalError(f"{self.path}: directory is not empty and holds no llmcal run; choose another --out")
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / MARKER, "this run has not finished; rerun the same command to resume\n")
        if not resumed:
            cfg = dict(config)
            cfg.setdefault("created", _now())
            atomic_write_json(self.path / CONFIG, cfg)
        # Stale outputs of a previous attempt must not survive into a resumed run.
        (self.path / METRICS).unlink(missing_ok=True)
        return resumed

    def finish(self, *, kind: str, model: str, results: list[RunResult], meta: dict | None = None) -> None:
        doc = {
            "llmcal_version": version(),
            "kind": kind,
            "model": model,
            "finished": _now(),
            "meta": meta or {},
            "results": [r.__dict__ for r in results],
        }
        atomic_write_json(self.path / METRICS, doc)
        (self.path / MARKER).unlink(missing_ok=True)


def load_run(path: str | Path) -> RunRecord:
    path = Path(path)
    rd = RunDir(path)
    if not path.is_dir():
        raise LlmcalError(f"{path}: not a run directory")
    if not rd.is_complete:
        raise LlmcalError(f"{path}: the run is not complete (rerun its command to resume it)")
    try:
        doc = json.loads((path / METRICS).read_text(encoding="utf-8"))
        config = json.loads((path / CONFIG).read_text(encoding="utf-8")) if (path / CONFIG).exists() else {}
        results = [RunResult(**r) for r in doc["results"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise LlmcalError(f"{path / METRICS}: not an llmcal metrics file ({e})") from e
    return RunRecord(path=path, config=config, kind=doc.get("kind", "?"), model=doc.get("model", "?"),
                     results=results, meta=doc.get("meta", {}))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _jsonable(obj: Any) -> Any:
    from .io import dumps

    return json.loads(dumps(obj))
