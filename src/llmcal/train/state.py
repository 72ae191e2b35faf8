"""What the loss and the callbacks share, and what a checkpoint must carry besides the weights.

``TrainState`` holds the RCFT bin targets (written by the E-step, read by the
loss; the official variant also the per-bin question counts), whether the RCFT term is on (``--method auto`` turns it on mid-run), the
history of E-steps and regime checks, and the per-epoch held-out curve.  It is
saved as JSON next to each Trainer checkpoint (``llmcal_train_state.json``)
and read back on ``--resume``, so a resumed run continues with exactly the
targets an uninterrupted one had.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..io import atomic_write_json

STATE_FILE = "llmcal_train_state.json"


@dataclass
class TrainState:
    method: str  # cft | rcft | auto
    lam: float  # lambda of the RCFT term
    n_bins: int
    rcft_on: bool  # rcft: from the start; auto: once the model leaves the calibratable regime
    targets: list[float | None] | None = None  # per-bin accuracy a_b (None: empty bin); None: no E-step yet
    targets_tag: str | None = None  # "epoch:E" or "step:S" ("once:S", official variant): when they were estimated
    counts: list[int] | None = None  # official variant: questions per bin N_k of its one E-step
    estep_history: list[dict] = field(default_factory=list)
    regime_checks: list[dict] = field(default_factory=list)
    switched: dict | None = None  # auto: when and why the RCFT term was turned on
    regime_base: dict | None = None  # auto: the base model's per-question correctness {"train", "heldout"}
    curve: list[dict] = field(default_factory=list)  # per-epoch held-out metrics

    @classmethod
    def initial(cls, method: str, lam: float, n_bins: int) -> "TrainState":
        return cls(method=method, lam=float(lam), n_bins=int(n_bins), rcft_on=method == "rcft")

    def targets_tensor(self) -> torch.Tensor | None:
        if self.targets is None:
            return None
        return torch.tensor([math.nan if a is None else float(a) for a in self.targets], dtype=torch.float32)

    def counts_tensor(self) -> torch.Tensor | None:
        return None if self.counts is None else torch.tensor([float(c) for c in self.counts], dtype=torch.float32)

    def set_targets(self, accuracy, tag: str, record: dict, counts=None) -> None:
        self.targets = [None if (a is None or math.isnan(float(a))) else float(a) for a in accuracy]
        self.counts = None if counts is None else [int(c) for c in counts]
        self.targets_tag = tag
        self.estep_history.append({**record, "tag": tag, "targets": self.targets})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        return cls(**d)

    def save(self, directory: str | Path) -> Path:
        return atomic_write_json(Path(directory) / STATE_FILE, self.to_dict())

    @classmethod
    def load(cls, directory: str | Path) -> "TrainState | None":
        path = Path(directory) / STATE_FILE
        if not path.exists():
            return None
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
