"""Conformal prediction sets in a study (``conformal:``), on the cells' stored predictions; no model loaded.

For every complete none, ts and fine-tuning cell and every test role, the cell's predictions of that
role (its own method's result: ``none`` for the none cell, ``ts`` for the ts cell, the fine-tuned
model for cft/rcft/auto) are split by the held-out rule (``llmcal.posthoc.compare.posthoc_split``,
the study's seed, 20% calibration): the same calibration and test questions for every method of a
role, so the rows compare set sizes at the same target coverage. The fine-tuned models have no
scores on ``data.calib``, which is why the split is taken inside the test role for every method
alike. Entries hold the summary of :func:`llmcal.conformal.conformal_predictions` (no sets: those
are for ``llmcal conformal --from CELL``).
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..errors import LlmcalError
from .grid import EVAL_ROLES, TRAINING

log = logging.getLogger(__name__)

CALIB_FRACTION = 0.2
KEEP = ("n", "coverage", "coverage_ci", "expected_range", "within_expected", "mean_size", "singleton_share",
        "empty_share")


def conformal_doc(root: Path, cells: list[dict], spec: dict | None, seed: int) -> dict | None:
    """study.json's ``conformal``: the settings and one entry per complete cell and test role (None when off)."""
    from ..conformal import conformal_predictions
    from ..posthoc.compare import posthoc_split
    from ..predictions import load_predictions

    if not spec:
        return None
    entries = []
    for c in cells:
        if c["status"] != "complete" or not (c["kind"] in ("none", "ts") or c["kind"] in TRAINING):
            continue
        for role in EVAL_ROLES:
            res = (c.get("results") or {}).get(role)
            if not res or not res.get("predictions"):
                continue
            e = {"model": c["model"], "point": c["point"], "method": c["method"], "role": role, "run": c["run"]}
            try:
                calib, test = posthoc_split(load_predictions(root / res["predictions"]), seed, CALIB_FRACTION)
                r = conformal_predictions(calib, test, alpha=spec["alpha"], score=spec["score"])
                e.update(n_calib=len(calib), qhat=None if r.qhat == float("inf") else r.qhat,
                         **{k: r.summary[k] for k in KEEP})
            except LlmcalError as err:  # a broken cell costs its row, not the report
                log.warning("conformal sets of %s (%s): %s", c["name"], role, err)
                e["error"] = str(err)
            entries.append(e)
    return {"alpha": spec["alpha"], "score": spec["score"], "calib_fraction": CALIB_FRACTION, "entries": entries}


def conformal_rows(doc: dict) -> list[dict]:
    """Report rows of study.json's ``conformal`` entries (with intervals as ``*_ci``)."""
    out = []
    for e in (doc.get("conformal") or {}).get("entries", []):
        if e.get("error"):
            continue
        rng = e.get("expected_range")
        out.append({"model": e["model"], "point": e["point"], "domain": e["role"], "method": e["method"],
                    "n": e["n"], "n_calib": e["n_calib"], "coverage": e["coverage"], "coverage_ci": e["coverage_ci"],
                    "expected": "full sets" if rng is None else f"[{rng[0]:.3f}, {rng[1]:.3f}]",
                    "mean_size": e["mean_size"], "singleton_share": e["singleton_share"],
                    "empty_share": e["empty_share"]})
    return out
