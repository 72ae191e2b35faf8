"""Running a study: choose the cells, skip the complete ones, run the rest (one model in memory at a
time), time them, then collect the numbers and write the report.

Several processes (or nodes sharing a filesystem) may run cells of one study at once (``--only`` per
process, or the whole study in each as a worker pool).  Each cell owns its run directory, and a process
takes the run's lock (``llmcal.lock``) before it clears, checks or runs a cell: a cell another process
holds is not run here (the call ends with an LlmcalError naming it and the owner's pid, after the other
cells).  The files every process shares are written atomically (the study.yaml copy, the data/ copies:
content-addressed, the same bytes from every writer) or under the study's own lock, ``DIR/.llmcal.lock``
(``study_lock``): timings.json is read, added to and rewritten under it, and the assembling step (collect,
then study.json, the report and its figures) runs under it, so the last process to finish writes a report
that sees every finished cell.  ``report_from_dir(DIR)`` (``llmcal report DIR``) does that step alone.
"""
from __future__ import annotations

import fnmatch
import gc
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

from ..errors import LlmcalError
from ..io import atomic_write_json, atomic_write_text
from ..lock import RunLock
from ..redact import redact_text
from ..runs import clear_run_dir
from .cells import PointData, cell_config, materialise, regime_source, run_cell, run_dir
from .collect import collect
from .grid import EVAL_ROLES, IGNORED_KEYS, REGIME, TRAINING, Cell, Point, Study
from .load import load_study
from .report import write_report
from .util import fmt_time, read_json, study_lock

log = logging.getLogger(__name__)


class Context:
    """What the cells of one run_study call share: the output dir, point data, one loaded model, timings."""

    def __init__(self, study: Study, out: Path, progress: bool):
        self.study, self.out, self.progress = study, out, progress
        self.data: dict[str, PointData] = {}
        self._loaded: tuple[tuple, Any] | None = None
        self._tokenizers: dict[tuple, Any] = {}
        self.timings_path = out / "timings.json"
        self.timings = read_json(self.timings_path)

    def point(self, point: Point) -> PointData:
        if point.name not in self.data:
            self.data[point.name] = materialise(self.study, point, self.out)
        return self.data[point.name]

    def tokenizer(self, spec):
        from ..models import load_tokenizer

        key = spec.identity
        if key not in self._tokenizers:
            self._tokenizers[key] = load_tokenizer(spec)
        return self._tokenizers[key]

    def loaded(self, spec, backend: str, dtype: str, device: str):
        """One model in memory at a time; reused by every cell that scores with the same weights."""
        key = (spec.identity, backend, dtype, device)
        if self._loaded is not None and self._loaded[0] == key:
            return self._loaded[1]
        self.release()
        log.info("loading %s (%s, %s, %s)", spec.name, backend, dtype, device)
        try:
            from ..backends import load_for_backend
        except ImportError:
            from ..models import load_model

            lm = load_model(spec, dtype=dtype, device=device)
        else:
            lm = load_for_backend(spec, backend=backend, dtype=dtype, device=device)
        self._loaded = (key, lm)
        return lm

    def release(self) -> None:
        if self._loaded is not None:
            self._loaded = None
            gc.collect()

    def add_time(self, cell: Cell, seconds: float) -> None:
        """Add a cell's wall time to timings.json (read and rewritten under the study lock: other processes add theirs)."""
        with study_lock(self.out):
            self.timings = read_json(self.timings_path)
            self.timings[cell.rel] = round(float(self.timings.get(cell.rel, 0.0)) + seconds, 3)
            atomic_write_json(self.timings_path, self.timings)


def select(cells: list[Cell], only: Sequence[str] | str | None, study: Study) -> list[Cell]:
    """The cells ``--only`` names (glob patterns of ``model/method[-point]``, or model keys), in study order."""
    if only is None:
        return cells
    patterns = [only] if isinstance(only, str) else list(only)
    chosen = []
    used = set()
    for c in cells:
        for pat in patterns:
            if fnmatch.fnmatchcase(c.name, pat) or pat == c.model.key:
                chosen.append(c)
                used.add(pat)
                break
    # A regime cell follows its source cell.
    names = {c.name for c in chosen}
    for c in cells:
        if c.kind == REGIME and c not in chosen:
            src = f"{c.model.key}/{study.regime_from}" + (f"-{c.point.name}" if c.point.name else "")
            if src in names:
                chosen.append(c)
    missing = [p for p in patterns if p not in used]
    if missing:
        raise LlmcalError(f"{study.path}: --only {', '.join(missing)} matches no cell; the cells are "
                          f"{', '.join(c.name for c in cells)}")
    return [c for c in cells if c in chosen]


def _units(study: Study, cell: Cell, pd: PointData) -> float:
    """A rough cost in question scorings (a training step on a question costs about 3), for the overall ETA."""
    n = {r: len(q) for r, q in pd.questions.items()}
    evals = sum(n.get(r, 0) for r in EVAL_ROLES)
    opts = study.options(cell)
    if cell.kind == "none":
        return evals
    if cell.kind == "ts":
        return evals + n.get("calib", n.get("train", 0))
    frac = float(opts.get("heldout_fraction", 0.2))
    n_train = n.get("train", 0) * (1 - frac)
    if cell.kind == REGIME:
        return n_train
    held = n.get("train", 0) * frac
    epochs = float(opts.get("epochs", 3))
    if int(opts.get("max_steps", -1) or -1) > 0:
        steps_q = opts["max_steps"] * int(opts.get("batch_size", 4)) * int(opts.get("grad_accum", 1))
        epochs = steps_q / max(n_train, 1)
    estep = held * epochs if cell.kind in ("rcft", "auto") else 0
    drift = 200 if opts.get("drift", True) else 0
    return 2 * evals + 3 * n_train * epochs + held * (epochs + 1) + estep + drift


def _study_dir(out: str | os.PathLike) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LlmcalError(f"{out}: exists and is not a directory")
    # Dot files and data/ are another process of the same study starting at this moment (its lock, the
    # data copies it writes before study.yaml, the temporary file of that atomic copy): they do not make
    # the directory someone else's.
    if (out.is_dir() and any(not p.name.startswith(".") and p.name != "data" for p in out.iterdir())
            and not (out / "study.yaml").exists() and not (out / "runs").exists()):
        raise LlmcalError(f"{out}: directory is not empty and holds no llmcal study; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_study(config_path: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
              progress: bool = True, only: Sequence[str] | str | None = None,
              report: bool = True) -> dict[str, Path]:
    """Run (or resume) every cell of a study and write its report; returns the written files.

    ``overwrite``: rerun the selected cells from scratch.  ``only``: run just the
    cells whose name (``model/method[-point]``) matches one of these glob
    patterns, or whose model key is given (the report still covers every
    complete cell).  ``report=False``: write no study.json or report (a fan-out
    task; ``report_from_dir`` writes them once the cells are done); {} is returned.
    Keys of the result: ``md``, ``html``, ``json`` and one per figure.  Raises
    LlmcalError after writing the report when a cell failed or another process
    holds one (see the module docstring).
    """
    from ..progress import bar

    study = load_study(config_path)
    out = _study_dir(out)
    ctx = Context(study, out.resolve(), progress)

    cells = select(study.cells(), only, study)
    for point in {c.point.name: c.point for c in cells}.values():
        ctx.point(point)  # every data problem shows before any model loads
    units = {c.name: _units(study, c, ctx.point(c.point)) for c in cells}
    # What looks done now is skipped; the rest is checked again under the cell's lock when its turn comes.
    todo = [c for c in cells if overwrite or not _complete_matches(ctx, c)]
    # The copy `llmcal report DIR` reads: credentials in a URL (a served model's base_url) stay out of it.
    atomic_write_text(out / "study.yaml", redact_text(Path(config_path).read_text(encoding="utf-8")))
    done_units = sum(units[c.name] for c in cells if c not in todo)
    log.info("study %s: %d cells, %d complete, %d to run", study.name, len(cells), len(cells) - len(todo), len(todo))

    failures: list[tuple[Cell, str]] = []
    busy: list[tuple[Cell, str]] = []
    ran_units, ran_s, left = 0.0, 0.0, sum(units[c.name] for c in todo)
    with bar(f"study {study.name}", total=sum(units.values()) or None, show=progress, completed=done_units) as task:
        for i, cell in enumerate(todo, 1):
            task.update(description=f"study {study.name} [{i}/{len(todo)}] {cell.name}")
            lock = None
            try:
                lock = _claim(ctx, cell, overwrite)
                if lock is None:
                    log.info("%s: finished meanwhile by another process", cell.name)
            except _Busy as e:
                busy.append((cell, str(e)))
                log.warning("%s: not run here: %s", cell.name, e)
            except LlmcalError as e:  # completed meanwhile by another process, with another configuration
                failures.append((cell, str(e)))
                log.error("%s: %s", cell.name, e)
            if lock is None:
                left -= units[cell.name]
                task.advance(units[cell.name])
                continue
            eta = ""
            if ran_units > 0 and ran_s > 0:  # the rate so far in this session
                rate = ran_units / ran_s
                eta = f"; ~{fmt_time(units[cell.name] / rate)} for it, ~{fmt_time(left / rate)} left in all"
            log.info("[%d/%d] %s: running (about %d question scorings%s)", i, len(todo), cell.name,
                     units[cell.name], eta)
            t0 = time.monotonic()
            ok = False
            try:
                if cell.kind in TRAINING:
                    # Training may run in processes llmcal starts (train/launch.py): the first of them takes
                    # the run's lock itself, so this one lets go of it first.
                    lock.release()
                run_cell(ctx, cell)
                ok = True
            except LlmcalError as e:
                failures.append((cell, str(e)))
                log.error("%s failed: %s", cell.name, e)
            except (KeyboardInterrupt, SystemExit):
                ctx.add_time(cell, time.monotonic() - t0)
                raise
            except Exception as e:  # a bug or a crash in one cell must not lose the others
                failures.append((cell, f"{type(e).__name__}: {e}"))
                log.exception("%s crashed", cell.name)
            finally:
                _let_go(run_dir(ctx, cell).path)  # a finished run has let go of it already; a failed one not
                if cell.kind in TRAINING or cell.kind == REGIME:
                    ctx.release()
            spent = time.monotonic() - t0
            ctx.add_time(cell, spent)
            left -= units[cell.name]
            if ok:  # a cell that failed early says nothing about the rate
                ran_units, ran_s = ran_units + units[cell.name], ran_s + spent
            task.advance(units[cell.name])
    ctx.release()

    written = _assemble(ctx, failures) if report else {}
    problems = []
    if failures:
        lines = "; ".join(f"{c.name}: {msg}" for c, msg in failures)
        where = f"the report in {out} shows the complete cells; " if report else ""
        problems.append(f"{len(failures)} cell(s) of study {study.name} failed ({lines}); {where}rerun the same "
                        f"command to resume")
    if busy:
        lines = "; ".join(f"{c.name}: {msg}" for c, msg in busy)
        problems.append(f"{len(busy)} cell(s) of study {study.name} are being run by another process and were "
                        f"not run here ({lines}); once they finish, `llmcal report {out}` assembles the study")
    if problems:
        raise LlmcalError(" ".join(problems))
    return written


class _Busy(LlmcalError):
    """A cell whose run directory another process holds."""


def _claim(ctx: Context, cell: Cell, overwrite: bool) -> RunLock | None:
    """Take the cell's run lock and make its directory ready to run; None when it is complete by now.

    Under the lock: ``overwrite`` empties the directory (its lock file stays), a regime cell whose source was
    rerun is emptied, a complete run of another configuration is an error.
    """
    rd = run_dir(ctx, cell)
    try:
        lock = RunLock.acquire(rd.path)
    except LlmcalError as e:
        raise _Busy(str(e)) from None
    try:
        if overwrite:
            clear_run_dir(rd.path)
        elif rd.is_complete:
            if _complete_matches(ctx, cell):
                lock.release()
                return None
            # only a regime cell gets here: derived from its source, it is redone quietly once the source is
            # complete (until then it fails with a message that names the source)
            if run_dir(ctx, regime_source(ctx, cell)).is_complete:
                clear_run_dir(rd.path)
    except BaseException:
        lock.release()
        raise
    return lock


def _let_go(path: Path) -> None:
    """Release the run lock of ``path`` if this process still holds it."""
    from ..lock import holds

    if holds(path):
        RunLock.acquire(path).release()  # re-entrant: the lock this process holds


def _assemble(ctx: Context, failures: Sequence[tuple[Cell, str]] = (), config_file: str | None = None
              ) -> dict[str, Path]:
    """study.json, the report and its figures from what the run directories hold now, under the study lock."""
    with study_lock(ctx.out):
        ctx.timings = read_json(ctx.timings_path)
        doc = collect(ctx, failures)
        if config_file is not None:
            doc["config_file"] = config_file
        return write_report(doc, ctx.out)


def cell_status(out: str | os.PathLike, cell: Cell) -> str:
    """``done`` (a complete run), ``partial`` (started or interrupted: it resumes) or ``missing``."""
    from ..runs import RunDir

    rd = RunDir(Path(out) / cell.rel)
    return "done" if rd.is_complete else "partial" if rd.is_started else "missing"


def list_cells(config_path: str | os.PathLike, out: str | os.PathLike | None = None,
               only: Sequence[str] | str | None = None) -> list[dict]:
    """The cells of a study (those ``only`` selects), in run order: name (as ``--only`` takes it), kind, run
    directory, the cell a regime cell runs after, and with ``out`` its status there.  Loads no data or model."""
    study = load_study(config_path)
    rows = []
    for c in select(study.cells(), only, study):
        row = {"name": c.name, "kind": c.kind, "run": c.rel, "after": None, "status": None}
        if c.kind == REGIME:
            row["after"] = f"{c.model.key}/{study.regime_from}" + (f"-{c.point.name}" if c.point.name else "")
        if out is not None:
            row["status"] = cell_status(out, c)
        rows.append(row)
    return rows


def _config_diff(stored: dict, wanted: dict, run_path: Path) -> list[str]:
    """Keys whose values differ; ``wanted`` is compared as the run records it (paths portable, see runs.portable)."""
    from ..runs import portable

    wanted = portable(json.loads(json.dumps(wanted, default=str)), run_path)
    keys = [k for k in wanted if k not in IGNORED_KEYS and k in stored]
    return sorted(k for k in keys if json.loads(json.dumps(stored[k], default=str)) != wanted[k])


def _complete_matches(ctx: Context, cell: Cell) -> bool:
    """True for a complete run of this cell's config; an error for a complete run of another config (a regime
    cell of another config is not an error: it is redone)."""
    rd = run_dir(ctx, cell)
    if not rd.is_complete:
        return False
    stored = read_json(rd.file("config.json"))
    try:
        wanted = cell_config(ctx, cell)
    except LlmcalError:
        if cell.kind == REGIME:
            return False  # its source is not complete: it reruns after it
        raise
    diff = _config_diff(stored, wanted, rd.path)
    if not diff:
        return True
    if cell.kind == REGIME:  # derived from its source cell: redone quietly (_claim empties it)
        return False
    raise LlmcalError(f"{rd.path}: cell {cell.name} holds a complete run of another configuration "
                      f"({', '.join(diff)} differ); pass --overwrite to rerun it, or use another --out")


def report_from_dir(out: str | os.PathLike) -> dict[str, Path]:
    """Assemble a study from its directory (its study.yaml copy and whatever cells are finished), running nothing.

    Writes study.json, the report and its figures under the study lock, so it is safe while other processes
    still run cells (``llmcal report DIR``); loads no model.
    """
    out = Path(out)
    if not (out / "study.yaml").exists():
        raise LlmcalError(f"{out}: not a study directory (no study.yaml; `llmcal study FILE --out {out}` writes it)")
    study = load_study(out / "study.yaml")
    ctx = Context(study, out.resolve(), progress=False)
    previous = read_json(out / "study.json").get("config_file")  # the file the study was run from
    return _assemble(ctx, config_file=previous)
