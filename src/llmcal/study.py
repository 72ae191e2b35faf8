"""Studies: a grid of (model x method [x sweep point]) runs from one YAML file, and one report over it.

The library API behind ``llmcal study CONFIG.yaml --out DIR``.  A study answers
three questions about a set of models: is each one overconfident (``none``),
what does each fix do to accuracy and calibration in and out of domain (``ts``,
``cft``, ``rcft``, ``auto``), and which fix does the model need (the regime
diagnosis of DESIGN.md).

Config format
-------------
::

    name: offline                  # optional; default: the file name
    description: free text         # optional; shown in the report
    seed: 0                        # data selection (splits, limits, synthetic tasks) and every cell's seed
    defaults:                      # options for every cell (see "Options" below)
      dtype: float32
      device: cpu
    models:                        # key -> {model: NAME, options...} or just NAME
      smol: smollm2-135m-instruct
      gemma: {model: gemma3-270m, template: plain}
      sft: {model: some/sft-checkpoint, methods: [none, ts]}   # `methods`: only these cells for this model
    data:                          # roles; each is one entry or a list of entries (concatenated)
      train: {spec: mmlu, subjects: [anatomy, virology], split: train, limit: 240}
      test:  {spec: mmlu, subjects: [anatomy, virology], split: test, limit: 200}   # in-domain test
      ood:   {spec: mmlu, subjects: [marketing], limit: 200}                       # optional
      calib: ...                   # optional: TS is fitted on it (default: on data.train)
    methods:                       # key -> options; the key is the method, or give `method:` explicitly
      none: {}
      ts: {}
      cft: {epochs: 2}
      rcft: {epochs: 2, rcft_lambda: 1.0}
      cft-long: {method: cft, epochs: 5}
    sweep:                         # optional: axes -> points -> overrides; cells = product of the axes
      difficulty:
        easy: {vars: {difficulty: 1}}          # `{difficulty}` in data specs is replaced
        hard: {vars: {difficulty: 4}}
      budget:
        broad: {data: {train: {limit: 200}}, options: {epochs: 2}}
        narrow: {data: {train: {limit: 48}}, options: {epochs: 8}}
    regime: {from: cft, tolerance: 0.05}       # optional; `regime: false` turns the diagnosis off

A data entry is a dataset spec string or a mapping with ``spec`` (any spec of
``llmcal.data.load_dataset``), ``subjects``, ``split`` (a hash split of
``fractions``, default ``data.splits.TRAINING_SPLITS``: train 60% / heldout 20%
/ test 20%, so ``split: train`` and ``split: test`` of one dataset are
disjoint; the hash is of the id and ``seed + SPLIT_SALT``, independent of the
held-out slice fine-tuning takes out of ``train`` with ``seed``), ``limit``
(the same stable subset as ``load_dataset``'s) and ``mapping`` (column mapping
of local files).  Roles:
``train`` (in-domain training data; required by cft/rcft/auto), ``test``
(in-domain test; required), ``ood`` (out-of-domain test) and ``calib`` (the
questions temperature scaling is fitted on; default ``train``).  Roles must not
share question ids (``calib`` may equal ``train``); the study checks this
before any model is loaded.

Options are fields of ``llmcal.evaluate.EvalConfig`` (none, ts) or of
``llmcal.train.config.FinetuneConfig`` (cft, rcft, auto); an option in
``defaults``, a model entry or a sweep point goes to every cell whose config
has that field (``epochs`` in ``defaults`` applies to the training cells
only).  Precedence: defaults < model < method < sweep point.  Fields the study
sets itself (data, splits, limits, subjects, method, resume) are refused with
a pointer to ``data:``.

Cells and outputs
-----------------
Each (model, method[, point]) is a cell, one run directory
``DIR/runs/<model>/<method>[-<point>]``:

- ``none``: the model scored on every test role (results labelled ``none``);
- ``ts``: temperature fitted on ``calib`` (or ``train``) and applied to every
  test role (results ``none`` and ``ts``); unlike ``llmcal calibrate --method
  ts``, which fits on a slice of its own evaluation set, the fit uses
  in-domain questions that no test role contains, so every method is measured
  on exactly the same questions and the OOD result shows how an in-domain
  temperature transfers;
- ``cft``/``rcft``/``auto``: ``llmcal.train.run.run_finetune`` on ``train``,
  evaluated on every test role before (``none``) and after (the method);
- ``regime`` (one per model and point, after the ``regime.from`` cell): the
  fine-tuned model scored on the questions it was trained on; with its
  in-domain test predictions this is the diagnosis of DESIGN.md
  (``llmcal.regime.diagnose_predictions``: train accuracy - held-out accuracy
  against the tolerance, the ECE lower bound, the recommended method).

Data roles are written once per point to ``DIR/data/<hash>/<role>.jsonl`` (the
hash is of the content, so changed data means a new path and a changed cell
config).  A cell whose run is complete is skipped when its stored config
matches (else an error names the differing keys; ``overwrite`` reruns);
an interrupted cell resumes through its run's own resume (predictions on
disk, training checkpoints).  Base-model predictions are shared: a ``none`` or
``ts`` cell copies the base-model predictions that an earlier cell of the same
model scored on the same data file with the same template, dtype and device,
so each test set is scored with the base model only once per cell that must
(training cells score their own "before").  A failed cell does not stop the
others; the study raises at the end, and rerunning resumes.

Outputs: ``DIR/report.md`` and ``DIR/report.html`` (self-contained), the
figures (``reliability-<domain>[-<point>].png`` grids of rows = models, columns
= methods; ``plane*.png`` accuracy / conf-ECE planes), ``DIR/study.json`` (all
numbers; ``write_results_md`` reads it) and ``DIR/timings.json`` (wall seconds
per cell, summed over sessions).  ``report_from_dir(DIR)`` rewrites the report
without running anything; ``write_results_md([DIR, ...], "studies/RESULTS.md")``
writes the results page from the study.json files, next to the paper's numbers
(``PAPER_NUMBERS``).
"""
from __future__ import annotations

import base64
import copy
import dataclasses
import datetime as _dt
import fnmatch
import gc
import hashlib
import html
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import LlmcalError
from .io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

ROLES = ("train", "test", "ood", "calib")
EVAL_ROLES = ("test", "ood")
DOMAIN = {"test": "in-domain", "ood": "out-of-domain"}
POSTHOC = ("none", "ts")
TRAINING = ("cft", "rcft", "auto")
METHODS = POSTHOC + TRAINING
REGIME = "regime"

TOP_KEYS = ("name", "description", "seed", "defaults", "models", "data", "methods", "sweep", "regime")
DATA_KEYS = ("spec", "subjects", "split", "limit", "mapping", "fractions")
POINT_KEYS = ("vars", "data", "options")
REGIME_KEYS = ("from", "tolerance")
# Fields the study sets itself, with where to say it instead.
STUDY_SET = {
    "data": "data:", "split": "data: (split of an entry)", "subjects": "data: (subjects of an entry)",
    "limit": "data: (limit of an entry)", "mapping": "data: (mapping of an entry)",
    "calib_fraction": "data.calib (temperature scaling is fitted on data.calib or data.train)",
    "method": "methods: (the method key, or `method:` inside a method entry)",
    "train": "data.train", "evals": "data.test / data.ood", "eval_subjects": "data: (subjects of an entry)",
    "train_limit": "data.train (limit)", "eval_limit": "data.test / data.ood (limit)",
    "train_split": "data.train (split)", "eval_split": "data.test / data.ood (split)",
    "resume": "nothing: the study resumes interrupted cells itself", "model": "models:",
}
# Config keys that never decide whether a complete run matches its cell.
IGNORED_KEYS = {"created", "resume", "kind", "model_spec", "overwrite", "progress", "out"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")

# The study's hash splits (``split:`` of a data entry) hash each id with ``seed + SPLIT_SALT``: a partition
# independent of the one fine-tuning makes with ``seed`` (its held-out slice of data.train), which would
# otherwise be empty or lopsided inside a training set that is itself a ``seed`` hash split.
SPLIT_SALT = 7919

METRIC_KEYS = ("n", "accuracy", "conf_ece", "cw_ece", "brier", "nll", "mean_conf", "auroc", "em_ece", "mce")

# The paper's reference numbers as DESIGN.md states them (in-domain conf-ECE and accuracy; "cft" is the
# value after calibration-aware fine-tuning).  write_results_md places them next to the study's numbers.
PAPER_NUMBERS: dict[str, dict[str, dict[str, float]]] = {
    "Llama-3.1-8B-Tulu (DPO)": {"none": {"conf_ece": 0.1953, "accuracy": 0.6228}, "cft": {"conf_ece": 0.0239},
                                "rcft": {"conf_ece": 0.0897, "accuracy": 0.8341}},
    "Vicuna-7B": {"none": {"conf_ece": 0.1422}, "cft": {"conf_ece": 0.0379}},
    "Mistral-7B (DPO)": {"none": {"conf_ece": 0.2010}, "cft": {"conf_ece": 0.0651}},
    "OLMo2-7B (DPO)": {"none": {"conf_ece": 0.1555, "accuracy": 0.621}, "cft": {"conf_ece": 0.0544},
                       "rcft": {"accuracy": 0.851}},
}


# ---- the config --------------------------------------------------------------------------
@dataclass(frozen=True)
class DataEntry:
    spec: str
    subjects: tuple[str, ...] | None = None
    split: str | None = None
    limit: int | None = None
    mapping: dict | None = None
    fractions: dict | None = None

    def to_dict(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        if "subjects" in d:
            d["subjects"] = list(d["subjects"])
        return d


@dataclass(frozen=True)
class ModelEntry:
    key: str
    model: str
    options: dict
    methods: tuple[str, ...] | None = None


@dataclass(frozen=True)
class MethodEntry:
    key: str
    method: str
    options: dict

    @property
    def training(self) -> bool:
        return self.method in TRAINING


@dataclass(frozen=True)
class Point:
    name: str  # "" without a sweep
    vars: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)  # role -> partial entry dict, or a full replacement (list)
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Cell:
    model: ModelEntry
    method: MethodEntry | None  # None for the regime cell
    point: Point

    @property
    def kind(self) -> str:
        return self.method.method if self.method else REGIME

    @property
    def label(self) -> str:
        base = self.method.key if self.method else REGIME
        return f"{base}-{self.point.name}" if self.point.name else base

    @property
    def name(self) -> str:
        return f"{self.model.key}/{self.label}"

    @property
    def rel(self) -> str:
        return f"runs/{self.model.key}/{self.label}"


@dataclass(frozen=True)
class Study:
    path: Path
    name: str
    description: str
    seed: int
    defaults: dict
    models: tuple[ModelEntry, ...]
    data: dict  # role -> tuple[DataEntry, ...]
    methods: tuple[MethodEntry, ...]
    points: tuple[Point, ...]
    regime_from: str | None
    tolerance: float | None
    raw: dict

    def methods_of(self, model: ModelEntry) -> list[MethodEntry]:
        return [m for m in self.methods if model.methods is None or m.key in model.methods]

    def cells(self) -> list[Cell]:
        """Model-major; per point the training cells first (their base-model scores seed none/ts), then the
        regime cell, then none and ts."""
        out = []
        for model in self.models:
            methods = self.methods_of(model)
            for point in self.points:
                out += [Cell(model, m, point) for m in methods if m.training]
                if self.regime_from and any(m.key == self.regime_from for m in methods):
                    out.append(Cell(model, None, point))
                out += [Cell(model, m, point) for m in methods if not m.training]
        return out

    def options(self, cell: Cell) -> dict:
        """The merged options of a cell: defaults < model < method < sweep point."""
        opts = {**self.defaults, **cell.model.options}
        if cell.method is not None:
            opts.update(cell.method.options)
        elif self.regime_from:
            src = next(m for m in self.methods if m.key == self.regime_from)
            opts.update(src.options)
        opts.update(cell.point.options)
        return opts

    def point_data(self, point: Point) -> dict[str, tuple[DataEntry, ...]]:
        """The data roles of a point, ``{var}`` placeholders filled in.  A point's mapping for a role is merged
        into the role's (single) entry; a spec string or a list replaces the role."""
        out = dict(self.data)
        for role, ov in point.data.items():
            key = f"sweep point {point.name}: data.{role}"
            if isinstance(ov, dict) and role in out:
                if len(out[role]) != 1:
                    raise _bad(self.path, key, f"data.{role} is a list of entries; a sweep point can only replace "
                                               f"it (with a spec string or a list of entries)")
                out[role] = (_data_entry({**out[role][0].to_dict(), **ov}, self.path, key),)
            else:
                out[role] = _data_role(ov, self.path, key)
        return {role: tuple(_fill_vars(e, point, self.path, role) for e in entries) for role, entries in out.items()}


def _bad(path: Path, key: str, msg: str) -> LlmcalError:
    return LlmcalError(f"{path}: {key}: {msg}")


def _fill_vars(e: DataEntry, point: Point, path: Path, role: str) -> DataEntry:
    if "{" not in e.spec:
        return e
    try:
        spec = e.spec.format_map(point.vars)
    except KeyError as k:
        where = f"sweep point {point.name!r}" if point.name else "the study (no sweep point sets it)"
        raise _bad(path, f"data.{role}.spec", f"{e.spec!r} uses the variable {k} that {where} does not define "
                                              f"(set it under sweep: <axis>: <point>: vars:)") from None
    except (ValueError, IndexError) as x:
        raise _bad(path, f"data.{role}.spec", f"{e.spec!r}: bad placeholder ({x})") from None
    return dataclasses.replace(e, spec=spec)


def _option_fields() -> tuple[set[str], set[str] | None]:
    from .evaluate import EvalConfig

    ev = {f.name for f in dataclasses.fields(EvalConfig)}
    try:
        from .train.config import FinetuneConfig
    except ImportError:
        return ev, None
    return ev, {f.name for f in dataclasses.fields(FinetuneConfig)}


def _check_options(opts: Any, path: Path, key: str, allowed: set[str], what: str) -> dict:
    if opts is None:
        return {}
    if not isinstance(opts, dict):
        raise _bad(path, key, f"must be a mapping of option names to values, got {type(opts).__name__}")
    for name in opts:
        if not isinstance(name, str):
            raise _bad(path, f"{key}", f"option names must be strings, got {name!r}")
        if name in STUDY_SET:
            raise _bad(path, f"{key}.{name}", f"is set by the study; say it in {STUDY_SET[name]}")
        if name not in allowed:
            import difflib

            close = difflib.get_close_matches(name, sorted(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _bad(path, f"{key}.{name}", f"unknown option{hint}; {what} options are: "
                                              f"{', '.join(sorted(allowed))}")
    return dict(opts)


def _data_entry(raw: Any, path: Path, key: str) -> DataEntry:
    if isinstance(raw, str):
        raw = {"spec": raw}
    if not isinstance(raw, dict):
        raise _bad(path, key, f"a data entry is a dataset spec or a mapping with {', '.join(DATA_KEYS)}; "
                              f"got {type(raw).__name__}")
    unknown = [k for k in raw if k not in DATA_KEYS]
    if unknown:
        raise _bad(path, f"{key}.{unknown[0]}", f"unknown data key; use {', '.join(DATA_KEYS)}")
    spec = raw.get("spec")
    if not isinstance(spec, str) or not spec.strip():
        raise _bad(path, f"{key}.spec", "missing or empty: name the dataset (e.g. mmlu, a .jsonl file, "
                                        "synthetic:arithmetic?difficulty=2)")
    subjects = raw.get("subjects")
    if subjects is not None:
        if isinstance(subjects, str):
            subjects = [subjects]
        if not isinstance(subjects, list) or not subjects or not all(isinstance(s, str) and s for s in subjects):
            raise _bad(path, f"{key}.subjects", "must be a non-empty list of subject names")
        subjects = tuple(subjects)
    limit = raw.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise _bad(path, f"{key}.limit", f"must be a positive integer, got {limit!r}")
    fractions = raw.get("fractions")
    if fractions is not None:
        from .data.splits import check_fractions

        if not isinstance(fractions, dict):
            raise _bad(path, f"{key}.fractions", "must map split names to fractions that sum to 1")
        try:
            check_fractions(fractions)
        except LlmcalError as e:
            raise _bad(path, f"{key}.fractions", str(e)) from None
    split = raw.get("split")
    if split is not None:
        from .data.splits import TRAINING_SPLITS

        names = list(fractions or TRAINING_SPLITS)
        if not isinstance(split, str) or (split != "all" and split not in names):
            raise _bad(path, f"{key}.split", f"{split!r} is not a split; choose one of {', '.join(names)} or all")
        split = None if split == "all" else split
    mapping = raw.get("mapping")
    if mapping is not None and not isinstance(mapping, dict):
        raise _bad(path, f"{key}.mapping", "must map our fields (question, choices, answer, ...) to columns")
    return DataEntry(spec=spec, subjects=subjects, split=split, limit=limit, mapping=mapping, fractions=fractions)


def _data_role(raw: Any, path: Path, key: str) -> tuple[DataEntry, ...]:
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise _bad(path, key, "an empty list; give at least one data entry")
    return tuple(_data_entry(e, path, f"{key}[{i}]" if isinstance(raw, list) else key) for i, e in enumerate(items))


def _check_name(name: Any, path: Path, key: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise _bad(path, key, f"{name!r} is not a usable name (letters, digits, . _ + -; it becomes a directory)")
    return name


def load_study(path: str | os.PathLike) -> Study:
    """Read and check a study config; raises LlmcalError naming the file and the key of any problem.

    Nothing is loaded or downloaded: datasets and models are checked when the study runs.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise LlmcalError(f"{path}: cannot read the study config ({e.strerror or e})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise LlmcalError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise LlmcalError(f"{path}: a study config is a YAML mapping with keys {', '.join(TOP_KEYS)}")
    for k in raw:
        if k not in TOP_KEYS:
            raise _bad(path, str(k), f"unknown key; a study has {', '.join(TOP_KEYS)}")

    eval_fields, train_fields = _option_fields()
    any_fields = eval_fields | (train_fields or set())

    name = raw.get("name", path.stem)
    _check_name(name, path, "name")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise _bad(path, "seed", f"must be an integer, got {seed!r}")
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise _bad(path, "description", "must be text")
    defaults = _check_options(raw.get("defaults"), path, "defaults", any_fields, "cell")

    # models
    models_raw = raw.get("models")
    if not isinstance(models_raw, dict) or not models_raw:
        raise _bad(path, "models", "missing: name at least one model (key: {model: NAME, options...})")
    models = []
    for key, entry in models_raw.items():
        _check_name(key, path, f"models.{key}")
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict):
            raise _bad(path, f"models.{key}", "must be a model name or a mapping with `model:`")
        entry = dict(entry)
        model = entry.pop("model", None)
        if not isinstance(model, str) or not model.strip():
            raise _bad(path, f"models.{key}.model", "missing: an alias, hub id, local directory or GGUF file")
        only = entry.pop("methods", None)
        if only is not None:
            if isinstance(only, str):
                only = [only]
            if not isinstance(only, list) or not all(isinstance(m, str) for m in only):
                raise _bad(path, f"models.{key}.methods", "must be a list of method keys")
            only = tuple(only)
        opts = _check_options(entry, path, f"models.{key}", any_fields, "cell")
        models.append(ModelEntry(key=key, model=model, options=opts, methods=only))

    # methods
    methods_raw = raw.get("methods")
    if isinstance(methods_raw, list):  # [none, ts, cft] is allowed for methods without options
        if not all(isinstance(m, str) for m in methods_raw):
            raise _bad(path, "methods", "a list of methods must hold method names; use a mapping for options")
        methods_raw = {m: {} for m in methods_raw}
    if not isinstance(methods_raw, dict) or not methods_raw:
        raise _bad(path, "methods", f"missing: name at least one of {', '.join(METHODS)}")
    methods = []
    for key, opts in methods_raw.items():
        _check_name(key, path, f"methods.{key}")
        if key == REGIME:
            raise _bad(path, f"methods.{key}", "'regime' names the diagnosis cell; choose another key")
        opts = dict(opts or {})
        if not isinstance(opts, dict):
            raise _bad(path, f"methods.{key}", "must be a mapping of options")
        method = opts.pop("method", key)
        if method not in METHODS:
            where = f"methods.{key}.method" if "method" in (methods_raw[key] or {}) else f"methods.{key}"
            raise _bad(path, where, f"unknown method {method!r}; choose one of {', '.join(METHODS)}"
                                    + ("" if "method" in (methods_raw[key] or {})
                                       else " (or give `method:` for a method under another key)"))
        if method in TRAINING and train_fields is None:
            raise _bad(path, f"methods.{key}", f"{method} needs llmcal.train, which is not installed here")
        allowed = train_fields if method in TRAINING else eval_fields
        what = "fine-tuning (FinetuneConfig)" if method in TRAINING else "evaluation (EvalConfig)"
        opts = _check_options(opts, path, f"methods.{key}", allowed, what)
        methods.append(MethodEntry(key=key, method=method, options=opts))
    keys = {m.key for m in methods}
    for m in models:
        for k in m.methods or ():
            if k not in keys:
                raise _bad(path, f"models.{m.key}.methods", f"{k!r} is not a key of methods ({', '.join(keys)})")

    # data
    data_raw = raw.get("data")
    if not isinstance(data_raw, dict):
        raise _bad(path, "data", "missing: give at least data.test (and data.train for fine-tuning)")
    for role in data_raw:
        if role not in ROLES:
            raise _bad(path, f"data.{role}", f"unknown role; the roles are {', '.join(ROLES)}")
    data = {role: _data_role(data_raw[role], path, f"data.{role}") for role in ROLES if role in data_raw}

    # sweep
    points = _sweep(raw.get("sweep"), path, any_fields)
    roles_any = set(data) | {r for p in points for r in p.data}
    if "test" not in roles_any:
        raise _bad(path, "data.test", "missing: the in-domain test set every method is measured on")
    if "train" not in roles_any:
        for m in methods:
            if m.training:
                raise _bad(path, "data.train", f"missing: methods.{m.key} ({m.method}) trains on it")
    if "train" not in roles_any and "calib" not in roles_any:
        for m in methods:
            if m.method == "ts":
                raise _bad(path, "data.calib", f"missing: methods.{m.key} fits its temperature on data.calib "
                                               f"(or data.train when there is no calib)")

    # regime
    regime_raw = raw.get("regime", True)
    regime_from, tolerance = None, None
    if regime_raw not in (False, None):
        if regime_raw is True:
            regime_raw = {}
        if not isinstance(regime_raw, dict):
            raise _bad(path, "regime", "must be false or a mapping with from / tolerance")
        for k in regime_raw:
            if k not in REGIME_KEYS:
                raise _bad(path, f"regime.{k}", f"unknown key; use {', '.join(REGIME_KEYS)}")
        regime_from = regime_raw.get("from")
        if regime_from is None:
            regime_from = next((m.key for m in methods if m.method == "cft"), None)
        elif not any(m.key == regime_from and m.training for m in methods):
            raise _bad(path, "regime.from", f"{regime_from!r} is not a fine-tuning method key of methods")
        tolerance = regime_raw.get("tolerance")
        if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                      or not math.isfinite(tolerance) or tolerance < 0):
            raise _bad(path, "regime.tolerance", f"must be a number >= 0, got {tolerance!r}")

    study = Study(path=path, name=name, description=description.strip(), seed=seed, defaults=defaults,
                  models=tuple(models), data=data, methods=tuple(methods), points=points,
                  regime_from=regime_from, tolerance=tolerance, raw=raw)
    _check_cells(study)
    return study


def _sweep(raw: Any, path: Path, allowed: set[str]) -> tuple[Point, ...]:
    if raw is None:
        return (Point(""),)
    if not isinstance(raw, dict) or not raw:
        raise _bad(path, "sweep", "must map axis names to {point name: overrides}")
    axes = []
    for axis, pts in raw.items():
        if not isinstance(pts, dict) or not pts:
            raise _bad(path, f"sweep.{axis}", "must map point names to overrides (vars / data / options)")
        parsed = []
        for pname, ov in pts.items():
            key = f"sweep.{axis}.{pname}"
            _check_name(str(pname), path, key)
            ov = ov or {}
            if not isinstance(ov, dict):
                raise _bad(path, key, "must be a mapping with vars / data / options")
            for k in ov:
                if k not in POINT_KEYS:
                    raise _bad(path, f"{key}.{k}", f"unknown key; a sweep point has {', '.join(POINT_KEYS)}")
            pvars = ov.get("vars") or {}
            if not isinstance(pvars, dict):
                raise _bad(path, f"{key}.vars", "must map variable names to values")
            pdata = ov.get("data") or {}
            if not isinstance(pdata, dict):
                raise _bad(path, f"{key}.data", "must map roles to (partial) data entries")
            for role, entry in pdata.items():
                if role not in ROLES:
                    raise _bad(path, f"{key}.data.{role}", f"unknown role; the roles are {', '.join(ROLES)}")
                for i, e in enumerate(entry if isinstance(entry, list) else [entry]):
                    if not isinstance(e, (dict, str)):
                        raise _bad(path, f"{key}.data.{role}", "must be a (partial) data entry")
                    if isinstance(e, dict):
                        bad = [k for k in e if k not in DATA_KEYS]
                        if bad:
                            raise _bad(path, f"{key}.data.{role}.{bad[0]}", f"unknown data key; use "
                                                                             f"{', '.join(DATA_KEYS)}")
            opts = _check_options(ov.get("options"), path, f"{key}.options", allowed, "cell")
            parsed.append(Point(str(pname), dict(pvars), dict(pdata), opts))
        axes.append(parsed)
    points = [Point("")]
    for axis in axes:
        points = [Point("-".join(n for n in (p.name, q.name) if n), {**p.vars, **q.vars}, _merge_data(p.data, q.data),
                        {**p.options, **q.options}) for p in points for q in axis]
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise _bad(path, "sweep", f"point names collide ({', '.join(sorted(n for n in names if names.count(n) > 1))})")
    return tuple(points)


def _merge_data(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for role, e in b.items():
        if isinstance(e, dict) and isinstance(out.get(role), dict):
            out[role] = {**out[role], **e}
        else:
            out[role] = copy.deepcopy(e)
    return out


def _check_cells(study: Study) -> None:
    """Build every cell's config once (no data, no model), so bad values fail now, with the key."""
    for point in study.points:
        data = study.point_data(point)
        if "test" not in data:
            raise _bad(study.path, "data.test", f"missing for sweep point {point.name!r}")
        for cell in study.cells():
            if cell.point is not point:
                continue
            if cell.kind in TRAINING:
                if "train" not in data:
                    raise _bad(study.path, "data.train", f"missing for sweep point {point.name!r}")
                from .train.config import validate

                cfg = _finetune_config(study, cell, {r: f"<{r}>" for r in data}, resume=False)
                try:
                    validate(cfg)
                except LlmcalError as e:
                    raise _bad(study.path, _option_key(study, cell), str(e)) from None
            elif cell.kind in POSTHOC:
                _eval_config(study, cell, {r: f"<{r}>" for r in data})


def _option_key(study: Study, cell: Cell) -> str:
    keys = [f"methods.{cell.method.key}" if cell.method else f"regime.from"]
    if cell.point.name:
        keys.append(f"sweep point {cell.point.name}")
    return " / ".join(keys) + f" (model {cell.model.key})"


def _eval_config(study: Study, cell: Cell, paths: dict):
    from .evaluate import EvalConfig

    names = {f.name for f in dataclasses.fields(EvalConfig)}
    opts = {k: v for k, v in study.options(cell).items() if k in names}
    opts.setdefault("seed", study.seed)
    try:
        return EvalConfig(model=cell.model.model, data=str(paths["test"]), method=cell.kind, **opts)
    except TypeError as e:
        raise _bad(study.path, _option_key(study, cell), str(e)) from None


def _finetune_config(study: Study, cell: Cell, paths: dict, *, resume: bool):
    from .train.config import FinetuneConfig

    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    opts = {k: v for k, v in study.options(cell).items() if k in names}
    opts.setdefault("seed", study.seed)
    src = cell.method or next(m for m in study.methods if m.key == study.regime_from)
    evals = [str(paths[r]) for r in EVAL_ROLES if r in paths]
    return FinetuneConfig(model=cell.model.model, train=str(paths["train"]), evals=evals, method=src.method,
                          resume=resume, **opts)


# ---- data --------------------------------------------------------------------------------
@dataclass
class PointData:
    paths: dict  # role -> Path
    questions: dict  # role -> tuple[Question, ...]
    info: dict  # role -> {path, n, hash, subjects, entries}


def _materialise(study: Study, point: Point, out: Path) -> PointData:
    """Load every role of a point, check the roles are disjoint, write them as JSONL under DIR/data/<hash>/."""
    from .data import TRAINING_SPLITS, apply_split, load_dataset, take_limit
    from .io import dumps

    roles = study.point_data(point)
    where = f"sweep point {point.name}: " if point.name else ""
    paths, questions, info = {}, {}, {}
    for role, entries in roles.items():
        qs, seen = [], {}
        for i, e in enumerate(entries):
            key = f"data.{role}" + (f"[{i}]" if len(entries) > 1 else "")
            try:
                ds = load_dataset(e.spec, subjects=list(e.subjects) if e.subjects else None, seed=study.seed,
                                  mapping=e.mapping)
                selected = apply_split(ds.questions, e.split, study.seed + SPLIT_SALT, e.fractions or TRAINING_SPLITS)
                if e.limit is not None:
                    selected = take_limit(selected, e.limit, study.seed)
            except LlmcalError as x:
                raise _bad(study.path, key, f"{where}{x}") from None
            if not selected:
                raise _bad(study.path, key, f"{where}{e.spec}: no questions left after the split/subject/limit "
                                            f"filters")
            for q in selected:
                if q.id in seen:
                    raise _bad(study.path, key, f"{where}question id {q.id!r} appears twice in data.{role} "
                                                f"(entries {seen[q.id]} and {i}); make the entries disjoint")
                seen[q.id] = i
            qs += selected
        text = "".join(dumps(q.to_dict()) + "\n" for q in qs)
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
        p = (out / "data" / digest / f"{role}.jsonl").resolve()
        if not p.exists() or p.read_text(encoding="utf-8") != text:
            atomic_write_text(p, text)
        paths[role], questions[role] = p, tuple(qs)
        subjects: dict[str, int] = {}
        for q in qs:
            subjects[q.subject or "-"] = subjects.get(q.subject or "-", 0) + 1
        info[role] = {"path": _rel(p, out), "n": len(qs), "hash": digest, "subjects": subjects,
                      "options": sorted({len(q.choices) for q in qs}), "entries": [e.to_dict() for e in entries]}
    ids = {r: {q.id for q in qs} for r, qs in questions.items()}
    order = [r for r in ROLES if r in ids]
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            if {a, b} == {"train", "calib"}:
                continue
            shared = sorted(ids[a] & ids[b])
            if shared:
                raise _bad(study.path, f"data.{a} / data.{b}",
                           f"{where}share {len(shared)} question id(s) (e.g. {', '.join(shared[:5])}); roles must be "
                           f"disjoint: use different subjects or hash splits (split: train / split: test)")
    return PointData(paths=paths, questions=questions, info=info)


# ---- helpers for paths and configs -----------------------------------------------------------
_LAYOUT = re.compile(r"^.*?/((?:data/[0-9a-f]{12}/[^/]+\.jsonl)|(?:runs/.+))$")


def _rel(p: str | Path, root: Path) -> str:
    try:
        return Path(p).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(p)


def _norm(v: Any) -> Any:
    """JSON-normalised value with study paths made location independent (a moved study still matches)."""
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, str) and v.startswith("/"):
        m = _LAYOUT.match(v.replace(os.sep, "/"))
        if m:
            return "$STUDY/" + m.group(1)
    return v


def _config_diff(stored: dict, wanted: dict) -> list[str]:
    keys = [k for k in wanted if k not in IGNORED_KEYS and k in stored]
    return sorted(k for k in keys if _norm(json.loads(json.dumps(stored[k], default=str)))
                  != _norm(json.loads(json.dumps(wanted[k], default=str))))


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---- running ------------------------------------------------------------------------------
class _Context:
    """What the cells of one run_study call share: the output dir, point data, one loaded model, timings."""

    def __init__(self, study: Study, out: Path, progress: bool):
        self.study, self.out, self.progress = study, out, progress
        self.data: dict[str, PointData] = {}
        self._loaded: tuple[tuple, Any] | None = None
        self._tokenizers: dict[tuple, Any] = {}
        self.timings_path = out / "timings.json"
        self.timings = _read_json(self.timings_path)

    def point(self, point: Point) -> PointData:
        if point.name not in self.data:
            self.data[point.name] = _materialise(self.study, point, self.out)
        return self.data[point.name]

    def tokenizer(self, spec):
        from .models import load_tokenizer

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
            from .backends import load_for_backend
        except ImportError:
            from .models import load_model

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
        self.timings[cell.rel] = round(float(self.timings.get(cell.rel, 0.0)) + seconds, 3)
        atomic_write_json(self.timings_path, self.timings)


def _select(cells: list[Cell], only: Sequence[str] | str | None, study: Study) -> list[Cell]:
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


def run_study(config_path: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
              progress: bool = True, only: Sequence[str] | str | None = None) -> dict[str, Path]:
    """Run (or resume) every cell of a study and write its report; returns the written files.

    ``overwrite``: rerun the selected cells from scratch.  ``only``: run just the
    cells whose name (``model/method[-point]``) matches one of these glob
    patterns, or whose model key is given (the report still covers every
    complete cell).  Keys of the result: ``md``, ``html``, ``json`` and one per
    figure.  Raises LlmcalError after writing the report when a cell failed.
    """
    from .progress import bar

    study = load_study(config_path)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LlmcalError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "study.yaml").exists() and not (out / "runs").exists():
        raise LlmcalError(f"{out}: directory is not empty and holds no llmcal study; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    ctx = _Context(study, out.resolve(), progress)

    cells = _select(study.cells(), only, study)
    for point in {c.point.name: c.point for c in cells}.values():
        ctx.point(point)  # every data problem shows before any model loads
    units = {c.name: _units(study, c, ctx.point(c.point)) for c in cells}
    todo = []
    for c in cells:
        rd = _run_dir(ctx, c)
        if overwrite and rd.path.exists():
            shutil.rmtree(rd.path)
        if not (rd.is_complete and _complete_matches(ctx, c)):
            todo.append(c)
    atomic_write_text(out / "study.yaml", Path(config_path).read_text(encoding="utf-8"))
    done_units = sum(units[c.name] for c in cells if c not in todo)
    log.info("study %s: %d cells, %d complete, %d to run", study.name, len(cells), len(cells) - len(todo), len(todo))

    failures: list[tuple[Cell, str]] = []
    ran_units, ran_s, left = 0.0, 0.0, sum(units[c.name] for c in todo)
    with bar(f"study {study.name}", total=sum(units.values()) or None, show=progress, completed=done_units) as task:
        for i, cell in enumerate(todo, 1):
            task.update(description=f"study {study.name} [{i}/{len(todo)}] {cell.name}")
            eta = ""
            if ran_units > 0 and ran_s > 0:  # the rate so far in this session
                rate = ran_units / ran_s
                eta = f"; ~{_fmt_time(units[cell.name] / rate)} for it, ~{_fmt_time(left / rate)} left in all"
            log.info("[%d/%d] %s: running (about %d question scorings%s)", i, len(todo), cell.name,
                     units[cell.name], eta)
            t0 = time.monotonic()
            ok = False
            try:
                _run_cell(ctx, cell)
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
                if cell.kind in TRAINING or cell.kind == REGIME:
                    ctx.release()
            spent = time.monotonic() - t0
            ctx.add_time(cell, spent)
            left -= units[cell.name]
            if ok:  # a cell that failed early says nothing about the rate
                ran_units, ran_s = ran_units + units[cell.name], ran_s + spent
            task.advance(units[cell.name])
    ctx.release()

    doc = collect(ctx, failures)
    written = write_report(doc, ctx.out)
    if failures:
        lines = "; ".join(f"{c.name}: {msg}" for c, msg in failures)
        raise LlmcalError(f"{len(failures)} cell(s) of study {study.name} failed ({lines}); the report in {out} "
                          f"shows the complete cells; rerun the same command to resume")
    return written


def _run_dir(ctx: _Context, cell: Cell):
    from .runs import RunDir

    return RunDir(ctx.out / cell.rel)


def _wanted_config(ctx: _Context, cell: Cell) -> dict:
    pd = ctx.point(cell.point)
    if cell.kind in TRAINING:
        from .train.config import apply_preset

        return dataclasses.asdict(apply_preset(_finetune_config(ctx.study, cell, pd.paths, resume=False)))
    if cell.kind == REGIME:
        return _regime_config(ctx, cell)
    return _posthoc_config(ctx, cell)


def _complete_matches(ctx: _Context, cell: Cell) -> bool:
    """True for a complete run of this cell's config; an error for a complete run of another config."""
    rd = _run_dir(ctx, cell)
    stored = _read_json(rd.file("config.json"))
    try:
        wanted = _wanted_config(ctx, cell)
    except LlmcalError:
        if cell.kind == REGIME:
            return False  # its source is not complete: it reruns after it
        raise
    diff = _config_diff(stored, wanted)
    if not diff:
        return True
    if cell.kind == REGIME:  # derived from its source cell: redo it quietly
        shutil.rmtree(rd.path)
        return False
    raise LlmcalError(f"{rd.path}: cell {cell.name} holds a complete run of another configuration "
                      f"({', '.join(diff)} differ); pass --overwrite to rerun it, or use another --out")


def _run_cell(ctx: _Context, cell: Cell) -> None:
    if cell.kind in TRAINING:
        _run_training(ctx, cell)
    elif cell.kind == REGIME:
        _run_regime_cell(ctx, cell)
    else:
        _run_posthoc(ctx, cell)


# ---- training cells ---------------------------------------------------------------------
def _run_training(ctx: _Context, cell: Cell) -> None:
    from .train.run import run_finetune

    rd = _run_dir(ctx, cell)
    resume = rd.is_started and not rd.is_complete
    cfg = _finetune_config(ctx.study, cell, ctx.point(cell.point).paths, resume=resume)
    ctx.release()
    run_finetune(cfg, rd.path, overwrite=False, progress=ctx.progress)


# ---- none / ts cells --------------------------------------------------------------------
def _model_spec(cfg_model: str, gguf_file: str | None, base: str | None):
    from .models import resolve_model

    return resolve_model(cfg_model, gguf_file=gguf_file, base=base)


def _posthoc_config(ctx: _Context, cell: Cell) -> dict:
    pd = ctx.point(cell.point)
    cfg = _eval_config(ctx.study, cell, pd.paths)
    d = dataclasses.asdict(cfg)
    for k in ("data", "split", "subjects", "limit", "mapping", "calib_fraction"):
        d.pop(k, None)
    d["evals"] = {r: str(pd.paths[r]) for r in EVAL_ROLES if r in pd.paths}
    if cell.kind == "ts":
        role = "calib" if "calib" in pd.paths else "train"
        d["calib"] = {"role": role, "path": str(pd.paths[role])}
    d["kind"] = f"study-{cell.kind}"
    return d


def _device_dtype(dtype: str, device: str) -> tuple[str, str]:
    from .models import dtype_name, resolve_device, resolve_dtype

    dev = resolve_device(device)
    return dev, dtype_name(resolve_dtype(dtype, dev))


def _base_sources(ctx: _Context, cell: Cell) -> list[tuple[dict, Path]]:
    """Base-model predictions of complete cells of the same model and point: ({data, template, dtype, ...}, file)."""
    from .runs import RunDir, load_run

    found = []
    for other in ctx.study.cells():
        if other.model.key != cell.model.key or other.point.name != cell.point.name or other.kind == REGIME:
            continue
        rd = RunDir(ctx.out / other.rel)
        if not rd.is_complete or other.rel == cell.rel:
            continue
        try:
            rec = load_run(rd.path)
        except LlmcalError:
            continue
        cfg, meta = rec.config, rec.meta
        if meta.get("quantization"):
            continue
        if other.kind in TRAINING:
            paths = {Path(p).stem: p for p in cfg.get("evals") or []}
        else:
            paths = dict(cfg.get("evals") or {})
        key = {"model": cfg.get("model"), "gguf_file": cfg.get("gguf_file"), "base": cfg.get("base"),
               "backend": cfg.get("backend", "hf"), "template": meta.get("template"), "dtype": meta.get("dtype"),
               "device": meta.get("device")}
        for res in rec.results:
            if res.label == "none" and res.dataset in paths:
                found.append(({**key, "data": _norm(paths[res.dataset])}, rd.path / res.predictions))
    return found


def _score(ctx: _Context, run, filename: str, questions, *, cell: Cell, cfg, spec, template: str,
           dev_dtype: tuple[str, str], data_path: Path | None, description: str, base: bool = True):
    """Predictions for ``questions`` into RUN/filename: what is there, then a matching base-model file of
    another cell, then the model (loaded once for all cells that use it)."""
    from .evaluate import score_questions_into
    from .io import read_jsonl_tolerant
    from .predictions import Prediction, write_predictions

    path = run.file(filename)
    wanted = {q.id for q in questions}
    have = {r["id"]: r for r in read_jsonl_tolerant(path) if r.get("id") in wanted}
    if len(have) < len(wanted) and base and data_path is not None:
        key = {"model": cfg.model, "gguf_file": cfg.gguf_file, "base": cfg.base, "backend": cfg.backend,
               "template": template, "dtype": dev_dtype[1], "device": dev_dtype[0], "data": _norm(str(data_path))}
        for src_key, src in _base_sources(ctx, cell):
            if src_key == key and src.exists():
                for r in read_jsonl_tolerant(src):
                    if r.get("id") in wanted and r["id"] not in have:
                        have[r["id"]] = r
                log.info("%s: reusing base-model predictions from %s", cell.name, _rel(src, ctx.out))
                break
    if len(have) == len(wanted):
        preds = [Prediction.from_dict(have[q.id]) for q in questions]
        write_predictions(path, preds)
        return preds
    if have:
        write_predictions(path, [Prediction.from_dict(r) for r in have.values()])
    loaded = ctx.loaded(spec, cfg.backend, cfg.dtype, cfg.device)
    return score_questions_into(run, filename, loaded, questions, template, batch_tokens=cfg.batch_tokens,
                                progress=ctx.progress, description=description)


def _result(run, label: str, role: str, preds, cfg, title: str, extra: dict | None = None,
            pred_file: str | None = None):
    from .metrics import metrics_from_predictions
    from .report.plots import save_reliability
    from .runs import RunResult

    m = metrics_from_predictions(preds, n_bins=cfg.n_bins, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed)
    png = f"reliability-{label}-{role}.png"
    save_reliability(m["reliability"], run.file(png), title, metrics=m)
    if pred_file is None:
        pred_file = f"predictions-{role}.jsonl" if label == "none" else f"predictions-{label}-{role}.jsonl"
    return RunResult(label=label, method=label, dataset=role, split="all", predictions=pred_file, metrics=m,
                     reliability=png, extra=extra or {})


def _run_posthoc(ctx: _Context, cell: Cell) -> None:
    from .posthoc import TemperatureScaler, temperature_scale_predictions
    from .predictions import write_predictions
    from .prompts import resolve_template
    from .report.runreport import write_run_report

    pd = ctx.point(cell.point)
    cfg = _eval_config(ctx.study, cell, pd.paths)
    config = _posthoc_config(ctx, cell)
    spec = _model_spec(cfg.model, cfg.gguf_file, cfg.base)
    config["model_spec"] = spec.to_dict()
    rd = _run_dir(ctx, cell)
    rd.start(config, overwrite=False)
    template = resolve_template(cfg.template, ctx.tokenizer(spec))
    dev_dtype = _device_dtype(cfg.dtype, cfg.device)
    common = dict(cell=cell, cfg=cfg, spec=spec, template=template, dev_dtype=dev_dtype)
    roles = [r for r in EVAL_ROLES if r in pd.paths]
    preds = {r: _score(ctx, rd, f"predictions-{r}.jsonl", pd.questions[r], data_path=pd.paths[r],
                       description=f"{cell.name}: {DOMAIN[r]}", **common) for r in roles}
    results = [_result(rd, "none", r, preds[r], cfg, f"{spec.name}: {DOMAIN[r]} ({r})") for r in roles]
    meta = {"template": template, "dtype": dev_dtype[1], "device": dev_dtype[0],
            **{f"n_{r}": len(preds[r]) for r in roles}}
    if cell.kind == "ts":
        role = config["calib"]["role"]
        pc = _score(ctx, rd, "predictions-calib.jsonl", pd.questions[role], data_path=pd.paths[role],
                    description=f"{cell.name}: calibration set", **common)
        ts = TemperatureScaler().fit([p.logits for p in pc], [p.answer for p in pc])
        extra = {"temperature": ts.temperature_, "calib_role": role, "calib_n": len(pc),
                 "calib_nll_before": ts.nll_before_, "calib_nll_after": ts.nll_after_}
        for r in roles:
            scaled = temperature_scale_predictions(preds[r], ts.temperature_)
            write_predictions(rd.file(f"predictions-ts-{r}.jsonl"), scaled)
            results.append(_result(rd, "ts", r, scaled, cfg,
                                   f"{spec.name}: TS T={ts.temperature_:.2f}, {DOMAIN[r]} ({r})", extra))
        meta.update(extra)
    report_cfg = {**config, "data": ", ".join(f"{r}={_rel(pd.paths[r], ctx.out)}" for r in roles)}
    write_run_report(rd.path, report_cfg, results, meta)
    rd.finish(kind=f"study-{cell.kind}", model=spec.name, results=results, meta=meta)


# ---- regime cells -------------------------------------------------------------------------
def _regime_source(ctx: _Context, cell: Cell) -> Cell:
    return next(c for c in ctx.study.cells() if c.model.key == cell.model.key and c.point.name == cell.point.name
                and c.method is not None and c.method.key == ctx.study.regime_from)


def _regime_config(ctx: _Context, cell: Cell) -> dict:
    from .runs import RunDir

    src = _regime_source(ctx, cell)
    srd = RunDir(ctx.out / src.rel)
    if not srd.is_complete:
        raise LlmcalError(f"{cell.name}: needs the complete run of {src.name} (the fine-tuned model it diagnoses)")
    scfg = _read_json(srd.file("config.json"))
    smeta = _read_json(srd.file("metrics.json"))
    opts = ctx.study.options(cell)
    return {
        "kind": "study-regime", "source": src.rel, "source_finished": smeta.get("finished"),
        "model": str(srd.path / smeta.get("meta", {}).get("adapter", "adapter")),
        "train": scfg.get("train"), "heldout_fraction": scfg.get("heldout_fraction"), "seed": scfg.get("seed"),
        "template": smeta.get("meta", {}).get("template"), "dtype": opts.get("dtype", "auto"),
        "device": opts.get("device", "auto"), "backend": "hf", "batch_tokens": scfg.get("batch_tokens", 2048),
        "n_bins": scfg.get("n_bins", 10), "n_bootstrap": scfg.get("n_bootstrap", 1000),
        "tolerance": _tolerance(ctx.study, cell),
    }


def _tolerance(study: Study, cell: Cell) -> float:
    from .regime import DEFAULT_TOLERANCE

    if study.tolerance is not None:
        return float(study.tolerance)
    return float(study.options(cell).get("tolerance", DEFAULT_TOLERANCE))


def _run_regime_cell(ctx: _Context, cell: Cell) -> None:
    """The fine-tuned model on the questions it trained on, against its in-domain test predictions."""
    from .io import atomic_write_json as write_json
    from .models import resolve_model
    from .predictions import load_predictions
    from .regime import diagnose_predictions, format_diagnosis
    from .report.runreport import write_run_report
    from .runs import RunDir, load_run
    from .train.data import split_heldout

    config = _regime_config(ctx, cell)
    src = RunDir(ctx.out / config["source"])
    srec = load_run(src.path)
    pd = ctx.point(cell.point)
    trained, _ = split_heldout(pd.questions["train"], float(config["heldout_fraction"]), int(config["seed"]))
    if srec.meta.get("n_train") not in (None, len(trained)):
        raise LlmcalError(f"{src.path}: trained on {srec.meta['n_train']} questions, but the held-out rule gives "
                          f"{len(trained)}; cannot tell which questions it trained on")
    held = next((r for r in srec.results if r.label == srec.config.get("method") and r.dataset == "test"), None)
    if held is None:
        raise LlmcalError(f"{src.path}: has no in-domain test result after training; rerun {config['source']}")
    held_preds = load_predictions(src.path / held.predictions)
    spec = resolve_model(config["model"])
    config["model_spec"] = spec.to_dict()
    rd = _run_dir(ctx, cell)
    rd.start(config, overwrite=False)

    @dataclass
    class _Cfg:  # what _score and _result read
        model: str
        gguf_file: str | None
        base: str | None
        backend: str
        dtype: str
        device: str
        batch_tokens: int
        n_bins: int
        n_bootstrap: int
        seed: int

    cfg = _Cfg(config["model"], None, None, "hf", config["dtype"], config["device"], int(config["batch_tokens"]),
               int(config["n_bins"]), int(config["n_bootstrap"]), int(config["seed"]))
    preds = _score(ctx, rd, "predictions-train.jsonl", trained, cell=cell, cfg=cfg, spec=spec,
                   template=config["template"], dev_dtype=_device_dtype(cfg.dtype, cfg.device), data_path=None,
                   description=f"{cell.name}: training questions", base=False)
    d = diagnose_predictions(preds, held_preds, tolerance=config["tolerance"], n_bins=cfg.n_bins)
    write_json(rd.file("diagnosis.json"), d.to_dict())
    results = [_result(rd, "train", "train", preds, cfg, f"{srec.model} after {srec.config.get('method')}: "
                                                          f"training questions", pred_file="predictions-train.jsonl")]
    meta = {"source": config["source"], "n_trained": len(trained), "n_heldout": len(held_preds),
            "regime": d.regime, "recommended": d.recommended, "diagnosis": d.to_dict()}
    report = write_run_report(rd.path, {**config, "data": config["train"]}, results, meta)
    text = report.read_text(encoding="utf-8").rstrip("\n")
    atomic_write_text(report, f"{text}\n\n## Regime diagnosis\n\n```\n{format_diagnosis(d)}\n```\n\n{d.reason}\n")
    rd.finish(kind="study-regime", model=spec.name, results=results, meta=meta)


# ---- collecting the numbers -----------------------------------------------------------------
def _extra_ci(pred_file: Path, n_bootstrap: int, seed: int, n_bins: int) -> dict:
    """95% bootstrap intervals of cw-ECE, Brier and NLL (a run's metrics carry those of accuracy and conf-ECE)."""
    import functools

    from .metrics import bootstrap_ci, brier, classwise_ece, nll
    from .predictions import load_predictions, stack_probs

    try:
        p, a = stack_probs(load_predictions(pred_file))
    except LlmcalError:
        return {}
    fns = {"cw_ece": functools.partial(classwise_ece, n_bins=n_bins), "brier": brier, "nll": nll}
    return {k: list(bootstrap_ci(fn, p, a, n_resamples=int(n_bootstrap), seed=seed)) for k, fn in fns.items()}


def _summary(res, run_path: Path, root: Path, cfg: dict) -> dict:
    m = res.metrics or {}
    out = {k: m.get(k) for k in METRIC_KEYS}
    ci = dict(m.get("ci") or {})
    pred = run_path / res.predictions
    if pred.exists():
        ci.update(_extra_ci(pred, min(int(cfg.get("n_bootstrap") or 1000), 1000), int(cfg.get("seed") or 0),
                            int(cfg.get("n_bins") or 10)))
    out["ci"] = ci
    out["reliability"] = m.get("reliability")
    out["predictions"] = _rel(pred, root)
    out["reliability_png"] = _rel(run_path / res.reliability, root) if res.reliability else None
    return out


def _cell_entry(ctx: _Context, cell: Cell, failures: dict) -> dict:
    from .runs import RunDir, load_run

    rd = RunDir(ctx.out / cell.rel)
    e = {"name": cell.name, "model": cell.model.key, "method": cell.method.key if cell.method else REGIME,
         "kind": cell.kind, "point": cell.point.name, "run": cell.rel,
         "status": "complete" if rd.is_complete else ("incomplete" if rd.is_started else "not run")}
    if cell.name in failures:
        e["status"], e["error"] = "failed", failures[cell.name]
    wall = ctx.timings.get(cell.rel)
    if not rd.is_complete:
        e["wall_s"] = wall
        return e
    rec = load_run(rd.path)
    if wall is None:  # not timed by a study (e.g. copied in): finished - created
        try:
            wall = (_dt.datetime.fromisoformat(_read_json(rd.file("metrics.json"))["finished"])
                    - _dt.datetime.fromisoformat(rec.config["created"])).total_seconds()
        except (KeyError, TypeError, ValueError):
            wall = None
    e["wall_s"] = wall
    e["model_name"] = rec.model
    e["template"], e["dtype"], e["device"] = rec.meta.get("template"), rec.meta.get("dtype"), rec.meta.get("device")
    label = {"none": "none", "ts": "ts", REGIME: "train"}.get(cell.kind, rec.config.get("method", cell.kind))
    e["results"] = {r.dataset: _summary(r, rd.path, ctx.out, rec.config) for r in rec.results if r.label == label}
    if cell.kind in TRAINING:
        e["before"] = {r.dataset: _summary(r, rd.path, ctx.out, rec.config) for r in rec.results
                       if r.label == "none"}
        drift = rec.meta.get("alignment_drift")
        e["alignment_drift"] = drift.get("mean_kl") if isinstance(drift, dict) else None
        c = rec.config
        e["training"] = {
            "epochs": c.get("epochs"), "max_steps": c.get("max_steps"), "epochs_trained": rec.meta.get("epochs_trained"),
            "global_step": rec.meta.get("global_step"), "n_train": rec.meta.get("n_train"),
            "n_heldout": rec.meta.get("n_heldout"), "lr": c.get("lr"), "batch_size": c.get("batch_size"),
            "grad_accum": c.get("grad_accum"), "lora_r": c.get("lora_r"), "lora_alpha": c.get("lora_alpha"),
            "rcft_lambda": c.get("rcft_lambda") if cell.kind != "cft" else None, "preset": c.get("preset"),
            "train_loss": rec.meta.get("train_loss"), "estep_count": len(rec.meta.get("estep") or []),
            "rcft_switched": rec.meta.get("rcft_switched"), "regime_checks": rec.meta.get("regime_checks") or [],
            "curve": [{k: p.get(k) for k in ("epoch", "step", "heldout_accuracy", "heldout_ece", "train_loss",
                                             "rcft_on")} for p in rec.meta.get("curve") or []],
        }
    if cell.kind == "ts":
        e["temperature"] = rec.meta.get("temperature")
        e["calib_n"] = rec.meta.get("calib_n")
    if cell.kind == REGIME:
        e["diagnosis"] = rec.meta.get("diagnosis")
        e["source"] = rec.meta.get("source")
    return e


def collect(ctx: _Context, failures: Sequence[tuple[Cell, str]] = ()) -> dict:
    """Everything the report and RESULTS.md need, as one JSON-able dict (written as DIR/study.json)."""
    from . import __version__

    study = ctx.study
    fail = {c.name: msg for c, msg in failures}
    cells = [_cell_entry(ctx, c, fail) for c in study.cells()]
    data = {p.name: ctx.point(p).info for p in study.points}
    diagnoses = []
    for e in cells:
        if e["kind"] == REGIME and e.get("diagnosis"):
            diagnoses.append({"model": e["model"], "point": e["point"], "run": e["run"], "source": e["source"],
                              **e["diagnosis"], "measured": _measured(cells, e["model"], e["point"])})
    autos = [{"model": e["model"], "point": e["point"], "method": e["method"],
              "switched": e["training"]["rcft_switched"], "checks": e["training"]["regime_checks"]}
             for e in cells if e["kind"] == "auto" and e["status"] == "complete"]
    walls = [e["wall_s"] for e in cells if isinstance(e.get("wall_s"), (int, float))]
    return {
        "llmcal_version": __version__, "name": study.name, "description": study.description,
        "config": json.loads(json.dumps(study.raw, default=str)), "config_file": str(study.path), "updated": _now(), "seed": study.seed,
        "models": {m.key: {"model": m.model, "options": m.options, "methods": list(m.methods or [])}
                   for m in study.models},
        "methods": {m.key: {"method": m.method, "options": m.options} for m in study.methods},
        "points": [p.name for p in study.points], "data": data, "cells": cells, "diagnoses": diagnoses,
        "auto": autos, "wall_s_total": sum(walls) if walls else None,
    }


def _measured(cells: list[dict], model: str, point: str) -> dict:
    """In-domain conf-ECE and accuracy of each complete fine-tuning cell of a model and point."""
    out = {}
    for e in cells:
        if e["model"] == model and e["point"] == point and e["kind"] in TRAINING and e["status"] == "complete":
            r = e["results"].get("test") or {}
            out[e["method"]] = {"accuracy": r.get("accuracy"), "conf_ece": r.get("conf_ece")}
    return out


# ---- the report ------------------------------------------------------------------------------
COLUMNS_PAPER = [("id_accuracy", "ID acc"), ("id_conf_ece", "ID conf-ECE"), ("id_cw_ece", "ID cw-ECE"),
                 ("ood_accuracy", "OOD acc"), ("ood_conf_ece", "OOD conf-ECE"), ("ood_cw_ece", "OOD cw-ECE"),
                 ("drift", "drift (KL)")]
COLUMNS_DOMAIN = [("n", "N"), ("accuracy", "accuracy"), ("conf_ece", "conf-ECE"), ("cw_ece", "cw-ECE"),
                  ("brier", "Brier"), ("nll", "NLL"), ("mean_conf", "mean conf")]
PREFIX = {"test": "id", "ood": "ood"}


def method_rows(doc: dict) -> list[dict]:
    """One row per (model, point, method) with results: the none cell, or the base model as measured by the
    first fine-tuning cell ("none (before cft)") when the study has no none cell, then every other method."""
    rows = []
    for mkey in doc["models"]:
        for point in doc["points"]:
            order = list(doc["methods"])
            cells = sorted((e for e in doc["cells"] if e["model"] == mkey and e["point"] == point
                            and e["kind"] != REGIME), key=lambda e: order.index(e["method"]))
            if not cells:
                continue
            if not any(e["kind"] == "none" for e in cells):
                first = next((e for e in cells if e["kind"] in TRAINING and e.get("before")), None)
                if first is not None:
                    rows.append(_row(mkey, point, f"none (before {first['method']})", "none", first["before"],
                                     None, first))
            for e in cells:
                if e["status"] == "complete":
                    rows.append(_row(mkey, point, e["method"], e["kind"], e["results"], e.get("alignment_drift"), e))
                else:
                    rows.append({"model": mkey, "point": point, "method": e["method"], "kind": e["kind"],
                                 "status": e["status"], "results": {}})
    return rows


def _row(model: str, point: str, method: str, kind: str, results: dict, drift, cell: dict) -> dict:
    row = {"model": model, "point": point, "method": method, "kind": kind, "status": "complete",
           "results": results, "drift": drift, "run": cell["run"]}
    for role, pre in PREFIX.items():
        r = results.get(role) or {}
        for k in ("n", "accuracy", "conf_ece", "cw_ece", "brier", "nll", "mean_conf"):
            row[f"{pre}_{k}"] = r.get(k)
            ci = (r.get("ci") or {}).get(k)
            if ci is not None:
                row[f"{pre}_{k}_ci"] = ci
    return row


def _domain_rows(rows: list[dict], role: str) -> list[dict]:
    out = []
    for r in rows:
        res = r["results"].get(role)
        if not res:
            continue
        d = {"model": r["model"], "point": r["point"], "method": r["method"]}
        for k, _ in COLUMNS_DOMAIN:
            d[k] = res.get(k)
            if (res.get("ci") or {}).get(k) is not None:
                d[f"{k}_ci"] = res["ci"][k]
        out.append(d)
    return out


class _Doc:
    """Blocks rendered both as Markdown and as self-contained HTML."""

    def __init__(self, root: Path):
        self.root = root
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: Sequence[str]) -> None:
        if items:
            self.blocks.append(("ul", list(items)))

    def table(self, rows: list[dict], columns: list) -> None:
        if rows:
            self.blocks.append(("table", rows, columns))

    def img(self, rel: str, alt: str, caption: str = "") -> None:
        self.blocks.append(("img", rel, alt, caption))

    def markdown(self) -> str:
        from .report.tables import markdown_table

        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "ul":
                out.append("\n".join(f"- {i}" for i in b[1]))
            elif b[0] == "table":
                out.append(markdown_table(b[1], b[2]).rstrip("\n"))
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1]})" + (f"\n\n*{b[3]}*" if b[3] else ""))
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        from .report.tables import html_table

        e = html.escape
        parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
                 f"<title>{e(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>"]
        for b in self.blocks:
            if b[0] == "h":
                parts.append(f"<h{b[1]}>{_inline_html(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                parts.append(f"<p>{_inline_html(b[1])}</p>")
            elif b[0] == "ul":
                parts.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b[1]) + "</ul>")
            elif b[0] == "table":
                parts.append(html_table(b[1], b[2]))
            elif b[0] == "img":
                data = base64.b64encode((self.root / b[1]).read_bytes()).decode("ascii")
                parts.append(f'<figure><img alt="{e(b[2])}" src="data:image/png;base64,{data}">'
                             + (f"<figcaption>{_inline_html(b[3])}</figcaption>" if b[3] else "") + "</figure>")
        parts += ["</body>", "</html>", ""]
        return "\n".join(parts)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1250px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1, h2, h3 { font-weight: 600; }
table { border-collapse: collapse; margin: 1em 0; font-size: .88em; }
th, td { border: 1px solid #ccc; padding: .3em .55em; text-align: left; }
th { background: #f2f2f2; } td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafafa; }
img { max-width: 100%; height: auto; } figure { margin: 1em 0; } figcaption { font-size: .88em; color: #555; }
code { background: #f4f4f4; padding: 0 .2em; }
"""


def _inline_html(text: str) -> str:
    s = html.escape(text)
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    s = re.sub(r"`(.+?)`", r"<code>\1</code>", s)
    return re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<i>\1</i>", s)


def _fmt(x: Any, nd: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def _fmt_time(s: Any) -> str:
    if not isinstance(s, (int, float)):
        return "—"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _groups(doc: dict) -> list[tuple[str, str]]:
    return [(m, p) for m in doc["models"] for p in doc["points"]
            if any(e["model"] == m and e["point"] == p for e in doc["cells"])]


def _group_label(model: str, point: str) -> str:
    return f"{model} · {point}" if point else model


def _figures(doc: dict, rows: list[dict], root: Path) -> dict[str, Path]:
    from .report.plots import reliability_grid

    written: dict[str, Path] = {}
    for old in [*root.glob("plane*.png"), *root.glob("reliability-*.png")]:
        old.unlink()  # figures of an earlier version of the study must not linger
    groups = _groups(doc)
    method_cols: list[str] = []
    for r in rows:
        if r["method"] not in method_cols and r["status"] == "complete":
            method_cols.append(r["method"])
    for role in EVAL_ROLES:
        grid, labels = [], []
        for m, p in groups:
            line = []
            for col in method_cols:
                r = next((r for r in rows if (r["model"], r["point"], r["method"]) == (m, p, col)), None)
                res = (r or {}).get("results", {}).get(role)
                line.append((col, {**res, "ci": res.get("ci")}) if res and res.get("reliability") else None)
            if any(c is not None for c in line):
                grid.append(line)
                labels.append(_group_label(m, p))
        if grid:
            name = f"reliability-{DOMAIN[role]}.png"
            written[f"grid:{role}"] = reliability_grid(None, root / name, grid=grid, row_labels=labels,
                                                       title=f"{doc['name']}: {DOMAIN[role]} ({role})")
    diag = {(d["model"], d["point"]): d for d in doc["diagnoses"]}
    # One plane with every run (in-domain and OOD), then one per model and point with its regime boundary.
    points = []
    for r in rows:
        for role in EVAL_ROLES:
            res = r["results"].get(role)
            if res and res.get("accuracy") is not None:
                points.append({"label": r["method"], "accuracy": res["accuracy"], "conf_ece": res["conf_ece"],
                               "group": f"{_group_label(r['model'], r['point'])}, {DOMAIN[role]}",
                               "ci": res.get("ci"), "_key": (r["model"], r["point"])})
    if points:
        only = list(diag.values())[0] if len(diag) == 1 else None
        written["plane"] = _plane(points, root / "plane.png", only, f"{doc['name']}: every run")
        for m, p in groups if len(groups) > 1 else []:
            pts = [x for x in points if x["_key"] == (m, p)]
            if pts and (m, p) in diag:
                name = "plane-" + re.sub(r"[^A-Za-z0-9._-]+", "-", _group_label(m, p).replace(" · ", "-")) + ".png"
                written[f"plane:{m}:{p}"] = _plane(pts, root / name, diag[(m, p)],
                                                   f"{_group_label(m, p)}: accuracy vs conf-ECE")
    return written


def _plane(points: list[dict], path: Path, d: dict | None, title: str) -> Path:
    from .report.plots import accuracy_ece_plane

    pts = [{k: v for k, v in x.items() if k != "_key"} for x in points]
    if d is None:
        return accuracy_ece_plane(pts, path, title=title)
    a = float(d["train_accuracy"])
    return accuracy_ece_plane(pts, path, boundary=lambda x: max(a - x, 0.0),
                              boundary_label=f"SFT bound: train acc {a:.2f} − accuracy", title=title)


def write_report(doc: dict, root: Path) -> dict[str, Path]:
    """DIR/report.md, DIR/report.html (self-contained), the figures and DIR/study.json from ``collect``'s dict."""
    root = Path(root)
    rows = method_rows(doc)
    figs = _figures(doc, rows, root)
    doc = {**doc, "figures": {k: _rel(v, root) for k, v in figs.items()}}
    atomic_write_json(root / "study.json", doc)
    has_point = any(doc["points"])
    has_ood = any(r["results"].get("ood") for r in rows)
    ident = [("model", "model")] + ([("point", "point")] if has_point else []) + [("method", "method")]

    r = _Doc(root)
    r.h(1, f"llmcal study `{doc['name']}`")
    if doc["description"]:
        r.p(doc["description"])
    done = sum(e["status"] == "complete" for e in doc["cells"])
    cfg_name = Path(doc["config_file"]).name
    r.ul([f"**config**: `{cfg_name}`" + (" (copied to `study.yaml`)" if cfg_name != "study.yaml" else ""),
          f"**models**: " + "; ".join(f"{k} = `{v['model']}`" for k, v in doc["models"].items()),
          f"**methods**: " + ", ".join(f"{k} ({v['method']})" if k != v["method"] else k
                                       for k, v in doc["methods"].items()),
          f"**cells**: {done} of {len(doc['cells'])} complete; total wall time {_fmt_time(doc['wall_s_total'])}",
          f"**llmcal** {doc['llmcal_version']}; updated {doc['updated']}"])
    missing = [e for e in doc["cells"] if e["status"] != "complete"]
    if missing:
        r.p("**Not complete**: " + "; ".join(f"{e['name']} ({e['status']}"
                                               + (f": {e['error']}" if e.get("error") else "") + ")"
                                               for e in missing))

    r.h(2, "Results (the paper's layout)")
    r.p("Per model and method: in-domain (ID, `data.test`) and out-of-domain (OOD, `data.ood`) accuracy, "
        "conf-ECE and cw-ECE with 95% bootstrap intervals, and the alignment drift of the fine-tuned models "
        "(mean per-token KL between the original and the calibrated model on the original's greedy answers "
        "to the shipped instruction prompts; none and ts do not change the model's generations).")
    cols = ident + ([c for c in COLUMNS_PAPER] if has_ood else [c for c in COLUMNS_PAPER if not c[0].startswith("ood")])
    r.table([x for x in rows if x["status"] == "complete"], cols)
    for role in EVAL_ROLES:
        drows = _domain_rows(rows, role)
        if drows:
            r.h(3, f"{DOMAIN[role].capitalize()} ({role}): all metrics")
            r.table(drows, ident + COLUMNS_DOMAIN)

    r.h(2, "Reliability diagrams")
    for role in EVAL_ROLES:
        if f"grid:{role}" in figs:
            r.img(_rel(figs[f"grid:{role}"], root), f"reliability grid {DOMAIN[role]}",
                  f"{DOMAIN[role].capitalize()}: rows are models"
                  + (" and sweep points" if has_point else "") + ", columns methods. Bars: accuracy per "
                  "confidence bin; dashed: perfect calibration; red: overconfidence; green: underconfidence.")

    r.h(2, "Accuracy vs conf-ECE")
    if "plane" in figs:
        diags = doc["diagnoses"]
        if len(diags) == 1:
            text = _boundary_caption(diags[0])
        elif diags:
            text = "Each model's regime boundary is drawn in its own plane below."
        else:
            text = "No regime boundary: nothing was diagnosed (see Regime diagnosis)."
        r.img(_rel(figs["plane"], root), "accuracy-ECE plane",
              f"Every run, in-domain and OOD, with 95% intervals. {text}")
    for key, p in figs.items():
        if key.startswith("plane:"):
            _, m, pt = key.split(":", 2)
            d = next(x for x in doc["diagnoses"] if x["model"] == m and x["point"] == pt)
            r.img(_rel(p, root), f"accuracy-ECE plane {_group_label(m, pt)}",
                  f"{_group_label(m, pt)}. {_boundary_caption(d)}")

    r.h(2, "Regime diagnosis")
    if doc["diagnoses"]:
        r.p("For each model, the fine-tuned model (the `regime.from` cell) is scored on the questions it was "
            "trained on; train accuracy − in-domain test accuracy is the gap. Within the tolerance the model is "
            "*calibratable* (CFT suffices); above it *non-calibratable* (RCFT recommended). The last columns "
            "are what the fine-tuning cells actually measured on the in-domain test set.")
        drows = []
        for d in doc["diagnoses"]:
            row = {"model": d["model"], "point": d["point"], "from": d["source"].split("/")[-1],
                   "train acc": d["train_accuracy"], "held-out acc": d["heldout_accuracy"],
                   "held-out ECE": d["heldout_ece"], "gap": d["gap"], "ECE bound": d["ece_lower_bound"],
                   "tolerance": d["tolerance"], "regime": d["regime"], "recommended": d["recommended"]}
            for meth, v in d["measured"].items():
                row[f"{meth} ECE"] = v.get("conf_ece")
            drows.append(row)
        keys = []
        for row in drows:
            keys += [k for k in row if k not in keys]
        if not has_point:
            keys.remove("point")
        r.table(drows, keys)
        r.ul([f"**{_group_label(d['model'], d['point'])}**: {d['reason']}" for d in doc["diagnoses"]])
    else:
        r.p("No diagnosis: the study has no fine-tuning cell to diagnose (add cft, or set `regime.from`).")
    if doc["auto"]:
        items = []
        for a in doc["auto"]:
            sw = a["switched"]
            what = (f"RCFT term switched on at epoch {sw['epoch']:.2f} (step {sw['step']}): {sw['reason']}" if sw
                    else "stayed in the calibratable regime; CFT throughout")
            items.append(f"**{_group_label(a['model'], a['point'])}** ({a['method']}): {what}; "
                         f"{len(a['checks'])} regime check(s)")
        r.p("Auto mode:")
        r.ul(items)

    r.h(2, "Sizes and time")
    srows = []
    for pname, roles in doc["data"].items():
        for role, info in roles.items():
            subj = info["subjects"]
            srows.append({"point": pname, "role": role, "questions": info["n"], "subjects": len(subj),
                          "data": "; ".join(_entry_text(e) for e in info["entries"]), "file": info["path"]})
    scols = ([("point", "point")] if has_point else []) + [("role", "role"), ("questions", "questions"),
                                                           ("subjects", "subjects"), ("data", "selection"),
                                                           ("file", "file")]
    r.table(srows, scols)
    crows = []
    for e in doc["cells"]:
        t = e.get("training") or {}
        crows.append({"cell": e["name"], "status": e["status"], "wall time": _fmt_time(e.get("wall_s")),
                      "train q": t.get("n_train"), "held-out q": t.get("n_heldout"), "epochs": t.get("epochs"),
                      "steps": t.get("global_step"), "T": e.get("temperature"), "template": e.get("template"),
                      "dtype": e.get("dtype")})
    r.table(crows, ["cell", "status", "wall time", "train q", "held-out q", "epochs", "steps", "T", "template",
                    "dtype"])
    for pname, roles in doc["data"].items():
        for role, info in roles.items():
            if len(info["subjects"]) > 1:
                lst = ", ".join(f"{s} ({n})" for s, n in sorted(info["subjects"].items()))
                r.p(f"Subjects of {role}" + (f" ({pname})" if pname else "") + f": {lst}.")

    from .report.runreport import DEFINITIONS

    r.h(2, "Definitions")
    r.p(DEFINITIONS)
    written = dict(figs)
    written["md"] = atomic_write_text(root / "report.md", r.markdown())
    written["html"] = atomic_write_text(root / "report.html", r.html(f"llmcal study {doc['name']}"))
    written["json"] = root / "study.json"
    return written


def _boundary_caption(d: dict) -> str:
    return (f"The dashed line is the regime boundary of DESIGN.md for {_group_label(d['model'], d['point'])}: "
            f"conf-ECE = max(a_train − accuracy, 0) with a_train = {d['train_accuracy']:.3f}, the accuracy its "
            f"{d['source'].split('/')[-1]} model reached on its own training questions. ECE ≥ |mean confidence − "
            f"accuracy| always, and a model fine-tuned to its SFT fixed point has mean confidence ≈ its training "
            f"accuracy, so such a model cannot sit below the line on unseen questions; RCFT's ECE term is what "
            f"can take a fine-tuned model below it. A gap above the tolerance ({d['tolerance']:.2f}) is the "
            f"non-calibratable regime.")


def _entry_text(e: dict) -> str:
    s = e["spec"]
    bits = []
    if e.get("subjects"):
        bits.append(f"{len(e['subjects'])} subjects")
    if e.get("split"):
        bits.append(f"split {e['split']}")
    if e.get("limit"):
        bits.append(f"limit {e['limit']}")
    return s + (f" ({', '.join(bits)})" if bits else "")


def report_from_dir(out: str | os.PathLike) -> dict[str, Path]:
    """Rewrite a study's report from its directory (its study.yaml and runs), running nothing."""
    out = Path(out)
    if not (out / "study.yaml").exists():
        raise LlmcalError(f"{out}: not a study directory (no study.yaml)")
    study = load_study(out / "study.yaml")
    ctx = _Context(study, out.resolve(), progress=False)
    doc = collect(ctx)
    doc["config_file"] = _read_json(out / "study.json").get("config_file", doc["config_file"])
    return write_report(doc, ctx.out)


# ---- RESULTS.md -----------------------------------------------------------------------------
def write_results_md(study_dirs: Sequence[str | os.PathLike], path: str | os.PathLike,
                     paper_numbers: dict | None = None) -> Path:
    """Write ``studies/RESULTS.md`` from the committed study outputs (each DIR/study.json).

    Every number comes from a study.json, except ``paper_numbers`` (default
    ``PAPER_NUMBERS``: ``{model: {method: {metric: value}}}``, the paper's values
    as DESIGN.md gives them).  Prose the lead writes goes where the ``<!-- edit:``
    placeholders are; the "Observations" bullets are computed from the numbers.
    """
    path = Path(path)
    paper = PAPER_NUMBERS if paper_numbers is None else paper_numbers
    kept = _prose_blocks(path.read_text(encoding="utf-8")) if path.exists() else {}

    def prose(key: str, placeholder: str) -> list[str]:
        """A hand-written block: what the file already holds under this key, else the placeholder."""
        body = kept.get(key) or f"<!-- edit: {placeholder} -->"
        return [f"<!-- prose:{key} -->", body, f"<!-- /prose:{key} -->"]

    docs = []
    for d in study_dirs:
        p = Path(d) / "study.json"
        if not p.exists():
            raise LlmcalError(f"{d}: no study.json; run `llmcal study CONFIG --out {d}` first")
        docs.append((Path(d), json.loads(p.read_text(encoding="utf-8"))))

    lines = ["# Results", "",
             "<!-- Generated by llmcal.study.write_results_md from " + ", ".join(f"{d}/study.json" for d, _ in docs)
             + ". Numbers are not typed by hand: rerun the studies and regenerate. "
               "Edit only between prose markers: regenerating keeps those blocks. -->", ""]
    lines += prose("summary", "one paragraph: what was run, on what hardware, and the headline finding.") + [""]

    lines += ["## The paper's numbers (DESIGN.md)", "",
              "In-domain (MMLU + MedMCQA + OpenBookQA), 7–8B aligned models, 3,000 training questions, "
              "QLoRA r=128, 5 epochs.", ""]
    from .report.tables import markdown_table

    prow = [_side_row(f"paper: {model}", by) for model, by in paper.items()]
    lines += [markdown_table(prow, SIDE_COLUMNS) if prow else "(none given)", ""]

    for d, doc in docs:
        rel = os.path.relpath(d, path.parent)
        rows = [r for r in method_rows(doc) if r["status"] == "complete"]
        has_point = any(doc["points"])
        has_ood = any(r["results"].get("ood") for r in rows)
        ident = ["model"] + (["point"] if has_point else []) + ["method"]
        lines += [f"## Study `{doc['name']}`", ""]
        if doc.get("description"):
            lines += [doc["description"], ""]
        lines += [f"Report: [{rel}/report.md]({rel}/report.md) ([HTML]({rel}/report.html)); "
                  f"total wall time {_fmt_time(doc.get('wall_s_total'))}.", ""]
        lines += ["Models: " + "; ".join(f"{k} = `{v['model']}`" for k, v in doc["models"].items()) + ".", ""]
        sizes = []
        for pname, roles in doc["data"].items():
            sizes.append((f"{pname}: " if pname else "") + ", ".join(f"{r} {i['n']}" for r, i in roles.items()))
        lines += ["Questions per role: " + "; ".join(sizes) + ".", ""]
        cols = [(c, c) for c in ident] + [c for c in COLUMNS_PAPER if has_ood or not c[0].startswith("ood")]
        lines += [markdown_table(rows, cols), ""]
        side = []
        for m in doc["models"]:
            for point in doc["points"]:
                by: dict = {}
                for r in rows:
                    if r["model"] == m and r["point"] == point and r["kind"] in ("none", "cft", "rcft"):
                        by.setdefault(r["kind"], {"conf_ece": r["id_conf_ece"], "accuracy": r["id_accuracy"]})
                if by:
                    side.append(_side_row(_group_label(m, point), by))
        if side:
            lines += ["Next to the paper (in-domain; \"aligned\" is the model as given):", "",
                      markdown_table(side + prow, SIDE_COLUMNS), ""]
        if doc["diagnoses"]:
            lines += ["Regime diagnosis (after the `regime.from` fine-tuning):", ""]
            drows = [{"model": x["model"], **({"point": x["point"]} if has_point else {}),
                      "train acc": x["train_accuracy"], "test acc": x["heldout_accuracy"], "gap": x["gap"],
                      "regime": x["regime"], "recommended": x["recommended"],
                      **{f"{k} ECE": v.get("conf_ece") for k, v in x["measured"].items()}} for x in doc["diagnoses"]]
            keys = []
            for row in drows:
                keys += [k for k in row if k not in keys]
            lines += [markdown_table(drows, keys), ""]
        for key in ("grid:test", "grid:ood", "plane"):
            fig = (doc.get("figures") or {}).get(key)
            if fig:
                lines += [f"![{key}]({rel}/{fig})", ""]
        obs = observations(doc, paper)
        if obs:
            lines += ["Observations (computed from the numbers above):", ""] + [f"- {o}" for o in obs] + [""]
        lines += prose(f"study:{doc['name']}", f"where {doc['name']} differs from the paper's 7-8B models and "
                       f"why (model size, accuracy near chance, data size, training budget).") + [""]
    return atomic_write_text(path, "\n".join(lines).rstrip("\n") + "\n")


_PROSE = re.compile(r"<!-- prose:(?P<key>[^ ]+) -->\n(?P<body>.*?)\n<!-- /prose:(?P=key) -->", re.S)


def _prose_blocks(text: str) -> dict[str, str]:
    """The hand-written blocks of an existing RESULTS.md, by key (placeholders left out)."""
    return {m["key"]: m["body"] for m in _PROSE.finditer(text) if not m["body"].startswith("<!-- edit:")}


SIDE_COLUMNS = [("model", "model"), ("none_ece", "aligned conf-ECE"), ("cft_ece", "CFT conf-ECE"),
                ("rcft_ece", "RCFT conf-ECE"), ("none_acc", "aligned acc"), ("cft_acc", "CFT acc"),
                ("rcft_acc", "RCFT acc")]


def _side_row(name: str, by: dict) -> dict:
    row = {"model": name}
    for m in ("none", "cft", "rcft"):
        row[f"{m}_ece"] = _get(by, m, "conf_ece")
        row[f"{m}_acc"] = _get(by, m, "accuracy")
    return row


def _get(by: dict, method: str, metric: str):
    return (by.get(method) or {}).get(metric)


def observations(doc: dict, paper: dict | None = None) -> list[str]:
    """Statements that follow from a study's numbers (no judgement typed by hand)."""
    out = []
    rows = [r for r in method_rows(doc) if r["status"] == "complete"]
    ece_paper = [v["none"]["conf_ece"] for v in (paper or {}).values() if _get(v, "none", "conf_ece") is not None]
    for m in doc["models"]:
        for point in doc["points"]:
            mine = [r for r in rows if r["model"] == m and r["point"] == point]
            base = next((r for r in mine if r["kind"] == "none"), None)
            if base is None:
                continue
            who = _group_label(m, point)
            acc, ece = base.get("id_accuracy"), base.get("id_conf_ece")
            mc = base.get("id_mean_conf")
            if acc is not None and ece is not None:
                k = _n_options(doc, point)
                chance = f"; chance is {1 / k:.2f} with {k} options" if k else ""
                lo = (base.get("id_accuracy_ci") or [None])[0]
                near = (" — its interval reaches chance" if k and lo is not None and lo <= 1 / k else "")
                direction = ("overconfident" if mc is not None and mc > acc else "underconfident")
                out.append(f"{who}: in-domain accuracy {acc:.3f}{chance}{near}; conf-ECE {ece:.3f}, mean "
                           f"confidence {mc:.3f} ({direction})"
                           + (f"; the paper's aligned models start at conf-ECE {min(ece_paper):.2f}–"
                              f"{max(ece_paper):.2f}" if ece_paper else "") + ".")
            for r in mine:
                if r is base or r["id_conf_ece"] is None or ece is None:
                    continue
                dacc = (r["id_accuracy"] - acc) if acc is not None and r["id_accuracy"] is not None else None
                s = (f"{who}, {r['method']}: in-domain conf-ECE {ece:.3f} → {r['id_conf_ece']:.3f}, accuracy "
                     f"{'unchanged' if dacc is not None and abs(dacc) < 1e-9 else f'{dacc:+.3f}' if dacc is not None else '—'}")
                if base.get("ood_conf_ece") is not None and r.get("ood_conf_ece") is not None:
                    s += f"; OOD conf-ECE {base['ood_conf_ece']:.3f} → {r['ood_conf_ece']:.3f}"
                out.append(s + ".")
    for d in doc.get("diagnoses", []):
        meas = d.get("measured") or {}
        s = (f"{_group_label(d['model'], d['point'])}: after {d['source'].split('/')[-1]} train accuracy "
             f"{d['train_accuracy']:.3f} vs test {d['heldout_accuracy']:.3f} (gap {d['gap']:+.3f}): "
             f"{d['regime']}, recommends {d['recommended']}")
        eces = {k: v.get("conf_ece") for k, v in meas.items() if v.get("conf_ece") is not None}
        if len(eces) > 1:
            best = min(eces, key=eces.get)
            s += f"; lowest measured in-domain conf-ECE: {best} ({eces[best]:.3f})"
        out.append(s + ".")
    return out


def _n_options(doc: dict, point: str) -> int | None:
    """The number of options when every in-domain test question has the same number (else None)."""
    ks = ((doc.get("data") or {}).get(point) or {}).get("test", {}).get("options") or []
    return ks[0] if len(ks) == 1 else None
