"""Label-free bias corrections: contextual calibration and batch calibration.

Both divide the model's option distribution by an estimate of its *prior* over
the option letters, the distribution it would give with no information about
the question, and renormalise:

    q_ik  proportional to  p_ik / prior_k,    i.e.  z'_ik = log p_ik - log prior_k

They differ in where the prior comes from:

* contextual calibration (Zhao et al., "Calibrate Before Use: Improving
  Few-Shot Performance of Language Models", ICML 2021): the model's option
  distribution on *content-free* inputs ("N/A", "", "[MASK]") put through the
  same prompt template, averaged over those inputs. The paper's W =
  diag(prior)^-1, b = 0 applied to p and renormalised (as its code does) is
  exactly the formula above. Needs the model once per (model, template, K):
  :func:`content_free_distribution` computes it and caches it in llmcal's store.
* batch calibration (Zhou et al., "Batch Calibration: Rethinking Calibration
  for In-Context Learning and Prompt Engineering", ICLR 2024): the mean of the
  model's option distributions over the batch being calibrated,
  prior_k = (1/N) sum_i p_ik. No labels and no model: it is fitted on the test
  questions themselves (their answers are never read).

Priors are kept per number of options K (a 3-option and a 4-option question
have different letter priors), so mixed K is handled when every K has a prior.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import LlmcalError
from ._common import Calibrator, _log_softmax, _masked_softmax, _option_counts

__all__ = ["CONTENT_FREE_STRINGS", "BatchCalibrator", "ContextualCalibrator", "content_free_distribution"]

log = logging.getLogger(__name__)

CONTENT_FREE_STRINGS = ("N/A", "", "[MASK]")


def _apply_priors(z: np.ndarray, mask: np.ndarray, log_priors: Mapping[int, np.ndarray], what: str) -> np.ndarray:
    x = _log_softmax(z, mask)
    counts = _option_counts(mask)
    out = np.full_like(x, -np.inf)
    for k in np.unique(counts):
        k = int(k)
        if k not in log_priors:
            raise LlmcalError(f"{what} has no prior for {k}-option questions (it has K = "
                              f"{', '.join(str(j) for j in sorted(log_priors))})")
        rows = counts == k
        out[rows, :k] = x[rows, :k] - log_priors[k]
    return out


class BatchCalibrator(Calibrator):
    """Batch calibration (Zhou et al. 2024): z'_ik = log p_ik - log((1/N) sum_j p_jk) over the batch.

    ``fit(logits)`` takes the batch to be calibrated (answers, if given, are
    ignored: the method is label-free), one prior per K; ``transform`` then
    divides each question's distribution by the prior of its K and
    renormalises. Fit it on the test questions themselves, as the paper does.

    Fitted attribute: ``priors_`` ({K: mean distribution}).
    """

    name = "batch"
    needs_labels = False
    _fitted_attr = "priors_"

    def _fit(self, z, mask, answers):
        p = _masked_softmax(z, mask)
        counts = _option_counts(mask)
        self.priors_ = {int(k): p[counts == k, :k].mean(axis=0) for k in np.unique(counts)}

    def _transform(self, z, mask):
        return _apply_priors(z, mask, {k: np.log(v) for k, v in self.priors_.items()}, "batch calibration")

    def params(self) -> dict:
        self._check_fitted()
        return {"priors_": {str(k): v.tolist() for k, v in self.priors_.items()}}


def _check_prior(k: int, v: Any) -> np.ndarray:
    p = np.asarray(v, dtype=np.float64).reshape(-1)
    if p.size != k or not np.all(np.isfinite(p)) or np.any(p <= 0) or abs(p.sum() - 1.0) > 1e-6:
        raise LlmcalError(f"contextual calibration: the prior for K={k} must be {k} positive probabilities "
                          f"summing to 1, got {list(np.round(p, 6))}")
    return p


class ContextualCalibrator(Calibrator):
    """Contextual calibration (Zhao et al. 2021): z'_ik = log p_ik - log prior_k, prior from content-free inputs.

    ``priors`` maps K to the model's option distribution on content-free
    inputs for K-option questions (see :func:`content_free_distribution`), or is
    one distribution (its length is K). ``fit`` only checks the priors (it
    needs no calibration data); ``transform`` refuses questions whose K has no
    prior.

    Fitted attribute: ``priors_`` ({K: prior}).
    """

    name = "contextual"
    needs_labels = False
    _fitted_attr = "priors_"

    def __init__(self, priors: Mapping[int, Sequence[float]] | Sequence[float]):
        self.priors = priors

    def _fit(self, z, mask, answers):
        priors = self._checked_priors()
        missing = sorted(set(int(k) for k in np.unique(_option_counts(mask))) - set(priors))
        if missing:
            raise LlmcalError(f"contextual calibration has no content-free prior for K = "
                              f"{', '.join(map(str, missing))}; compute it with content_free_distribution")
        self.priors_ = priors

    def fit(self, logits=None, answers=None):
        """Check the priors (and, when ``logits`` are given, that every K in them has one); labels are unused."""
        if logits is None:
            self.priors_ = self._checked_priors()
            self.n_samples_ = 0
            return self
        return super().fit(logits, None)

    def _checked_priors(self) -> dict[int, np.ndarray]:
        pr = self.priors
        if isinstance(pr, Mapping):
            if not pr:
                raise LlmcalError("contextual calibration: no priors given")
            return {int(k): _check_prior(int(k), v) for k, v in pr.items()}
        p = np.asarray(pr, dtype=np.float64).reshape(-1)
        return {p.size: _check_prior(p.size, p)}

    def _transform(self, z, mask):
        return _apply_priors(z, mask, {k: np.log(v) for k, v in self.priors_.items()}, "contextual calibration")

    def params(self) -> dict:
        self._check_fitted()
        return {"priors_": {str(k): v.tolist() for k, v in self.priors_.items()}}


# ---------------------------------------------------------------------------- the model's content-free prior

def _prior_key_doc(loaded, encoded, template: str, batch_tokens: int, strings: Sequence[str]) -> dict | None:
    """The ``priors`` key document: the scoring pass's key (weights, dtype, device, questions...) and the strings."""
    from ..cache import score_key_doc

    scoring = score_key_doc(loaded, encoded, template, batch_tokens)
    return None if scoring is None else {"prior": "content-free mean", "scoring": scoring, "strings": list(strings)}


def content_free_distribution(loaded, template: str, ks: int | Iterable[int], *, tokenizer: Any = None,
                              strings: Sequence[str] = CONTENT_FREE_STRINGS, cache: bool | str | Path = True,
                              batch_tokens: int | None = None) -> dict[int, np.ndarray]:
    """The model's option distribution on content-free questions, per K: {K: prior (K,)}.

    For each K and each content-free string s, the question is s and every one
    of its K options is s (no subject), rendered with ``template`` ("plain",
    "chat" or "auto") exactly like a real question and scored by the scoring
    engine (``llmcal.scoring.score``), one pass per K; the prior is the mean of
    the resulting option distributions over the strings (Zhao et al. 2021,
    section 5).

    ``loaded`` is a :class:`llmcal.models.LoadedModel` as loaded from its spec
    (its tokenizer is used unless ``tokenizer`` is given). Each K's prior is
    kept in the ``priors`` namespace of llmcal's store (``llmcal.cache``), keyed
    by what keys that K's scoring pass in the scoring cache (the weights'
    fingerprint, backend, dtype, device type, template, the encoded questions,
    the batch budget, the engine version) and the strings; a cached K is not
    scored, and a model loaded lazily (``load_model(..., lazy=True)``) is not
    even loaded when every K is cached. ``cache=True`` uses the llmcal cache, a
    path a store rooted there, ``False`` computes without caching.
    """
    from ..cache import Store
    from ..data.schema import MAX_CHOICES, MIN_CHOICES, Question
    from ..prompts import encode_questions, resolve_template
    from ..scoring import ScoreOptions, score

    tok = tokenizer if tokenizer is not None else loaded.tokenizer
    template = resolve_template(template, tok)
    k_list = sorted({int(ks)} if isinstance(ks, (int, np.integer)) else {int(k) for k in ks})
    if not k_list:
        raise LlmcalError("content_free_distribution: give at least one number of options K")
    for k in k_list:
        if not MIN_CHOICES <= k <= MAX_CHOICES:
            raise LlmcalError(f"content_free_distribution: K must be in {MIN_CHOICES}..{MAX_CHOICES}, got {k}")
    if not strings:
        raise LlmcalError("content_free_distribution: give at least one content-free string")
    opts = ScoreOptions(progress=False, description="content-free inputs")
    if batch_tokens is not None:
        opts.batch_tokens = int(batch_tokens)
    store = None if cache is False else Store("priors", None if cache is True else Path(cache))
    out: dict[int, np.ndarray] = {}
    for k in k_list:
        questions = [Question(id=f"content-free-K{k}-{j}", question=s, choices=tuple([s] * k), answer=0)
                     for j, s in enumerate(strings)]
        encoded = encode_questions(questions, tok, template)
        doc = _prior_key_doc(loaded, encoded, template, opts.batch_tokens, strings) if store is not None else None
        key = store.key(doc) if doc is not None else None
        hit = store.get(key) if key is not None else None
        if hit is not None:
            try:
                out[k] = _check_prior(k, hit[0]["prior"])
                continue
            except (LlmcalError, LookupError, TypeError) as e:
                store.reject(key, f"not a prior for K={k}: {e}")
        preds = score(loaded.model, tok, encoded, options=opts)
        out[k] = np.mean([p.probs for p in preds], axis=0)
        log.info("content-free prior for K=%d (%s, %s): %s", k, loaded.spec.name, template, np.round(out[k], 4))
        if key is not None:
            store.put(key, [{"k": k, "prior": out[k].tolist()}])
    return out
