"""The questions of a fine-tuning run: training, held-out slice, evaluation sets, and their checks.

The training data (``cfg.train`` with its subject filter, split and limit) is
split into a training part and a held-out slice of about ``heldout_fraction``
by ``llmcal.data.splits.split_heldout`` (a hash of each question id and the
seed): the same slice ``llmcal regime`` holds out.  The held-out slice is never
trained on; it serves the RCFT E-step, the regime check of ``--method auto``
and the training curve.

Evaluation sets must not share a question id with the training data (either
part).  To train and evaluate on one dataset, ``--train-split train
--eval-split test`` uses its named splits (``data.splits.SPLITS``): the
training data is its ``train`` split, and every eval set that is the training
dataset is evaluated on its ``test`` split (other eval sets in full).  Named
splits and held-out slices are hashed with different keys, so the held-out
slice is an unbiased part of the training split.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..data import EXTENSIONS, Question, load_dataset, split_heldout, take_limit
from ..errors import LlmcalError
from .config import FinetuneConfig

SHOW_IDS = 10
TRAIN_PROBE_MIN = 64  # questions of the training part scored by the auto regime check


@dataclass(frozen=True)
class EvalSet:
    spec: str  # as given
    name: str  # the dataset's name (canonical for synthetic specs)
    slug: str  # for file names, unique within the run
    questions: tuple[Question, ...]
    split: str = "all"


@dataclass(frozen=True)
class TrainingData:
    train: tuple[Question, ...]
    heldout: tuple[Question, ...]
    evals: list[EvalSet]
    train_name: str

    def train_probe(self, seed: int) -> tuple[Question, ...]:
        """A fixed subset of the training part, as large as the held-out slice (at least 64)."""
        return take_limit(self.train, max(len(self.heldout), TRAIN_PROBE_MIN), seed)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "data"


def needs_heldout(cfg: FinetuneConfig) -> bool:
    # the official variant estimates its bins on the training set
    return cfg.method == "auto" or (cfg.method == "rcft" and cfg.estep_set == "heldout"
                                    and cfg.rcft_variant == "llmcal")


def _load(spec: str, cfg: FinetuneConfig, split: str | None, subjects, limit):
    mapping = cfg.mapping if str(spec).lower().endswith(EXTENSIONS) else None
    return load_dataset(spec, split=split, subjects=subjects, limit=limit, seed=cfg.seed, mapping=mapping)


def load_training_data(cfg: FinetuneConfig) -> TrainingData:
    """Load and check everything; raises LlmcalError before any model is loaded."""
    ds = _load(cfg.train, cfg, cfg.train_split, cfg.train_subjects, cfg.train_limit)
    if not ds.questions:
        raise LlmcalError(f"{cfg.train}: no training questions left after the split/subject/limit filters")
    train, heldout = split_heldout(ds.questions, cfg.heldout_fraction, cfg.seed)
    if not train:
        raise LlmcalError(f"{cfg.train}: --heldout-fraction {cfg.heldout_fraction} leaves no question to train on "
                          f"({len(ds.questions)} questions)")
    if needs_heldout(cfg) and not heldout:
        what = "the regime check of --method auto" if cfg.method == "auto" else "the RCFT E-step"
        raise LlmcalError(
            f"{cfg.train}: no held-out slice left for {what}: --heldout-fraction {cfg.heldout_fraction} of "
            f"{len(ds.questions)} questions selects none; raise --heldout-fraction, use more training data"
            + (" or --estep-set train" if cfg.method == "rcft" else ""))
    seen = {q.id for q in ds.questions}
    evals: list[EvalSet] = []
    slugs: set[str] = set()
    for spec in cfg.evals:
        e = _load(spec, cfg, None, cfg.eval_subjects, cfg.eval_limit)
        if cfg.eval_split is not None and e.name == ds.name:  # the training dataset: its eval part only
            e = _load(spec, cfg, cfg.eval_split, cfg.eval_subjects, cfg.eval_limit)
        if not e.questions:
            raise LlmcalError(f"{spec}: no evaluation questions left after the split/subject/limit filters")
        shared = [q.id for q in e.questions if q.id in seen]
        if shared:
            shown = ", ".join(shared[:SHOW_IDS]) + (" ..." if len(shared) > SHOW_IDS else "")
            raise LlmcalError(
                f"evaluation set {spec} shares {len(shared)} question id(s) with the training data {cfg.train}: "
                f"{shown}. Evaluate on other questions (another dataset or subjects), or split one dataset with "
                f"--train-split train --eval-split test")
        s, k = slug(e.name), 2
        while s in slugs:
            s, k = f"{slug(e.name)}-{k}", k + 1
        slugs.add(s)
        evals.append(EvalSet(spec=spec, name=e.name, slug=s, questions=e.questions, split=e.split or "all"))
    return TrainingData(train=train, heldout=heldout, evals=evals, train_name=ds.name)
