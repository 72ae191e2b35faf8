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
resumes it; a complete run is only replaced with ``overwrite=True``.  The
process that starts a run holds ``RUN/.llmcal.lock`` (``llmcal.lock``) until
it finishes: a second process on the same directory is refused.

``refresh_metrics(RUN)`` recomputes metrics.json's metrics from the stored
predictions with the current code (a run written before a metric existed),
leaving every other field as it was.

Recorded documents hold no credentials: ``portable`` also redacts the secrets a
URL may carry (``llmcal.redact``).

Recorded paths are portable (:func:`portable`): config.json and metrics.json
hold no absolute path of the machine that wrote them, so a run directory can
be committed, moved or copied to another machine and still resume and compare.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LlmcalError
from .io import atomic_write_json, atomic_write_text
from .lock import LOCK_NAME, RunLock
from .redact import redact_text

MARKER = "INCOMPLETE"
CONFIG = "config.json"
METRICS = "metrics.json"

# Keys of config.json that must match for a run to be resumed.
# Keys that do not change a run's numbers: changing them must not block a resume (the served-model client's
# concurrency, timeout, retries and key variable only change how the same requests are sent).
RESUME_KEYS_IGNORED = {"created", "resume", "overwrite", "out", "progress",
                       "concurrency", "request_timeout", "max_retries", "api_key_env"}


def _roots() -> list[tuple[Path, str]]:
    from .models import cache_dir

    roots = [(cache_dir(), "<llmcal-cache>"), (Path(sysconfig.get_paths()["purelib"]), "<site-packages>")]
    return [(r.expanduser().resolve(), tag) for r, tag in roots]


def portable(obj: Any, base: str | Path) -> Any:
    """``obj`` (JSON-like) with every absolute path made portable.

    A path under the llmcal cache becomes ``<llmcal-cache>/...``, one under the
    Python environment's site-packages ``<site-packages>/...`` (where the asset
    packages put their files); any other absolute path becomes relative to
    ``base`` (the run folder).      Relative paths and other strings are kept, except that credentials in a
    URL are replaced by ``***`` (``llmcal.redact``).
    """
    base = Path(base).resolve()
    roots = _roots()

    def one(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: one(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [one(x) for x in v]
        if isinstance(v, str) and "://" in v:
            return redact_text(v)
        if not isinstance(v, str) or not v.startswith(("/", "\\")) or "\n" in v or not os.path.isabs(v):
            return v
        p = Path(v).resolve()
        for root, tag in roots:
            if p == root or root in p.parents:
                return f"{tag}/{p.relative_to(root).as_posix()}".rstrip("/")
        return Path(os.path.relpath(p, base)).as_posix()

    return one(obj)


def recorded_path(value: str, base: str | Path) -> Path:
    """The path a :func:`portable` string names, read back on this machine."""
    for root, tag in _roots():
        if value == tag or value.startswith(tag + "/"):
            return root / value[len(tag) + 1:]
    return (Path(base) / value).resolve() if not os.path.isabs(value) else Path(value)


def recorded_model_spec(spec_doc: dict, base: str | Path):
    """The ``ModelSpec`` a run recorded (``config.json``'s ``model_spec``), with its paths read back here.

    An alias is resolved again (its files live in this machine's cache); a
    recorded relative path is taken relative to the run folder ``base``.
    """
    from .models import ModelSpec, resolve_model

    if spec_doc.get("alias"):
        return resolve_model(spec_doc["alias"])
    d = dict(spec_doc)
    if d.get("kind") != "hub" and d.get("path"):
        d["path"] = str(recorded_path(d["path"], base))
    if d.get("base"):
        d["base"] = recorded_model_spec(d["base"], base).to_dict()
    return ModelSpec.from_dict(d)


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
    confidence: dict | None = None  # metrics.json's ``confidence`` block (a served model's parse counts and cost)

    @property
    def main(self) -> RunResult:
        """The run's main result: the one its method produced (``ts``, ``cft``, ...), the held-out side of a
        regime diagnosis, the debiased one of ``eval --permutations``, else the first."""
        if not self.results:
            raise LlmcalError(f"{self.path}: the run holds no results")
        want = main_label({**self.config, "kind": self.kind})
        return next((r for r in self.results if r.label == want), self.results[0])

    @property
    def metrics(self) -> dict:
        """The main result's metrics (``accuracy``, ``conf_ece``, ``ci``, ...; see ``metrics.compute_metrics``)."""
        return self.main.metrics

    @property
    def diagnosis(self):
        """A regime run's :class:`~llmcal.regime.Diagnosis` (None for other runs)."""
        from .regime import Diagnosis

        doc = self.meta.get("diagnosis")
        return Diagnosis.from_dict(doc) if isinstance(doc, dict) else None


def _own(name: str) -> bool:
    """Files a run directory has from its first instant (the lock, the marker, their temporary files)."""
    return name in (LOCK_NAME, MARKER) or (name.startswith((f".{MARKER}.", f".{CONFIG}.")) and name.endswith(".tmp"))


def clear_run_dir(path: Path) -> None:
    """Remove everything in the run directory but its lock (which this process holds)."""
    for p in path.iterdir():
        if p.name == LOCK_NAME:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def read_config(path: Path, *, overwrite_hint: bool = True) -> dict:
    """A run's config.json; a damaged one is an error naming the file and line."""
    f = path / CONFIG
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        doc, why = None, f"not UTF-8 text ({e.reason})"
    except json.JSONDecodeError as e:
        doc, why = None, f"line {e.lineno}: not valid JSON ({e.msg})"
    else:
        why = "not a JSON object"
    if not isinstance(doc, dict):
        hint = "; the run cannot resume from it: pass --overwrite to start it again" if overwrite_hint else ""
        raise LlmcalError(f"{f} {why}{hint}")
    return doc


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock: RunLock | None = None

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
    def _foreign(self) -> bool:
        """The directory holds files that are not a run's (checked before the lock file is put there)."""
        return self.path.is_dir() and not self.is_started and any(not _own(p.name) for p in self.path.iterdir())

    def start(self, config: dict, *, overwrite: bool = False, restart: bool = False) -> bool:
        """Take the run's lock, then create or reopen the run; returns True when it resumes an interrupted run.

        ``restart``: an interrupted run is removed first, whatever its configuration.
        The lock is held until ``finish`` (or until this process ends).
        """
        if self.path.exists() and not self.path.is_dir():
            raise LlmcalError(f"{self.path}: exists and is not a directory")
        if self._foreign() and not overwrite:  # before the lock file is put into somebody else's directory
            raise LlmcalError(f"{self.path}: directory is not empty and holds no llmcal run; choose another --out")
        self._lock = RunLock.acquire(self.path)
        try:
            return self._start_locked(config, overwrite=overwrite, restart=restart)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Give up the run's lock (``finish`` does; a refused ``start`` does)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _start_locked(self, config: dict, *, overwrite: bool, restart: bool) -> bool:
        if restart and self.is_started and not self.is_complete:
            clear_run_dir(self.path)
        if self.is_complete:
            if not overwrite:
                raise LlmcalError(
                    f"{self.path}: already holds a complete run; pass --overwrite to replace it "
                    f"or choose another --out"
                )
            clear_run_dir(self.path)
        resumed = False
        config = portable(_jsonable(config), self.path)
        if self.is_started:
            try:
                old = portable(read_config(self.path), self.path)
            except LlmcalError:
                if not overwrite:
                    raise
                old = None
            a = {k: v for k, v in (old or {}).items() if k not in RESUME_KEYS_IGNORED}
            b = {k: v for k, v in config.items() if k not in RESUME_KEYS_IGNORED}
            if old is not None and a == b:
                resumed = True
            elif overwrite:  # a different run was interrupted here: start this one from nothing
                clear_run_dir(self.path)
            else:
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                raise LlmcalError(
                    f"{self.path}: holds an interrupted run with a different configuration "
                    f"({', '.join(diff)} differ); resume with the same options, or pass --overwrite"
                )
        elif self._foreign():
            if not overwrite:
                raise LlmcalError(f"{self.path}: directory is not empty and holds no llmcal run; choose another "
                                  f"--out")
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / MARKER, "this run has not finished; rerun the same command to resume\n")
        if not resumed:
            cfg = dict(config)
            cfg.setdefault("created", _now())
            atomic_write_json(self.path / CONFIG, cfg)
        # Stale outputs of a previous attempt must not survive into a resumed run.
        (self.path / METRICS).unlink(missing_ok=True)
        return resumed

    def finish(self, *, kind: str, model: str, results: list[RunResult], meta: dict | None = None,
               confidence: dict | None = None) -> None:
        doc = {
            "llmcal_version": version(),
            "kind": kind,
            "model": portable(model, self.path),
            "finished": _now(),
            "meta": portable(_jsonable(meta or {}), self.path),
            "results": [portable(_jsonable(r.__dict__), self.path) for r in results],
        }
        if confidence is not None:  # a served model's confidence source: parse counts and cost (llmcal.confidence)
            doc["confidence"] = _jsonable(confidence)
        atomic_write_json(self.path / METRICS, doc)
        (self.path / MARKER).unlink(missing_ok=True)
        self.release()


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
                     results=results, meta=doc.get("meta", {}),
                     confidence=doc["confidence"] if isinstance(doc.get("confidence"), dict) else None)


def refresh_metrics(path: str | Path) -> dict:
    """Recompute every result's metrics in ``RUN/metrics.json`` from its stored predictions with this llmcal.

    For runs written before a metric existed: no model is loaded. Each result's
    ``metrics`` is replaced by ``metrics_from_predictions`` of its predictions file
    with the options the run recorded in config.json (``n_bins``, ``n_bootstrap``,
    ``seed``: the same call ``Run.result`` makes, so a run refreshed with the code
    that wrote it is unchanged); every other field (meta, extra, the diagnosis, the
    ``finished`` stamp, the version that scored it) stays as it was, and
    ``metrics_refreshed`` records the version and time of the refresh. The file is
    rewritten atomically under the run's lock; predictions, config and report.md
    are not touched. Returns the new document.
    """
    from .lock import RunLock
    from .metrics import metrics_from_predictions
    from .predictions import load_predictions

    path = Path(path)
    load_run(path)  # a complete llmcal run, or the error that says why not
    f = path / METRICS
    doc = json.loads(f.read_text(encoding="utf-8"))
    cfg = read_config(path, overwrite_hint=False)
    try:
        opts = {"n_bins": int(cfg.get("n_bins", 10)), "n_bootstrap": int(cfg.get("n_bootstrap", 1000)),
                "seed": int(cfg.get("seed", 0))}
    except (TypeError, ValueError) as e:
        raise LlmcalError(f"{path / CONFIG}: n_bins, n_bootstrap and seed must be integers ({e})") from e
    lock = RunLock.acquire(path)
    try:
        for i, res in enumerate(doc["results"]):
            name = res.get("predictions")
            if not isinstance(name, str) or not name:
                raise LlmcalError(f"{f}: result {i} ({res.get('label')!r}) names no predictions file")
            preds = load_predictions(recorded_path(name, path))
            if not preds:
                raise LlmcalError(f"{path / name}: no predictions; the metrics of result {res.get('label')!r} "
                                  f"cannot be recomputed")
            old_n = (res.get("metrics") or {}).get("n")
            if old_n is not None and old_n != len(preds):
                raise LlmcalError(f"{path / name}: {len(preds)} predictions but metrics.json counted {old_n} for "
                                  f"result {res.get('label')!r}; the file is not the one the run measured")
            res["metrics"] = _jsonable(metrics_from_predictions(preds, **opts))
        doc["metrics_refreshed"] = {"llmcal_version": version(), "at": _now()}
        atomic_write_json(f, doc)
    finally:
        lock.release()
    return doc


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _jsonable(obj: Any) -> Any:
    from .io import dumps

    return json.loads(dumps(obj))


def main_label(config: dict) -> str | None:
    """The label of a run's main result from its config (``kind``, ``method``, ``permutations``): the
    debiased side of ``eval --permutations``, the held-out side of a regime diagnosis (``regime``,
    ``study-regime``), else the method's own."""
    if config.get("permutations", "none") not in (None, "none"):
        return "debiased"
    kind = str(config.get("kind") or "")
    return "heldout" if kind.endswith("regime") else config.get("method")
