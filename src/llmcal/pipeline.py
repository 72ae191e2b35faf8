"""The run pipeline: every command and every study cell drives its run directory through this one lifecycle.

::

    run = Run.start(out, config, kind="eval", device=cfg.device, overwrite=...)   # join ranks; rank 0 starts RUN/
    preds = run.score("predictions.jsonl", loaded, questions, template)            # resumable, sharded, cached
    res = run.result("none", preds, dataset=..., split=..., pred_file=..., title=...)   # metrics + reliability PNG
    run.section("Regime diagnosis", markdown)                                       # structured report sections
    record = run.finish(model=spec.name, results=[res], meta={...})                # report.md, metrics.json

- **start** is atomic and resumable (``llmcal.runs.RunDir``): an interrupted run
  with the same configuration continues, a different one is refused unless
  ``overwrite``.  Under a launcher (torchrun, accelerate) every process joins
  the process group here and rank 0 alone touches the directory.
- **score** appends each finished batch to the predictions file, so a killed
  run loses at most one batch; a prediction that is not a distribution (a
  non-finite value, probabilities that do not add up to 1) is refused before it
  is written, and one found on resume (written by an older llmcal) is scored
  again; under several processes each scores its share
  into a partial file and rank 0 merges them in question order, so the file
  equals a single-process run's.  With ``cache=True`` (the unchanged model) a
  finished pass is stored in, and served from, the scoring cache
  (``llmcal.cache``): the same model on the same questions is scored once.
- **result** computes every metric with bootstrap intervals and draws the
  reliability diagram (rank 0).
- **finish** writes ``report.md`` (header, results, the run's sections,
  per-subject tables, diagrams, definitions), then ``metrics.json``, the file
  that marks the run complete; every process returns the finished record.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from . import distributed
from .data.schema import Question
from .errors import LlmcalError
from .io import JsonlAppender, dumps, read_jsonl_tolerant
from .predictions import Prediction, write_predictions
from .runs import RunDir, RunRecord, RunResult, load_run

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Section:
    """A titled block of Markdown in a run's report (after the results table)."""

    title: str
    body: str


def cache_enabled() -> bool:
    """``LLMCAL_SCORE_CACHE=0`` turns the scoring cache off (it is on by default)."""
    from .cache import enabled

    return enabled("scores")


class Run:
    """One run directory from start to finish (see the module docstring)."""

    def __init__(self, path: str | Path, config: dict, *, progress: bool = True):
        self.dir = RunDir(path)
        self.path = self.dir.path
        self.config = config
        self.progress = progress
        self.sections: list[Section] = []
        self.resumed = False
        self.scored_before: dict[str, int] = {}  # per predictions file: questions earlier attempts scored
        self.overwrite = False  # a damaged predictions file is then scored again instead of refused

    # ---- lifecycle -------------------------------------------------------------------
    @classmethod
    def start(cls, out: str | Path, config: dict, *, device: str = "auto", overwrite: bool = False,
              progress: bool = True, restart: bool = False) -> "Run":
        """Join the launcher's process group (if any) and start or resume the run on rank 0.

        ``restart``: an interrupted run in ``out`` is removed first, whatever its
        configuration (``calibrate --overwrite`` without ``--resume``).
        """
        from .models import resolve_device

        distributed.init(resolve_device(device))
        run = cls(out, config, progress=progress)
        run.overwrite = overwrite

        def begin() -> bool:
            return run.dir.start(config, overwrite=overwrite, restart=restart)

        resumed = distributed.on_main(begin, what=f"starting the run in {out}")
        run.resumed = bool(distributed.broadcast_object(resumed) if distributed.is_initialized() else resumed)
        return run

    def file(self, name: str) -> Path:
        return self.dir.file(name)

    def section(self, title: str, body: str) -> None:
        self.sections.append(Section(title, body))

    def on_main(self, fn: Callable[[], Any], what: str) -> Any:
        return distributed.on_main(fn, what=what)

    def finish(self, *, model: str, results: Sequence[RunResult], meta: dict | None = None,
               kind: str | None = None, confidence: dict | None = None) -> RunRecord:
        """Report and metrics.json on rank 0; every process returns the finished run.

        ``confidence``: metrics.json's top-level ``confidence`` block (llmcal.confidence.cost), when given."""
        from .report.runreport import write_run_report

        meta = meta or {}
        kind = kind or self.config.get("kind", "run")

        def write() -> RunRecord:
            from .runs import portable

            shown = [RunResult(**portable(json.loads(dumps(r.__dict__)), self.path)) for r in results]
            write_run_report(self.path, portable(json.loads(dumps(self.config)), self.path), shown,
                             portable(json.loads(dumps(meta)), self.path), sections=self.sections)
            self.dir.finish(kind=kind, model=model, results=list(results), meta=meta, confidence=confidence)
            return load_run(self.path)

        rec = distributed.on_main(write, what=f"writing the run in {self.path}")
        return rec if rec is not None else load_run(self.path)

    # ---- results -------------------------------------------------------------------
    def result(self, label: str, preds: Sequence[Prediction], *, dataset: str, split: str | None, pred_file: str,
               title: str, method: str | None = None, png: str | None = None, extra: dict | None = None) -> RunResult:
        """Every metric (``metrics_from_predictions``) and the reliability diagram of one result."""
        from .metrics import metrics_from_predictions
        from .report.plots import save_reliability

        cfg = self.config
        m = metrics_from_predictions(list(preds), n_bins=int(cfg.get("n_bins", 10)),
                                     n_bootstrap=int(cfg.get("n_bootstrap", 1000)), seed=int(cfg.get("seed", 0)))
        png = png or "reliability" + pred_file[len("predictions"):].rsplit(".", 1)[0] + ".png"
        distributed.on_main(lambda: save_reliability(m["reliability"], self.file(png), title, metrics=m),
                            what=f"writing {png}")
        return RunResult(label=label, method=method or label, dataset=dataset, split=split or "all",
                         predictions=pred_file, metrics=m, reliability=png, extra=extra or {})

    # ---- scoring -------------------------------------------------------------------
    def score(self, filename: str, loaded: Any, questions: Sequence[Question], template: str, *,
              batch_tokens: int | None = None, description: str = "scoring", cache: bool = False,
              encoded: Sequence[Any] | None = None) -> list[Prediction]:
        """Predictions for ``questions`` in their order, written to RUN/filename (see the module docstring).

        ``cache=True`` only for a model that has not been changed since it was
        loaded from its spec: the key names the weights on disk (and only for a backend whose scores may
        be cached).  On a full hit the model's weights are never read, so a lazily loaded model
        (``LoadedModel.loader``) is never loaded.
        """
        from .backends import backend_of

        backend = backend_of(loaded)
        batch_tokens = int(batch_tokens or self.config.get("batch_tokens") or 2048)
        if encoded is None:
            encoded = backend.encode(loaded, questions, template)
        store = None
        if cache and backend.cacheable and cache_enabled():
            from .cache import ScoreCache, score_key

            key = score_key(loaded, encoded, template, batch_tokens)  # None: weights unknown, not cached
            store = ScoreCache() if key is not None else None
            hit = store.get(key, [q.id for q in questions]) if store is not None else None
            if hit is not None:
                log.info("%s: %d predictions from the scoring cache", filename, len(hit))

                def write_hit() -> None:
                    write_predictions(self.file(filename), hit)
                    for p in _partial_files(self.dir, filename):  # an interrupted pass is superseded
                        p.unlink(missing_ok=True)

                distributed.on_main(write_hit, what=f"writing {filename}")
                distributed.barrier()
                return hit
        preds, self.scored_before[filename] = _score_into(
            self.dir, filename, loaded, questions, encoded, batch_tokens=batch_tokens,
            discard_damaged=self.overwrite, progress=self.progress, description=description)
        if store is not None:
            distributed.on_main(lambda: store.put(key, preds), what="storing the scores in the cache")
        return preds


# ---- the scoring pass (resumable, sharded) ---------------------------------------------
def _partial_name(filename: str, rank: int, world: int) -> str:
    stem, dot, ext = filename.rpartition(".")
    return f"{stem}.rank{rank}-of-{world}.{ext}" if dot else f"{filename}.rank{rank}-of-{world}"


def _partial_files(run: RunDir, filename: str) -> list[Path]:
    stem, dot, ext = filename.rpartition(".")
    pattern = f"{stem}.rank*-of-*.{ext}" if dot else f"{filename}.rank*-of-*"
    return sorted(run.path.glob(pattern))


def invalid_prediction(p: Prediction) -> str | None:
    """What makes ``p`` no distribution over its options, or None: every number finite, probabilities in [0, 1]
    adding up to 1, pred and answer valid options, the letter mass (served models) in [0, 1]."""
    k = len(p.probs)
    if k < 2 or len(p.logits) != k:
        return f"{len(p.logits)} logits and {k} probabilities"
    bad = [v for v in (*p.logits, *p.probs, p.conf) if not math.isfinite(v)]
    if bad:
        return f"a non-finite value ({bad[0]!r})"
    if any(not 0.0 <= v <= 1.0 for v in p.probs) or abs(math.fsum(p.probs) - 1.0) > 1e-6:
        return f"probabilities {list(p.probs)} are not a distribution"
    if not (0 <= p.pred < k and 0 <= p.answer < k):
        return f"prediction {p.pred} / answer {p.answer} outside the {k} options"
    if p.letter_mass is not None and not (math.isfinite(p.letter_mass) and 0.0 <= p.letter_mass <= 1.0):
        return f"letter mass {p.letter_mass!r} outside [0, 1]"
    if any(not 0 <= j < k for j in p.missing):
        return f"missing options {list(p.missing)} outside the {k} options"
    return None


DAMAGED = "the run cannot resume from it: pass --overwrite to score its questions again"


def _read_scored(paths: Sequence[Path], wanted: set[str]) -> dict[str, Prediction]:
    """What earlier attempts scored.  A record that is no valid prediction (an older llmcal wrote a server's
    NaN) is left out, so its question is scored again; a line that is not JSON is damage: an error."""
    have: dict[str, Prediction] = {}
    for path in paths:
        for lineno, rec in read_jsonl_tolerant(path, hint=DAMAGED, numbered=True):
            qid = rec.get("id") if isinstance(rec, dict) else None
            if not isinstance(qid, str):
                raise LlmcalError(f"{path} line {lineno}: not a prediction record (no id); {DAMAGED}")
            if qid not in wanted or qid in have:
                continue
            try:
                p = Prediction.from_dict(rec)
                problem = invalid_prediction(p)
            except (KeyError, TypeError, ValueError) as e:
                problem = f"unreadable ({type(e).__name__}: {e})"
            if problem is not None:
                log.warning("%s line %d: the prediction of %s is not valid (%s); scoring it again", path, lineno,
                            qid, problem)
                continue
            have[qid] = p
    return have


def score_loaded(loaded: Any, encoded, *, options, done=(), on_batch=None) -> list[Prediction]:
    """Score with the backend that loaded the model (``llmcal.backends``)."""
    from .backends import backend_of

    return backend_of(loaded).score(loaded, encoded, options=options, done=done, on_batch=on_batch)


def _score_into(run: RunDir, filename: str, loaded: Any, questions: Sequence[Question], encoded: Sequence[Any], *,
                discard_damaged: bool = False,
                batch_tokens: int, progress: bool, description: str) -> tuple[list[Prediction], int]:
    """Score into RUN/filename, resuming from what any earlier attempt (with any process count) finished:
    the predictions in question order, and how many of them earlier attempts had scored."""
    from .scoring import ScoreOptions

    world = distributed.current_world() if distributed.is_initialized() else distributed.World()
    path = run.file(filename)
    wanted = {q.id for q in questions}
    try:
        have = _read_scored([path, *_partial_files(run, filename)], wanted)
    except LlmcalError as e:
        if not discard_damaged:
            raise
        log.warning("%s; --overwrite: scoring every question again", e)
        distributed.barrier()  # every rank has read it before the main one removes it
        if world.is_main:
            for p in [path, *_partial_files(run, filename)]:
                p.unlink(missing_ok=True)
        distributed.barrier()
        have = {}
    scored_before = len(have)
    if have and world.is_main:
        log.info("resuming %s: %d of %d questions already scored", path, len(have), len(questions))
    if world.distributed:
        mine = run.file(_partial_name(filename, world.rank, world.world_size))
        # Keep what this rank's file holds; re-writing drops a torn last line.
        write_predictions(mine, (_read_scored([mine], wanted) if mine.exists() else {}).values())
        out_path = mine
    else:
        write_predictions(path, have.values())  # a torn last line must not break the appender
        out_path = path
    options = ScoreOptions(batch_tokens=batch_tokens, progress=progress and world.is_main,
                           description=description, shard=(world.rank, world.world_size))
    if getattr(loaded, "loader", None) is not None:  # weights loaded on first use: now, on every rank at once
        distributed.collective(lambda: loaded.model, what="loading the model")

    def run_scoring() -> None:
        with JsonlAppender(out_path) as out:
            def flush(preds: list[Prediction]) -> None:
                for p in preds:
                    problem = invalid_prediction(p)
                    if problem is not None:  # nothing invalid is ever appended: the run fails instead
                        raise LlmcalError(f"{out_path}: the scores of question {p.id} are no distribution "
                                          f"({problem}); nothing was written for it")
                    out.write(p.to_dict())
                    have[p.id] = p

            score_loaded(loaded, encoded, options=options, done=set(have), on_batch=flush)

    distributed.collective(run_scoring, what=f"scoring {filename}")
    if world.distributed:  # every rank has finished its share: read all shares back
        have = _read_scored([path, *_partial_files(run, filename)], wanted)
    missing = [q.id for q in questions if q.id not in have]
    if missing:
        raise LlmcalError(f"{path}: {len(missing)} question(s) were not scored (first: {missing[0]}); "
                          f"rerun the same command to resume")
    preds = [have[q.id] for q in questions]

    def merge() -> None:
        write_predictions(path, preds)
        for p in _partial_files(run, filename):
            p.unlink(missing_ok=True)

    distributed.barrier()  # nobody may still be reading the partial files
    distributed.on_main(merge, what=f"merging {filename}")
    return preds, scored_before
