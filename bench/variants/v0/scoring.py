"""The scoring engine: option-letter logits at the answer position, one forward pass per question.

Only the answer position's hidden state goes through the output layer, and only
for the K option tokens (a gather of K rows of the unembedding instead of a
vocabulary-sized matmul).  Questions are batched by length under a token budget
(sorted, so padding waste is small), and each batch's predictions are flushed
as they are computed, so an interrupted evaluation resumes where it stopped.
Batches are a deterministic function of the dataset, so a resumed run
recomputes a torn batch with exactly the shapes an uninterrupted run used and
ends with identical predictions.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .errors import LlmcalError
from .predictions import Prediction
from .prompts import EncodedQuestion

log = logging.getLogger(__name__)

DEFAULT_BATCH_TOKENS = 2048


def make_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Group indices into batches, longest first, so that (batch size x longest length) <= budget.

    A question longer than the budget gets a batch of its own.  Deterministic.
    """
    if batch_tokens < 1:
        raise LlmcalError(f"--batch-tokens must be positive (got {batch_tokens})")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        m = max(cur_max, lengths[i])
        if cur and m * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, m = [], lengths[i]
        cur.append(i)
        cur_max = m
    if cur:
        batches.append(cur)
    return batches


def _head_parts(model):
    """(decoder, output-embedding weight, bias, final softcap) for a causal LM, peft-wrapped or not."""
    inner = model
    if hasattr(inner, "get_base_model"):  # peft PeftModel
        inner = inner.get_base_model()
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    head = inner.get_output_embeddings()
    if decoder is None or head is None:
        raise LlmcalError(f"{type(inner).__name__}: cannot find the decoder and output layer of this model")
    if hasattr(head, "base_layer"):  # a LoRA-wrapped lm_head: use the full module
        raise LlmcalError("LoRA on the output layer is not supported by the scoring engine")
    cfg = inner.config
    text_cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    softcap = getattr(text_cfg, "final_logit_softcapping", None)
    scale = getattr(text_cfg, "logit_scale", None)
    return decoder, head.weight, getattr(head, "bias", None), softcap, scale


def option_logits(model, input_ids, attention_mask, letter_ids, letter_mask=None):
    """Logits of the option letters at each row's last real token, in float32.

    input_ids, attention_mask: (B, L) right-padded; letter_ids: (B, K) token ids
    (padded rows masked by letter_mask, filled with -inf).  Differentiable: the
    training loss calls this too.
    """
    import torch

    decoder, weight, bias, softcap, scale = _head_parts(model)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    last = attention_mask.sum(dim=1) - 1
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()  # (B, H)
    w = weight[letter_ids].float()  # (B, K, H)
    logits = torch.einsum("bh,bkh->bk", h, w)
    if bias is not None:
        logits = logits + bias[letter_ids].float()
    if scale is not None:
        logits = logits * float(scale)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if letter_mask is not None:
        logits = logits.masked_fill(~letter_mask, float("-inf"))
    return logits


def collate(encoded: Sequence[EncodedQuestion], pad_id: int, device):
    """Right-padded tensors for a batch of encoded questions."""
    import torch

    n = len(encoded)
    L = max(len(e.input_ids) for e in encoded)
    K = max(len(e.letter_ids) for e in encoded)
    ids = torch.full((n, L), pad_id, dtype=torch.long)
    mask = torch.zeros((n, L), dtype=torch.long)
    letters = torch.zeros((n, K), dtype=torch.long)
    lmask = torch.zeros((n, K), dtype=torch.bool)
    for r, e in enumerate(encoded):
        ids[r, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[r, : len(e.input_ids)] = 1
        letters[r, : len(e.letter_ids)] = torch.tensor(e.letter_ids)
        lmask[r, : len(e.letter_ids)] = True
    return ids.to(device), mask.to(device), letters.to(device), lmask.to(device)


@dataclass
class ScoreOptions:
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    progress: bool = True
    description: str = "scoring"
    shard: tuple[int, int] = (0, 1)  # (rank, world): process batches b with b % world == rank


def score(
    model,
    tokenizer,
    encoded: Sequence[EncodedQuestion],
    *,
    options: ScoreOptions | None = None,
    done: Iterable[str] = (),
    on_batch: Callable[[list[Prediction]], None] | None = None,
) -> list[Prediction]:
    """Score every encoded question not in ``done``; returns the new predictions.

    ``on_batch`` receives each batch's predictions as soon as they exist (the
    run writer appends and flushes them).  Raises LlmcalError for NaN/inf logits,
    naming the questions.
    """
    import torch

    opt = options or ScoreOptions()
    done = set(done)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = make_batches([len(e.input_ids) for e in encoded], opt.batch_tokens)
    rank, world = opt.shard
    mine = [b for bi, b in enumerate(batches) if bi % world == rank]
    todo = [b for b in mine if any(encoded[i].question.id not in done for i in b)]
    total = sum(len(b) for b in mine)
    from .progress import bar

    results: list[Prediction] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), bar(opt.description, total, show=opt.progress,
                                         completed=total - sum(len(b) for b in todo)) as task:
            for b in todo:
                batch = [encoded[i] for i in b]
                ids, mask, letters, lmask = collate(batch, pad_id, device)
                logits = option_logits(model, ids, mask, letters, lmask).cpu().numpy()
                preds = []
                bad = []
                for r, e in enumerate(batch):
                    z = logits[r, : len(e.letter_ids)]
                    if not np.all(np.isfinite(z)):
                        bad.append(e.question.id)
                        continue
                    if e.question.id in done:
                        continue
                    q = e.question
                    preds.append(Prediction.from_logits(q.id, q.subject, q.answer, z))
                if bad:
                    raise LlmcalError(
                        f"the model produced NaN or infinite logits for {len(bad)} question(s): "
                        f"{', '.join(bad[:20])}{' ...' if len(bad) > 20 else ''} "
                        f"(try --dtype float32)"
                    )
                if on_batch is not None and preds:
                    on_batch(preds)
                results.extend(preds)
                task.advance(len(b))
    finally:
        if was_training:
            model.train()
    return results
