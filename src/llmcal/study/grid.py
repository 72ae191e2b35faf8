"""The loaded study: its entries, sweep points and cells, each cell's merged options and run config.

``schema.load_study`` builds a ``Study`` from the YAML file; everything after loading (the runner,
the cells, the report) reads these small frozen dataclasses, never the YAML.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LlmcalError

ROLES = ("train", "test", "ood", "calib")
EVAL_ROLES = ("test", "ood")
DOMAIN = {"test": "in-domain", "ood": "out-of-domain"}
POSTHOC = ("none", "ts")
TRAINING = ("cft", "rcft", "auto")
METHODS = POSTHOC + TRAINING
REGIME = "regime"

TOP_KEYS = ("name", "description", "seed", "defaults", "models", "data", "methods", "sweep", "regime", "posthoc",
            "conformal")
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

# A data entry's ``split:`` is a named split (data.splits.SPLITS, hashed with seed + SPLIT_SALT): the same
# questions as ``llmcal eval --split`` for the same seed, independent of fine-tuning's held-out slice.
from ..data.splits import SPLIT_SALT  # noqa: E402,F401  (re-exported)

METRIC_KEYS = ("n", "accuracy", "conf_ece", "cw_ece", "brier", "nll", "mean_conf", "auroc", "em_ece", "mce")


def bad(path: Path, key: str, msg: str) -> LlmcalError:
    """The error for a problem of the study config: the file, the key path, what is wrong."""
    return LlmcalError(f"{path}: {key}: {msg}")


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
    # point name -> role -> entries: the data of each point, overrides merged and {var}s filled in at load
    point_roles: dict = field(default_factory=dict, repr=False)
    # post-hoc methods fitted on each ts cell's stored predictions (study.posthoc); () = none
    posthoc: tuple[str, ...] = ()
    # conformal sets on every cell's stored predictions (study.conformal): {"alpha", "score"}, None = off
    conformal: dict | None = None

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
        """The data roles of a point: the study's, with the point's overrides and ``{var}`` values applied."""
        return dict(self.point_roles[point.name])


def option_key(study: Study, cell: Cell) -> str:
    """Where a cell's options come from, for an error message."""
    keys = [f"methods.{cell.method.key}" if cell.method else "regime.from"]
    if cell.point.name:
        keys.append(f"sweep point {cell.point.name}")
    return " / ".join(keys) + f" (model {cell.model.key})"


def eval_config(study: Study, cell: Cell, paths: dict):
    """The ``EvalConfig`` of a none/ts cell (its ``data`` is the in-domain test file)."""
    from ..evaluate import EvalConfig

    names = {f.name for f in dataclasses.fields(EvalConfig)}
    opts = {k: v for k, v in study.options(cell).items() if k in names}
    opts.setdefault("seed", study.seed)
    for k in ("permutations", "pride_fraction"):  # llmcal eval only: a none/ts cell would silently ignore them
        if k in opts:
            raise bad(study.path, option_key(study, cell), f"{k}: option-order debiasing is a llmcal eval option "
                                                           f"(--permutations), not one of a study's {cell.kind} cell")
    # opts holds EvalConfig's fields only, none the study sets (STUDY_SET); a bad value is EvalConfig's LlmcalError
    return EvalConfig(model=cell.model.model, data=str(paths["test"]), method=cell.kind, **opts)


def finetune_config(study: Study, cell: Cell, paths: dict, *, resume: bool):
    """The ``FinetuneConfig`` of a training cell (or of the regime cell's source)."""
    from ..train.config import FinetuneConfig

    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    opts = {k: v for k, v in study.options(cell).items() if k in names}
    opts.setdefault("seed", study.seed)
    src = cell.method or next(m for m in study.methods if m.key == study.regime_from)
    evals = [str(paths[r]) for r in EVAL_ROLES if r in paths]
    return FinetuneConfig(model=cell.model.model, train=str(paths["train"]), evals=evals, method=src.method,
                          resume=resume, **opts)
