"""The training curve: per epoch, the training loss and held-out accuracy, ECE and NLL.

Held-out points come from ``CurveCallback`` (before training and after each
epoch); the loss is the mean of the losses Trainer logged during that epoch
(its log history, which survives a resume).  Written as ``curve.json`` and
``curve.png`` (loss on the left; held-out accuracy and ECE on the right, with
a dotted line where ``--method auto`` turned the RCFT term on).
"""
from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..io import atomic_savefig, atomic_write_json


def curve_points(curve: list[dict], log_history: list[dict]) -> list[dict]:
    """Held-out points, each with the mean logged training loss since the previous point."""
    losses = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    out, prev = [], -1
    for p in curve:
        window = [v for s, v in losses if prev < s <= p["step"]]
        out.append({**p, "train_loss": sum(window) / len(window) if window else None})
        prev = p["step"]
    return out


def write_curve(run_dir: str | Path, points: list[dict], switched: dict | None = None) -> dict[str, Path]:
    run_dir = Path(run_dir)
    written = {"json": atomic_write_json(run_dir / "curve.json", {"points": points, "rcft_switched": switched})}
    if not points:
        return written
    fig = Figure(figsize=(10, 3.8), dpi=120)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    xs = [p["epoch"] for p in points]
    lx = [(p["epoch"], p["train_loss"]) for p in points if p.get("train_loss") is not None]
    if lx:
        left.plot([x for x, _ in lx], [y for _, y in lx], "o-", color="#3b6ea8",
                  label="training loss (answer SFT, + lambda L_ECE when on)")
    nll = [(p["epoch"], p.get("heldout_nll")) for p in points if _finite(p.get("heldout_nll"))]
    if nll:
        left.plot([x for x, _ in nll], [y for _, y in nll], "s--", color="#888888",
                  label="held-out NLL (over the options)")
    left.set_xlabel("epoch")
    left.set_title("loss")
    left.legend(fontsize=8)
    right.plot(xs, [p.get("heldout_accuracy") for p in points], "o-", color="#2ca02c", label="held-out accuracy")
    right.plot(xs, [p.get("heldout_ece") for p in points], "s-", color="#d62728", label="held-out conf-ECE")
    right.set_ylim(0, 1)
    right.set_xlabel("epoch")
    right.set_title("held-out calibration")
    if switched:
        for ax in (left, right):
            ax.axvline(switched["epoch"], linestyle=":", color="black")
        right.annotate("RCFT on", (switched["epoch"], 0.95), fontsize=8, ha="left", va="top")
    right.legend(fontsize=8)
    fig.tight_layout()
    written["png"] = atomic_savefig(fig, run_dir / "curve.png")
    return written


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
