"""Causal self-attention for scoring on CPU, plugged into transformers' AttentionInterface.

Why this exists: PyTorch's CPU flash-attention kernel, which ``sdpa`` uses on
CPU, runs the attention products of a scoring batch (9 heads of 64 dims,
prompts of 40-640 tokens for SmolLM2 on MMLU) at ~40 GFLOP/s, a tenth of the
machine's bfloat16 matmul peak; attention was 22% of a bfloat16 evaluation
(bench/RESULTS.md, v3).  Here the same computation is a few batched float32
matmuls sized to stay in cache:

* the query heads that share a key/value head (grouped-query attention) are
  stacked into one matrix, so one ``baddbmm`` computes their scores against the
  shared keys without repeating them;
* queries are cut into blocks of ~``QUERY_BLOCK`` positions and each block only
  meets the keys up to its last position, so little of the causal triangle's
  empty half is computed; the diagonal block gets an additive -inf bias;
* batch rows are taken a few at a time so that a chunk's scores stay within
  ``SCORE_BYTES`` (about the L2 caches of two cores);
* scores, softmax and the probability-value product are float32 whatever the
  model's dtype, like the flash kernel's accumulators.

It only takes the case the scoring engine produces: inference (no autograd),
no attention mask (right-padded batches: see scoring.py), queries and keys of
the same length and head size, no dropout, soft-capping, sinks or position
bias, and only in the model families listed in ``FAMILIES``.  Everything
else goes to transformers' own ``sdpa`` function unchanged, so training and
generation behave exactly as before.  ``scoring_attention(model)`` switches a
CPU model that uses ``sdpa`` to this function for the duration of a block.
"""
from __future__ import annotations

import contextlib
import functools
import math

NAME = "llmcal_cpu_causal"

# Query positions per block: smaller blocks skip more of the masked triangle but
# make smaller matmuls. For MMLU-length prompts on 2 cores, 32, 48 and 64 were
# within noise of each other and 128 was slower (bench/bench_attention.py; RESULTS.md, v4).
QUERY_BLOCK = 48
# float32 scores per chunk of batch rows, in bytes.
SCORE_BYTES = 2 << 20


# One batch's blocks are reused by all its layers; 128 covers prompts of ~6,000 tokens
# while bounding what long prompts keep alive (each entry is groups x block x end floats).
@functools.lru_cache(maxsize=128)
def _causal_bias(start: int, end: int, groups: int):
    """(groups * (end - start), end) float32: 0 where query start+i may see key j (j <= start+i), else -inf."""
    import torch

    i = torch.arange(start, end)[:, None]
    j = torch.arange(end)[None, :]
    bias = torch.zeros(end - start, end).masked_fill_(j > i, float("-inf"))
    return bias.repeat(groups, 1)


def causal_attention(query, key, value, scaling: float | None = None):
    """softmax(q k^T * scaling + causal) v for (B, H, T, D) queries and (B, KV, T, D) keys/values.

    Returns (B, T, H, D) in the query's dtype (the layout transformers' attention
    functions return).  H must be a multiple of KV (head h uses key head h // (H/KV),
    as transformers' ``repeat_kv`` does).
    """
    import torch

    # A named range, so profiles (bench/profile_eval.py) can tell these matmuls from the linear layers'.
    with torch.profiler.record_function("llmcal::causal_attention"):
        return _causal_attention(query, key, value, scaling)


def _causal_attention(query, key, value, scaling):
    import torch

    B, H, T, D = query.shape
    KV = key.shape[1]
    R = H // KV
    if scaling is None:
        scaling = D ** -0.5
    f32 = torch.float32
    # One contiguous float32 copy of each input; every slice below is then a view or a small copy.
    q = torch.empty((B, KV, R, T, D), dtype=f32)
    q.copy_(query.reshape(B, KV, R, T, D))
    k = torch.empty((B, KV, T, D), dtype=f32)
    k.copy_(key)
    v = torch.empty((B, KV, T, D), dtype=f32)
    v.copy_(value)
    out = torch.empty((B, T, KV, R, D), dtype=query.dtype)
    out_heads = out.permute(0, 2, 3, 1, 4)  # (B, KV, R, T, D) view of the output
    blocks = max(1, round(T / QUERY_BLOCK))
    size = math.ceil(T / blocks)
    for start in range(0, T, size):
        end = min(T, start + size)
        n = end - start
        bias = _causal_bias(start, end, R)
        rows = max(1, SCORE_BYTES // (KV * R * n * end * 4))
        for i in range(0, B, rows):
            j = min(B, i + rows)
            qq = q[i:j, :, :, start:end].reshape((j - i) * KV, R * n, D)
            kk = k[i:j, :, :end].reshape((j - i) * KV, end, D)
            vv = v[i:j, :, :end].reshape((j - i) * KV, end, D)
            scores = torch.baddbmm(bias, qq, kk.transpose(1, 2), alpha=scaling)
            probs = torch.softmax(scores, dim=-1)
            out_heads[i:j, :, :, start:end] = torch.bmm(probs, vv).view(j - i, KV, R, n, D)
    return out.view(B, T, H, D)


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers attention function: ``causal_attention`` where it applies, ``sdpa`` otherwise."""
    import torch

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    plain = (attention_mask is None and causal and not dropout and query.device.type == "cpu"
             and query.shape[2] == key.shape[2] > 1 and query.shape[1] % key.shape[1] == 0
             and query.shape[-1] == key.shape[-1] == value.shape[-1]
             and kwargs.get("softcap") is None and kwargs.get("s_aux") is None
             and kwargs.get("position_bias") is None and not kwargs.get("output_attentions", False)
             and not (torch.is_grad_enabled() and query.requires_grad))
    if not plain:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    return causal_attention(query, key, value, scaling), None


@functools.cache
def register() -> str:
    """Register ``attention_forward`` (with sdpa's mask builder) under ``NAME``; returns the name."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    # The same masks as sdpa: None for a plain causal batch, a real mask otherwise (padding on the
    # left, sliding windows longer than the prompt), which attention_forward hands to sdpa.
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


# Model families (the text model's ``model_type``) whose attention is plain causal self-attention
# dispatched through AttentionInterface, each checked against sdpa in tests/test_attention.py.  Other
# models keep sdpa: some modelling code branches on the implementation's name (sparse-index attention
# folds its mask in only for "eager" and "sdpa"), which a new name would silently change.
FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "olmo2", "phi3"})


def _implementations(base) -> list:
    """The attention implementation of the model and of every sub-model with its own config."""
    from transformers import PreTrainedModel

    seen, out = set(), []
    for m in base.modules():
        if isinstance(m, PreTrainedModel) and id(m.config) not in seen:
            seen.add(id(m.config))
            out.append(getattr(m.config, "_attn_implementation", None))
    return out


@contextlib.contextmanager
def scoring_attention(model, enabled: bool = True):
    """Within the block, a CPU model of a known family that uses ``sdpa`` everywhere uses ``attention_forward``.

    A no-op for other devices and families, for models where any sub-model uses
    another implementation (the switch and the restore apply to all of them),
    and for models that do not dispatch attention through AttentionInterface.
    The model goes back to ``sdpa`` afterwards, even on error.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    setter = getattr(base, "set_attn_implementation", None)
    can = getattr(base, "_can_set_attn_implementation", lambda: False)
    try:
        device = next(base.parameters()).device.type
    except (StopIteration, AttributeError):
        device = None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if (not enabled or setter is None or config is None or device != "cpu"
            or getattr(text, "model_type", None) not in FAMILIES or not can()
            or set(_implementations(base)) != {"sdpa"}):
        yield
        return
    setter(register())
    try:
        yield
    finally:
        setter("sdpa")
