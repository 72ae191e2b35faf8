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

The responses come from transformers' ``generate()`` (greedy: ``do_sample=False``,
one beam, none of the model's own generation defaults such as a repetition
penalty), batched with left padding; the teacher-forced pass reuses that layout
(left-padded prompt, response, right padding after the end of each response)
with position ids taken from the attention mask, so padding changes nothing.
Log-probabilities are computed in float32 whatever dtype the models run in.  A
peft model whose base *is* the original is handled without a second copy:
``original_model=None`` means "``tuned_model`` with its adapter disabled".

The original's responses depend only on the original model, so they are
generated once and kept in the ``drift`` namespace of llmcal's one store
(``llmcal.cache.Store``, ``<llmcal cache>/drift/``), keyed by everything that
decides them: the original's weights (``llmcal.cache.weights_fingerprint`` of
its ``ModelSpec`` when the caller names it, the fingerprint the scoring cache
uses too; else a hash of the parameters themselves), their dtype and device
type, the exact prompt token ids (prompt text, chat template and tokenizer act
through these), the end-of-sequence and padding ids, the batch size (it
decides the padding, which can move bfloat16 arithmetic), ``max_new_tokens``
and the transformers and torch versions.  An entry is one record per prompt
(its id and response token ids) behind the store's checksum; one that fails
any check is deleted and generated again, never trusted.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Sequence

from .cache import Store
from .errors import LlmcalError
from .progress import bar
from .validation import PositiveInt, check_value

log = logging.getLogger(__name__)

INSTRUCTIONS = "instructions.jsonl"
CACHE_VERSION = 1  # bump when what a cached response means changes


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


@contextlib.contextmanager
def _plain_generation(model: Any) -> Iterator[None]:
    """Hide the model's own generation defaults (sampling, repetition penalty, ...) for the duration.

    ``generate()`` fills every option the call leaves unset from the model's
    ``generation_config``; the drift responses are defined as plain greedy
    decoding, so that config is a default one while they are generated.
    """
    from transformers import GenerationConfig

    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = core.generation_config
    core.generation_config = GenerationConfig()
    try:
        yield
    finally:
        core.generation_config = saved


def _greedy(model: Any, ids, mask, max_new_tokens: int, eos: set[int], pad_id: int) -> list[list[int]]:
    """Greedy responses of a left-padded batch with ``generate()``: each up to and including its first eos."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=sorted(eos) or None, pad_token_id=pad_id)
    with _plain_generation(model):
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    responses = []
    for row in out[:, ids.shape[1]:].tolist():
        stop = next((j for j, t in enumerate(row) if t in eos), None)
        responses.append(row[:stop + 1] if stop is not None else row[:max_new_tokens])
    return responses


def _forward_params(model: Any) -> set[str]:
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def _keeps_logits(model: Any) -> bool:
    return "logits_to_keep" in _forward_params(model)


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


# ---- the original's responses, cached -------------------------------------------------------
def _weights_digest(model: Any, disable: bool) -> str:
    """sha256 of the original's parameters (names and bytes); an adapter's own weights are left out when disabled.

    Used when the caller does not name the model's files.  Names are
    normalised (peft's ``base_model.model.`` prefix and ``.base_layer``) so a
    base model hashes the same inside and outside a peft wrapper.
    """
    import torch

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if disable and ("lora_" in name or "modules_to_save" in name):
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        t = p.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


def responses_key_doc(original: Any, disable: bool, encoded: Sequence[Sequence[int]], *, max_new_tokens: int,
                      eos: set[int], pad_id: int, batch_size: int, original_spec: Any = None) -> dict:
    """What decides the original's greedy responses (the ``drift`` key document; see the module docstring)."""
    import torch
    import transformers

    from .cache import weights_fingerprint

    p = next(original.parameters())
    weights = weights_fingerprint(original_spec) if original_spec is not None else None
    if weights is None:  # no spec, or weights it cannot name: the parameters themselves
        weights = {"params": _weights_digest(original, disable)}
    prompts = hashlib.sha256()
    for ids in encoded:
        prompts.update(json.dumps(list(ids)).encode())
    return {"version": CACHE_VERSION, "weights": weights, "dtype": str(p.dtype), "device": p.device.type,
            "max_new_tokens": max_new_tokens, "eos": sorted(eos), "pad": pad_id, "batch_size": batch_size,
            "transformers": transformers.__version__, "torch": torch.__version__.split("+")[0],
            "prompts": prompts.hexdigest()}


def responses_key(original: Any, disable: bool, encoded: Sequence[Sequence[int]], **kw: Any) -> str:
    """The ``drift`` store key of the original's greedy responses (:func:`responses_key_doc`)."""
    from .cache import store_key

    return store_key("drift", responses_key_doc(original, disable, encoded, **kw))


def read_responses(store: Any, key: str, ids: list[str], max_new_tokens: int) -> list[list[int]] | None:
    """The cached responses for ``key``, one per prompt of ``ids``; None when absent or damaged (then deleted).

    Each must be 1..max_new_tokens non-negative token ids, and the entry's prompt ids those asked for.
    """
    records = store.get(key)
    if records is None:
        return None
    ok = (len(records) == len(ids)
          and all(isinstance(r, dict) and r.get("id") == i and isinstance(r.get("tokens"), list)
                  and 1 <= len(r["tokens"]) <= max_new_tokens
                  and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in r["tokens"])
                  for r, i in zip(records, ids)))
    if not ok:
        store.reject(key, "its prompts or token ids are not those of this measurement")
        return None
    return [r["tokens"] for r in records]


def write_responses(store: Any, key: str, responses: list[list[int]], ids: list[str]) -> Path:
    return store.put(key, [{"id": i, "tokens": r} for i, r in zip(ids, responses)])


def _left_pad(rows: list[list[int]], pad_id: int):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = torch.tensor(row)
        mask[r, width - len(row):] = 1
    return ids, mask


def _batches(order: list[int], batch_size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


# ---- the measurement ---------------------------------------------------------------
def alignment_drift(original_model: Any | None, tuned_model: Any, tokenizer: Any, *,
                    prompts: Sequence[dict | str] | None = None, max_new_tokens: int = 32,
                    progress: bool = True, batch_size: int = 8, original_spec: Any = None,
                    cache: bool | str | Path = True) -> dict:
    """Mean per-token KL(p_original || p_tuned) on the original model's own greedy responses.

    For each prompt (default: :func:`load_instructions`), rendered with the
    tokenizer's chat template and a generation prompt (the plain prompt text
    when the tokenizer has no chat template), the original model generates its
    greedy response (``generate()`` with ``do_sample=False``, one beam and no
    logits processors, at most ``max_new_tokens`` tokens, stopping after the
    first eos token).  Both models are then run teacher-forced on prompt + that
    response, and at each response position the KL divergence from the
    original's next-token distribution to the tuned model's is taken over the
    full vocabulary, in float32, in nats.

    ``original_model=None`` means ``tuned_model`` is a peft model whose base is
    the original: the original's numbers are computed inside
    ``tuned_model.disable_adapter()``.  Models are put in eval mode for the
    measurement and returned in the mode they were in.

    The responses are cached (module docstring): ``cache=True`` uses the
    llmcal cache, a path uses that folder, ``False`` generates them without
    caching.  ``original_spec`` (the ``ModelSpec`` of the original's weights:
    for ``original_model=None``, the base the adapter was put on) keys the
    cache by the weight files instead of by hashing every parameter.

    Returns ``{"mean_kl": mean over all response tokens, "per_prompt": [{"id",
    "n_tokens", "mean_kl"}, ...] in prompt order, "n_prompts", "n_tokens",
    "max_new_tokens", "responses_cached"}``.
    """
    import torch

    max_new_tokens = check_value(PositiveInt, max_new_tokens, "alignment drift: max_new_tokens")
    batch_size = check_value(PositiveInt, batch_size, "alignment drift: batch_size")
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
    dev = _device(original)

    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(_eval(tuned_model))
        if not disable:
            stack.enter_context(_eval(original_model))

        store = None if cache is False else Store("drift", None if cache is True else Path(cache))
        key = None
        responses = None
        prompt_ids = [it["id"] for it in items]
        if store is not None:
            key = responses_key(original, disable, encoded, max_new_tokens=max_new_tokens, eos=eos, pad_id=pad_id,
                                batch_size=batch_size, original_spec=original_spec)
            responses = read_responses(store, key, prompt_ids, max_new_tokens)
        cached = responses is not None
        if responses is None:
            responses = [[] for _ in items]
            with bar("drift: original responses", total=len(items), show=progress) as task:
                for rows in _batches(order, batch_size):
                    ids, mask = _left_pad([encoded[i] for i in rows], pad_id)
                    with _as_original(original, disable):
                        for i, r in zip(rows, _greedy(original, ids.to(dev), mask.to(dev), max_new_tokens, eos,
                                                       pad_id)):
                            responses[i] = r
                    task.advance(len(rows))
            if store is not None:
                write_responses(store, key, responses, prompt_ids)
        else:
            log.info("alignment drift: the original's responses from the cache (%s)", store.path(key))

        task = stack.enter_context(bar("alignment drift", total=len(items), show=progress))
        for rows in _batches(order, batch_size):
            ids, mask = _left_pad([encoded[i] for i in rows], pad_id)
            lengths = torch.tensor([len(responses[i]) for i in rows])
            n_resp = int(lengths.max())
            resp = torch.full((len(rows), n_resp), pad_id, dtype=torch.long)
            for r, i in enumerate(rows):
                resp[r, :len(responses[i])] = torch.tensor(responses[i])
            resp_mask = (torch.arange(n_resp)[None, :] < lengths[:, None]).long()
            full_ids = torch.cat([ids, resp], dim=1)
            full_mask = torch.cat([mask, resp_mask], dim=1)
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
                counts[i] = len(responses[i])
            task.advance(len(rows))

    n_tokens = sum(counts)
    result = {
        "mean_kl": sum(sums) / n_tokens if n_tokens else 0.0,
        "per_prompt": [{"id": it["id"], "n_tokens": counts[i], "mean_kl": sums[i] / counts[i] if counts[i] else 0.0}
                       for i, it in enumerate(items)],
        "n_prompts": len(items),
        "n_tokens": n_tokens,
        "max_new_tokens": max_new_tokens,
        "responses_cached": cached,
    }
    log.info("alignment drift: mean KL %.6f nats/token over %d tokens of %d prompts",
             result["mean_kl"], n_tokens, len(items))
    return result
