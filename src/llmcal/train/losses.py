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
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TANH_CONSTANT = math.log(3.0)


def answer_ce_loss(vocab_logits: torch.Tensor, target_ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of ``target_ids`` (N,) under ``vocab_logits`` (N, V); ``ignore_index`` rows skipped."""
    return F.cross_entropy(vocab_logits.float(), target_ids, ignore_index=ignore_index)


def bins_of(conf: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin index min(floor(c * M), M - 1), as in ``llmcal.metrics.bin_index``."""
    return torch.clamp(torch.floor(conf.detach().double() * n_bins), 0, n_bins - 1).long()


def nonmax_targets(q: torch.Tensor, others: torch.Tensor, a: torch.Tensor, rule: str) -> torch.Tensor:
    """Targets t (B, K) for the non-argmax options (0 elsewhere).

    q: detached probabilities (B, K); others: bool mask of the non-argmax real
    options; a: bin accuracy per row (B,).
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
