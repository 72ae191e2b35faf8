"""Alignment drift: how far fine-tuning moved a model away from its aligned self on ordinary chat.

Calibration fine-tuning changes the model on MCQ; this measures what it did to
everything else.  On a fixed set of instruction prompts that the project ships
(``llmcal/assets/instructions.jsonl``, written for the project), the original
(aligned) model answers each prompt greedily; then both models read the
prompt plus that response, and at every response position we compare their
next-token distributions over the full vocabulary::

    drift = (1 / T) * sum_{prompts i} sum_{j < T_i} KL( p_orig(. | x_i, y_i,<j) || p_tuned(. | x_i, y_i,<j) )

where ``y_i`` is the original model's greedy response to prompt ``x_i`` (at most
``max_new_tokens`` tokens, up to and including the first end-of-sequence
token), ``T_i = |y_i|`` and ``T = sum_i T_i``: the mean per-token KL divergence
on the original model's own responses, in nats.  0 means the tuned model
predicts the original's responses exactly as the original does.

Generation is batched with left padding; the teacher-forced pass reuses that
layout (left-padded prompt, response, right padding after the end of each
response) with position ids taken from the attention mask, so padding changes
nothing.  Log-probabilities are computed in float32 whatever dtype the models
run in.  A peft model whose base *is* the original is handled without a second
copy: ``original_model=None`` means "``tuned_model`` with its adapter disabled".
"""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
from importlib import resources
from typing import Any, Iterator, Sequence

from .errors import LlmcalError
from .progress import bar

log = logging.getLogger(__name__)

INSTRUCTIONS = "instructions.jsonl"


def load_instructions() -> list[dict]:
    """The shipped instruction prompts: ``[{"id": str, "prompt": str}, ...]`` in file order."""
    text = resources.files("llmcal").joinpath("assets", INSTRUCTIONS).read_text(encoding="utf-8")
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            rec = json.loads(line)
            if not isinstance(rec.get("id"), str) or not isinstance(rec.get("prompt"), str):
                raise LlmcalError(f"llmcal/assets/{INSTRUCTIONS}, line {n}: needs string fields id and prompt")
            out.append({"id": rec["id"], "prompt": rec["prompt"]})
    return out


# ---- inputs ----------------------------------------------------------------
def _normalise_prompts(prompts: Sequence[dict | str] | None) -> list[dict]:
    if prompts is None:
        prompts = load_instructions()
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            p = {"id": f"prompt-{i}", "prompt": p}
        if not isinstance(p, dict) or not isinstance(p.get("prompt"), str) or not p["prompt"].strip():
            raise LlmcalError(f"alignment drift: prompt {i} must be a non-empty string "
                              f"or a dict with 'id' and 'prompt'")
        out.append({"id": str(p.get("id", f"prompt-{i}")), "prompt": p["prompt"]})
    if not out:
        raise LlmcalError("alignment drift: no prompts given")
    ids = [p["id"] for p in out]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise LlmcalError(f"alignment drift: duplicate prompt ids {', '.join(dup[:5])}")
    return out


def _encode(prompts: list[dict], tokenizer: Any) -> list[list[int]]:
    """Token ids of each prompt: the chat template with a generation prompt, else the plain text."""
    if getattr(tokenizer, "chat_template", None):
        try:
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=False,
                                                   add_generation_prompt=True) for p in prompts]
        except Exception as e:  # templates raise their own exception types
            raise LlmcalError(f"alignment drift: the tokenizer's chat template failed ({type(e).__name__}: {e})") from e
        special = False  # a rendered chat template carries its own special tokens
    else:
        texts, special = [p["prompt"] for p in prompts], True
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]]


def _eos_ids(tokenizer: Any, model: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(tokenizer, "eos_token_id", None),
                getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    return ids


# ---- model plumbing ------------------------------------------------------------
def _device(model: Any):
    return next(model.parameters()).device


@contextlib.contextmanager
def _eval(model: Any) -> Iterator[None]:
    """Eval mode (no dropout) for the duration; the caller's train/eval state is restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _as_original(model: Any, disable: bool):
    """Context in which ``model`` acts as the original: its adapter disabled when ``disable``."""
    return model.disable_adapter() if disable else contextlib.nullcontext()


def _positions(mask):
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _greedy(model: Any, ids, mask, max_new_tokens: int, eos: set[int], pad_id: int):
    """Greedy continuation of a left-padded batch with the KV cache; returns (tokens [B,T], lengths [B]).

    Each row's response runs up to and including its first eos token (or
    ``max_new_tokens`` tokens); positions after it hold ``pad_id``.
    """
    import torch

    b = ids.shape[0]
    dev = ids.device
    eos_t = torch.tensor(sorted(eos) or [-1], device=dev)
    kw = {"logits_to_keep": 1} if _keeps_logits(model) else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True, **kw)
    cache_kw = "cache" if "cache" in _forward_params(model) else "past_key_values"
    cache = _cache_of(out)
    nxt_pos = mask.long().sum(-1, keepdim=True)  # next position per row (prompt length)
    tokens, done = [], torch.zeros(b, dtype=torch.bool, device=dev)
    lengths = torch.zeros(b, dtype=torch.long, device=dev)
    for t in range(max_new_tokens):
        tok = out.logits[:, -1].float().argmax(-1)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        tokens.append(tok)
        lengths += (~done).long()
        done = done | torch.isin(tok, eos_t)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=dev)], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=nxt_pos + t,
                    use_cache=True, **{cache_kw: cache})
        cache = _cache_of(out)
    return torch.stack(tokens, dim=1), lengths


def _forward_params(model: Any) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def _keeps_logits(model: Any) -> bool:
    return "logits_to_keep" in _forward_params(model)


def _cache_of(out: Any):
    """The KV cache of a forward's output (``cache`` in transformers 5, ``past_key_values`` before)."""
    for name in ("cache", "past_key_values"):
        if name in out.keys():
            return out[name]
    raise LlmcalError(f"{type(out).__name__}: the model returned no KV cache; it cannot generate incrementally")


def _response_logprobs(model: Any, ids, mask, n_resp: int):
    """float32 log-probabilities [B, n_resp, V] at the positions that predict the response tokens.

    ``ids`` is prompt (left-padded, length L) + response (length n_resp); the
    distribution for response token j comes from position L - 1 + j.
    """
    import torch

    dev = _device(model)
    ids, mask = ids.to(dev), mask.to(dev)
    kw = {"logits_to_keep": n_resp + 1} if _keeps_logits(model) else {}
    logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False, **kw).logits
    logits = logits[:, -(n_resp + 1):-1]
    return torch.log_softmax(logits.float(), dim=-1)


def _kl(lp_p, lp_q):
    """KL(p || q) over the last axis from log-probabilities (0 log 0 = 0)."""
    import torch

    p = lp_p.exp()
    return torch.where(p > 0, p * (lp_p - lp_q), torch.zeros_like(p)).sum(-1).clamp(min=0.0)


# ---- the measurement ---------------------------------------------------------------
def alignment_drift(original_model: Any | None, tuned_model: Any, tokenizer: Any, *,
                    prompts: Sequence[dict | str] | None = None, max_new_tokens: int = 32,
                    progress: bool = True, batch_size: int = 8) -> dict:
    """Mean per-token KL(p_original || p_tuned) on the original model's own greedy responses.

    For each prompt (default: :func:`load_instructions`), rendered with the
    tokenizer's chat template and a generation prompt (the plain prompt text
    when the tokenizer has no chat template), the original model generates its
    greedy response (argmax of its own logits, no sampling and no logits
    processors, at most ``max_new_tokens`` tokens, stopping after the first eos
    token).  Both models are then run teacher-forced on prompt + that response,
    and at each response position the KL divergence from the original's
    next-token distribution to the tuned model's is taken over the full
    vocabulary, in float32, in nats.

    ``original_model=None`` means ``tuned_model`` is a peft model whose base is
    the original: the original's numbers are computed inside
    ``tuned_model.disable_adapter()``.  Models are put in eval mode for the
    measurement and returned in the mode they were in.

    Returns ``{"mean_kl": mean over all response tokens, "per_prompt": [{"id",
    "n_tokens", "mean_kl"}, ...] in prompt order, "n_prompts", "n_tokens",
    "max_new_tokens"}``.
    """
    import torch

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise LlmcalError(f"alignment drift: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LlmcalError(f"alignment drift: batch_size must be a positive integer, got {batch_size!r}")
    disable = original_model is None
    if disable and not hasattr(tuned_model, "disable_adapter"):
        raise LlmcalError("alignment drift: original_model=None needs a peft tuned model (one with disable_adapter)")
    original = tuned_model if disable else original_model

    items = _normalise_prompts(prompts)
    encoded = _encode(items, tokenizer)
    eos = _eos_ids(tokenizer, original)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos) if eos else 0)
    order = sorted(range(len(items)), key=lambda i: (-len(encoded[i]), i))  # similar lengths share a batch
    sums = [0.0] * len(items)
    counts = [0] * len(items)

    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(_eval(tuned_model))
        if not disable:
            stack.enter_context(_eval(original_model))
        task = stack.enter_context(bar("alignment drift", total=len(items), show=progress))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):  # left padding
                n = len(encoded[i])
                ids[r, width - n:] = torch.tensor(encoded[i])
                mask[r, width - n:] = 1
            dev = _device(original)
            with _as_original(original, disable):
                resp, lengths = _greedy(original, ids.to(dev), mask.to(dev), max_new_tokens, eos, pad_id)
            n_resp = resp.shape[1]
            resp_mask = (torch.arange(n_resp, device=lengths.device)[None, :] < lengths[:, None]).long()
            full_ids = torch.cat([ids, resp.cpu()], dim=1)
            full_mask = torch.cat([mask, resp_mask.cpu()], dim=1)
            with _as_original(original, disable):
                lp_o = _response_logprobs(original, full_ids, full_mask, n_resp)
            lp_t = _response_logprobs(tuned_model, full_ids, full_mask, n_resp).to(lp_o.device)
            if lp_o.shape != lp_t.shape:
                raise LlmcalError(f"alignment drift: the models' vocabularies differ ({lp_o.shape[-1]} vs "
                                  f"{lp_t.shape[-1]} logits); compare a model with its own fine-tuned version")
            kl = _kl(lp_o, lp_t)  # [B, n_resp]
            kl = torch.where(resp_mask.to(kl.device).bool(), kl, torch.zeros_like(kl))
            for r, i in enumerate(rows):
                sums[i] = float(kl[r].double().sum())
                counts[i] = int(lengths[r])
            task.advance(len(rows))

    n_tokens = sum(counts)
    result = {
        "mean_kl": sum(sums) / n_tokens if n_tokens else 0.0,
        "per_prompt": [{"id": it["id"], "n_tokens": counts[i], "mean_kl": sums[i] / counts[i] if counts[i] else 0.0}
                       for i, it in enumerate(items)],
        "n_prompts": len(items),
        "n_tokens": n_tokens,
        "max_new_tokens": max_new_tokens,
    }
    log.info("alignment drift: mean KL %.6f nats/token over %d tokens of %d prompts",
             result["mean_kl"], n_tokens, len(items))
    return result
