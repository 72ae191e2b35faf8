"""The scoring engine: option-letter logits at the answer position, one forward pass per question.

Only the answer position's hidden state goes through the output layer, and only
for the K option tokens (a gather of K rows of the unembedding instead of a
vocabulary-sized matmul).  Questions are batched by length under a token budget
(sorted, and cut where padding would be wasted), and each batch's predictions
are flushed as they are computed, so an interrupted evaluation resumes where it
stopped.  Batches are a deterministic function of the dataset, so a resumed run
(or a sharded one) computes every question in exactly the batch an
uninterrupted single-process run used and ends with identical predictions.

Batches are right-padded, and a causal decoder's real positions never attend to
positions after them, so the decoder runs without an attention mask (the fast
causal path of scaled-dot-product attention, or on CPU attention.py's kernel);
the padding rows' outputs are never read.  See bench/RESULTS.md for what each
choice here bought.

**Shared prefixes** (few-shot prompts: every question of a subject starts with
the same examples, hundreds of tokens).  Questions whose ``prefix_len`` first
tokens are the same form a group; each group is batched on its own (by the
length of what follows the prefix), the prefix's key/value cache is computed
once per group with transformers' ``DynamicCache``, and every batch of the group
runs only its own tokens against it.  The batch's cache (``PrefixCache``) hands
each layer the prefix keys and values broadcast over the batch rows and keeps
nothing, so only one layer's expanded copy exists at a time.  The numbers equal
the full prompts' up to float rounding (tests/test_scoring.py).  Models with
sliding-window layers score the full prompts (the same groups and batches).
Groups come in the order of their first question, so batches stay a
deterministic function of the dataset.  Without shared prefixes (zero-shot),
batching is exactly ``make_batches`` over the whole prompts.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from .errors import LlmcalError
from .predictions import Prediction
from .prompts import EncodedQuestion

log = logging.getLogger(__name__)

# On CPU smaller batches are faster (cache-resident activations); GPUs want more.
DEFAULT_BATCH_TOKENS = 2048


# Fixed cost of one forward pass, in padded-token equivalents: what cutting a batch
# early must save in padding to be worth it (measured on CPU; see bench/RESULTS.md).
BATCH_OVERHEAD_TOKENS = 128


def make_batches(lengths: Sequence[int], batch_tokens: int,
                 overhead_tokens: int = BATCH_OVERHEAD_TOKENS) -> list[list[int]]:
    """Group indices into batches, longest first, so that (batch size x longest length) <= budget.

    Among all ways to cut the length-sorted list into batches within the budget,
    this picks the one with the fewest padded tokens plus ``overhead_tokens`` per
    batch (dynamic programming over the cut points), so a batch ends before a
    big drop in length instead of padding short questions to a long one.  A
    question longer than the budget gets a batch of its own.  Deterministic.
    """
    if batch_tokens < 1:
        raise LlmcalError(f"--batch-tokens must be positive (got {batch_tokens})")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    n = len(order)
    if n == 0:
        return []
    s = np.array([max(1, int(lengths[i])) for i in order], dtype=np.int64)
    # best[i]: cost of batching order[i:]; a batch starting at i holds at most cap[i] questions.
    cap = np.maximum(1, batch_tokens // s)
    best = np.zeros(n + 1, dtype=np.int64)
    cut = np.full(n, n, dtype=np.int64)
    for i in range(n - 1, -1, -1):
        k = np.arange(1, min(int(cap[i]), n - i) + 1)
        cost = s[i] * k + overhead_tokens + best[i + k]
        j = int(np.argmin(cost))  # first minimum: the smaller batch on ties
        best[i], cut[i] = cost[j], i + int(k[j])
    batches: list[list[int]] = []
    i = 0
    while i < n:
        batches.append(order[i:int(cut[i])])
        i = int(cut[i])
    return batches


def plan_batches(encoded: Sequence[EncodedQuestion], batch_tokens: int,
                 overhead_tokens: int = BATCH_OVERHEAD_TOKENS) -> list[list[int]]:
    """Batches of indices into ``encoded``: ``make_batches`` per shared-prefix group (see the module docstring).

    Every batch's questions have the same first ``prefix_len`` tokens; the budget
    counts the tokens after the prefix.  Questions without a prefix form one group.
    """
    groups: dict[tuple, list[int]] = {}
    for i, e in enumerate(encoded):
        groups.setdefault(tuple(e.input_ids[: e.prefix_len]), []).append(i)
    if len(groups) == 1 and () in groups:
        return make_batches([len(e.input_ids) for e in encoded], batch_tokens, overhead_tokens)
    out: list[list[int]] = []
    for idx in groups.values():
        sub = make_batches([len(encoded[i].input_ids) - encoded[i].prefix_len for i in idx],
                           batch_tokens, overhead_tokens)
        out += [[idx[j] for j in b] for b in sub]
    return out


def prefix_kv(model, prefix_ids) -> list | None:
    """(keys, values) per layer of the decoder after ``prefix_ids`` (1-D), or None for sliding-window models."""
    import torch
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    decoder = _head_parts(model)[0]
    cache = DynamicCache(config=_text_config(model))
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    ids = torch.as_tensor(prefix_ids, dtype=torch.long, device=next(model.parameters()).device)[None]
    decoder(input_ids=ids, use_cache=True, **{_cache_arg(decoder): cache})
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache_arg(decoder) -> str:
    """The decoder's name for its cache argument: ``cache`` from transformers 5.25 on, ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _text_config(model):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = inner.config
    return getattr(cfg, "get_text_config", lambda: cfg)()


def prefix_cache(kv: list):
    """A transformers Cache that puts ``kv`` (from :func:`prefix_kv`) before a batch's own keys, keeping nothing."""
    from transformers.cache_utils import Cache

    layer = _prefix_layer_class()
    return Cache(layers=[layer(k, v) for k, v in kv])


@functools.cache
def _prefix_layer_class():
    import torch
    from transformers.cache_utils import DynamicLayer

    class PrefixLayer(DynamicLayer):
        """Returns the prefix's keys/values broadcast over the batch, then the new ones; stores nothing."""

        def __init__(self, keys, values):
            super().__init__()
            self.keys, self.values = keys, values
            self.device = keys.device
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            b = key_states.shape[0]
            k = torch.cat([self.keys.expand(b, -1, -1, -1), key_states], dim=-2)
            v = torch.cat([self.values.expand(b, -1, -1, -1), value_states], dim=-2)
            return k, v

    return PrefixLayer


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


def option_logits(model, input_ids, attention_mask, letter_ids, letter_mask=None, prefix=None):
    """Logits of the option letters at each row's last real token, in float32.

    input_ids, attention_mask: (B, L) right-padded; letter_ids: (B, K) token ids
    (padded rows masked by letter_mask, filled with -inf).  ``prefix``: the
    per-layer keys and values (:func:`prefix_kv`) of tokens that come before every
    row.  Differentiable: the training loss calls this too.
    """
    import torch

    decoder, weight, bias, softcap, scale = _head_parts(model)
    if prefix is not None:
        if not _right_padded(attention_mask):
            raise LlmcalError("a shared prefix needs right-padded rows")
        # The causal mask over prefix + rows is built by the model from the cache's length.
        out = decoder(input_ids=input_ids, use_cache=True, **{_cache_arg(decoder): prefix_cache(prefix)})
    else:
        # Right padding cannot reach a real position through causal attention: no mask needed.
        mask = None if _right_padded(attention_mask) else attention_mask
        out = decoder(input_ids=input_ids, attention_mask=mask, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    last = attention_mask.sum(dim=1) - 1
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
    with torch.autocast(device_type=h.device.type, enabled=False):  # the head in float32, always
        logits = torch.einsum("bh,bkh->bk", h.float(), weight[letter_ids].float())
    if bias is not None:
        logits = logits + bias[letter_ids].float()
    if scale is not None:
        logits = logits * float(scale)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if letter_mask is not None:
        logits = logits.masked_fill(~letter_mask, float("-inf"))
    return logits


def _right_padded(attention_mask) -> bool:
    """True when every row is ones then zeros (real tokens first), so a causal model needs no mask."""
    m = attention_mask.bool()
    if bool(m.all()):
        return True
    return bool((m[:, 1:] <= m[:, :-1]).all()) and bool(m[:, 0].all())


def collate(encoded: Sequence[EncodedQuestion], pad_id: int, device, start: int = 0):
    """Right-padded tensors for a batch of encoded questions, from token ``start`` on (after a shared prefix)."""
    import torch

    n = len(encoded)
    L = max(len(e.input_ids) - start for e in encoded)
    K = max(len(e.letter_ids) for e in encoded)
    ids = torch.full((n, L), pad_id, dtype=torch.long)
    mask = torch.zeros((n, L), dtype=torch.long)
    letters = torch.zeros((n, K), dtype=torch.long)
    lmask = torch.zeros((n, K), dtype=torch.bool)
    for r, e in enumerate(encoded):
        ids[r, : len(e.input_ids) - start] = torch.tensor(e.input_ids[start:])
        mask[r, : len(e.input_ids) - start] = 1
        letters[r, : len(e.letter_ids)] = torch.tensor(e.letter_ids)
        lmask[r, : len(e.letter_ids)] = True
    return ids.to(device), mask.to(device), letters.to(device), lmask.to(device)


_ALLOCATOR_TUNED = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed activation buffers for the next batch (CPU; once per process).

    By default glibc hands large freed blocks back to the kernel (heap trimming,
    mmap for big blocks), so every forward pass page-faults its activations in
    again, each fault zero-filling a page: for 200 MMLU questions with a 135M
    model on 2 cores, 3.9 million faults and 8-9 s of system time, against 0.14
    million and 0.8 s with this setting; the evaluation took 45 s instead of 52 s
    (bench/RESULTS.md, v3).  Raising the trim threshold and fixing the mmap
    threshold at its maximum keeps those blocks in the process for reuse; memory
    use stays at its high-water mark instead of going up and down.  A no-op
    outside glibc.
    Returns whether the setting was applied.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_trim_threshold, 1 << 30) == 1
        ok = libc.mallopt(m_mmap_threshold, 32 << 20) == 1 and ok  # 32 MiB: glibc's largest
    except (OSError, AttributeError):
        return False
    _ALLOCATOR_TUNED = ok
    return ok


@dataclass
class ScoreOptions:
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    progress: bool = True
    description: str = "scoring"
    shard: tuple[int, int] = (0, 1)  # (rank, world): process batches b with b % world == rank
    # On CPU, llmcal's causal attention instead of sdpa's flash kernel (attention.py says why).
    cpu_attention: bool = True
    # Compute a shared prefix's key/value cache once per group (False: every row reads its full prompt).
    prefix_cache: bool = True


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
    if device.type == "cpu":
        keep_freed_memory()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = plan_batches(encoded, opt.batch_tokens)
    rank, world = opt.shard
    mine = [b for bi, b in enumerate(batches) if bi % world == rank]
    todo = [b for b in mine if any(encoded[i].question.id not in done for i in b)]
    total = sum(len(b) for b in mine)
    from .attention import scoring_attention
    from .progress import bar

    results: list[Prediction] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), scoring_attention(model, opt.cpu_attention), \
                bar(opt.description, total, show=opt.progress,
                    completed=total - sum(len(b) for b in todo)) as task:
            held: tuple = ((), None)  # (prefix tokens, their keys/values): one group's batches are adjacent
            for b in todo:
                batch = [encoded[i] for i in b]
                key = tuple(batch[0].input_ids[: batch[0].prefix_len]) if opt.prefix_cache else ()
                if key and key != held[0]:
                    held = (key, prefix_kv(model, key))
                kv = held[1] if key else None
                ids, mask, letters, lmask = collate(batch, pad_id, device, start=len(key) if kv else 0)
                logits = option_logits(model, ids, mask, letters, lmask, prefix=kv).cpu().numpy()
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
