"""The two training losses (docs/reference.md, "CFT" and "RCFT").

CFT: the SFT loss restricted to the answer.  ``answer_ce_loss`` is the
cross-entropy of the correct letter token over the *full vocabulary* at the
answer position, exactly what SFT on the answer token computes (not a softmax
over the K letters: mass on tokens that are not letters is penalised too).
The training forward computes vocabulary logits only at the positions the loss
needs (``logits_to_keep``), so this costs one (B x V) projection, not (B x L x V).
With ``include_explanation`` the same loss also covers the explanation tokens
that follow the letter (the mean over all target tokens, as SFT does).

RCFT adds ``lambda * L_ECE``.  For question i with K-letter softmax p_i
(padded options masked out), c_i = max_j p_ij, b(i) = bin of c_i (equal
width, left-closed, last closed), a_b the E-step accuracy of bin b:

    term_i = (c_i - a_b(i))^2 + sum_{j != argmax} (p_ij - t_ij)^2
    L_ECE  = mean of term_i over the questions whose bin has an estimate

The targets t_ij share 1 - a_b(i) among the non-argmax options, computed from
detached probabilities q_ij = p_ij.detach():

* ``proportional`` (the default): t_ij = (1 - a) q_ij / sum_{j'} q_ij'.
* ``tanh`` (the official code of Xiao et al., ``not_max_target_confidence``):
  with m non-argmax options and q_(2) the second-largest probability,
  g = ln(3) / (q_(2) (1 - a)) and t_ij = (1 - a) (1 + tanh(g q_ij)) / (m + sum_j' tanh(g q_ij')).
  The options share the mass equally plus a bonus that grows with their
  probability and saturates (the second option gets tanh(ln 3 / (1 - a)) of
  it).  The official code hard-codes K = 4 (m = 3, the constant ln 3); here m
  is each question's own number of other options and ln 3 stays.  Unlike the
  official code, the targets are detached (they are targets, not a path for
  gradients).  a = 1 gives t = 0.

Questions in a bin without an estimate (empty on the estimation set) are
skipped; with none left the loss is 0 (still attached to the graph).

The official variant (``--rcft-variant official``, ``official_calibration_loss``)
is the objective of the authors' ``train/Custom_Trainer.py``, term for term:

    loss = (1 - alpha) * SFT + alpha * 1e-3 * R
    R    = sum over bins k of (1 / N_k) * sum over the batch's questions i in bin k of term_i

with term_i as above and the ``tanh`` targets, but *not* detached (the
gradient flows through t_ij too), N_k and a_k the question count and raw
accuracy of bin k from one E-step on the whole training set before training,
and the bins of ``utils/group_dividing.py``: ``torch.bucketize(c, edges,
right=True)`` with edges 0, 0.1, ..., 0.9 gives k in 1..10 for [(k-1)/10, k/10)
(the last bucket [0.9, 1]), and the authors' lists are indexed k - 1, so bin
index k - 1 is llmcal's own bin of c away from float rounding at the edges.
Their loss loop visits indices 0..8 only: ``skip_top_bin=True`` reproduces it
(the top bin [0.9, 1] is never regularised).  A question in a bin with N_k = 0
is skipped (the official code would divide by zero).  docs/reference.md lists
every difference from llmcal's RCFT.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TANH_CONSTANT = math.log(3.0)
OFFICIAL_SCALE = 1e-3  # the official code's weight of R: alpha * 1e-3 * R


def answer_ce_loss(vocab_logits: torch.Tensor, target_ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of ``target_ids`` (N,) under ``vocab_logits`` (N, V); ``ignore_index`` rows skipped."""
    return F.cross_entropy(vocab_logits.float(), target_ids, ignore_index=ignore_index)


def bins_of(conf: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin index min(floor(c * M), M - 1), as in ``llmcal.metrics.core.bin_index``."""
    return torch.clamp(torch.floor(conf.detach().double() * n_bins), 0, n_bins - 1).long()


def nonmax_targets(q: torch.Tensor, others: torch.Tensor, a: torch.Tensor, rule: str) -> torch.Tensor:
    """Targets t (B, K) for the non-argmax options (0 elsewhere).

    q: probabilities (B, K), detached by ``RcftLoss`` (the official variant passes
    them with their graph); others: bool mask of the non-argmax real options;
    a: bin accuracy per row (B,).
    """
    q = torch.where(others, q, torch.zeros_like(q))
    rest = (1.0 - a).clamp(min=0.0).unsqueeze(1)  # (B, 1)
    m = others.sum(dim=1, keepdim=True).clamp(min=1).to(q.dtype)
    if rule == "proportional":
        total = q.sum(dim=1, keepdim=True)
        share = torch.where(total > 0, q / total.clamp(min=torch.finfo(q.dtype).tiny), others.to(q.dtype) / m)
    elif rule == "tanh":
        second = q.max(dim=1, keepdim=True).values
        gamma = TANH_CONSTANT / (second * rest).clamp(min=1e-12)
        s = torch.tanh(gamma * q) * others
        share = (1.0 + s) * others / (m + s.sum(dim=1, keepdim=True))
    else:
        raise ValueError(f"unknown non-max rule {rule!r}")
    return rest * share


class RcftLoss:
    """L_ECE of RCFT (see the module docstring); call with K-letter logits and per-bin targets."""

    def __init__(self, n_bins: int = 10, nonmax_rule: str = "proportional"):
        if nonmax_rule not in ("proportional", "tanh"):
            raise ValueError(f"unknown non-max rule {nonmax_rule!r}")
        self.n_bins = int(n_bins)
        self.nonmax_rule = nonmax_rule

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, letter_mask: torch.Tensor | None = None,
                 ) -> torch.Tensor:
        """logits (B, K) with grad; targets (M,) bin accuracies (NaN: no estimate); letter_mask (B, K) bool."""
        logits = logits.float()
        if letter_mask is None:
            letter_mask = torch.isfinite(logits)
        logits = logits.masked_fill(~letter_mask, float("-inf"))
        p = torch.softmax(logits, dim=-1)
        conf, top = p.max(dim=-1)
        targets = targets.to(device=p.device, dtype=p.dtype).detach()
        a = targets[bins_of(conf, self.n_bins)]
        keep = ~torch.isnan(a)
        if not bool(keep.any()):
            return p.sum() * 0.0
        a = torch.nan_to_num(a, nan=0.0)
        others = letter_mask.clone()
        others[torch.arange(p.shape[0], device=p.device), top] = False
        t = nonmax_targets(p.detach(), others, a, self.nonmax_rule)
        term = (conf - a) ** 2 + (((p - t) ** 2) * others).sum(dim=-1)
        return term[keep].mean()

    def total(self, sft: torch.Tensor, logits: torch.Tensor, state, letter_mask: torch.Tensor | None = None,
              ) -> torch.Tensor:
        """The training loss: SFT + lambda * L_ECE, with the TrainState's lambda and bin targets."""
        return sft + state.lam * self(logits, state.targets_tensor(), letter_mask)


def official_bins(conf: torch.Tensor, n_bins: int = 10) -> torch.Tensor:
    """The official code's bin index of each confidence: ``bucketize(c, edges, right=True) - 1``.

    The edges are those of ``utils/group_dividing.py`` (numpy's ``linspace(0, 1, M, endpoint=False)``:
    k / M computed as k * (1 / M), in float64); ``right=True`` puts an edge in the bin above it, so
    bin k is [k / M, (k + 1) / M) and the last one [(M - 1) / M, 1].
    """
    edges = torch.arange(n_bins, dtype=torch.float64, device=conf.device) * (1.0 / n_bins)
    return torch.bucketize(conf.detach().double(), edges, right=True) - 1


def official_calibration_loss(letter_logits: torch.Tensor, bin_accuracy: torch.Tensor, bin_count: torch.Tensor,
                              *, skip_top_bin: bool = False) -> torch.Tensor:
    """R of the official RCFT objective (module docstring), before its ``alpha * 1e-3`` weight.

    letter_logits (B, K) with grad (-inf: a padded option); bin_accuracy (M,) the E-step's raw bin
    accuracies (NaN: no estimate); bin_count (M,) its question counts N_k on the training set.
    ``skip_top_bin=True``: the authors' loop, which never visits the top bin.
    """
    logits = letter_logits.float()
    real = torch.isfinite(logits)
    p = torch.softmax(logits.masked_fill(~real, float("-inf")), dim=-1)
    conf, top = p.max(dim=-1)
    n_bins = int(bin_accuracy.numel())
    if int(bin_count.numel()) != n_bins:
        raise ValueError(f"bin_accuracy has {n_bins} bins but bin_count {int(bin_count.numel())}")
    k = official_bins(conf, n_bins)
    a = bin_accuracy.to(device=p.device, dtype=p.dtype).detach()[k]
    n = bin_count.to(device=p.device, dtype=p.dtype).detach()[k]
    keep = (n > 0) & ~torch.isnan(a)
    if skip_top_bin:
        keep &= k < n_bins - 1
    if not bool(keep.any()):
        return p.sum() * 0.0
    a = torch.where(keep, a, torch.zeros_like(a))
    n = torch.where(keep, n, torch.ones_like(n))  # no 0/0 in the backward pass of skipped rows
    others = real.clone()
    others[torch.arange(p.shape[0], device=p.device), top] = False
    t = nonmax_targets(p, others, a, "tanh")  # p itself, not p.detach(): the official targets carry gradient
    term = (conf - a) ** 2 + (((p - t) ** 2) * others).sum(dim=-1)
    return (term / n)[keep].sum()


class OfficialRcftLoss:
    """The official mix (1 - alpha) * SFT + alpha * 1e-3 * R, R from ``official_calibration_loss``."""

    def __init__(self, alpha: float = 1.0, skip_top_bin: bool = False):
        self.alpha = float(alpha)
        self.skip_top_bin = bool(skip_top_bin)

    def total(self, sft: torch.Tensor, logits: torch.Tensor, state, letter_mask: torch.Tensor | None = None,
              ) -> torch.Tensor:
        """The training loss from the batch's SFT loss and letter logits, with the TrainState's bin estimates."""
        if letter_mask is not None:
            logits = logits.masked_fill(~letter_mask, float("-inf"))
        r = official_calibration_loss(logits, state.targets_tensor(), state.counts_tensor(),
                                      skip_top_bin=self.skip_top_bin)
        return (1.0 - self.alpha) * sft + self.alpha * OFFICIAL_SCALE * r
