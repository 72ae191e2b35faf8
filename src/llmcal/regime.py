"""Regime diagnosis (DESIGN.md "Regime diagnosis").

ECE >= |mean confidence - accuracy| always, and an SFT fixed point has mean
confidence close to its training accuracy, so after fine-tuning the held-out
ECE is bounded below by about ``train accuracy - held-out accuracy``.  When
that gap is within a tolerance the model is *calibratable*: CFT can reach
near-zero ECE without giving up accuracy.  Otherwise it is *non-calibratable*
and RCFT's ECE regulariser is recommended.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

DEFAULT_TOLERANCE = 0.05
CALIBRATABLE = "calibratable"
NON_CALIBRATABLE = "non-calibratable"


@dataclass(frozen=True)
class Diagnosis:
    train_accuracy: float
    heldout_accuracy: float
    heldout_ece: float | None
    heldout_mean_conf: float | None
    gap: float  # train accuracy - held-out accuracy
    ece_lower_bound: float  # max(gap, 0): the held-out ECE an SFT fixed point cannot go below
    tolerance: float
    regime: str
    recommended: str  # cft | rcft
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def diagnose(train_accuracy: float, heldout_accuracy: float, *, heldout_ece: float | None = None,
             heldout_mean_conf: float | None = None, tolerance: float = DEFAULT_TOLERANCE) -> Diagnosis:
    """Classify the regime from train vs held-out accuracy (the numbers are reported as used)."""
    gap = float(train_accuracy) - float(heldout_accuracy)
    bound = max(gap, 0.0)
    if gap <= tolerance:
        regime, rec = CALIBRATABLE, "cft"
        reason = (f"train accuracy {train_accuracy:.4f} - held-out accuracy {heldout_accuracy:.4f} = {gap:.4f} "
                  f"<= tolerance {tolerance:.4f}: an SFT fixed point can be calibrated on unseen data, use CFT")
    else:
        regime, rec = NON_CALIBRATABLE, "rcft"
        reason = (f"train accuracy {train_accuracy:.4f} - held-out accuracy {heldout_accuracy:.4f} = {gap:.4f} "
                  f"> tolerance {tolerance:.4f}: SFT would stay over-confident on unseen data (held-out ECE "
                  f">= ~{bound:.4f}); use RCFT")
    return Diagnosis(train_accuracy=float(train_accuracy), heldout_accuracy=float(heldout_accuracy),
                     heldout_ece=heldout_ece, heldout_mean_conf=heldout_mean_conf, gap=gap,
                     ece_lower_bound=bound, tolerance=tolerance, regime=regime, recommended=rec, reason=reason)


def left_calibratable(train_accuracy: float, heldout_accuracy: float, tolerance: float = DEFAULT_TOLERANCE) -> bool:
    """True once fine-tuning has pushed train accuracy more than ``tolerance`` above held-out accuracy."""
    return float(train_accuracy) - float(heldout_accuracy) > tolerance
