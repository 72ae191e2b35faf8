"""Alignment drift: KL(original || tuned) on the original's greedy responses, plain models and peft adapters."""
from __future__ import annotations

import copy

import pytest
import torch

from llmcal.drift import alignment_drift, load_instructions
from llmcal.errors import LlmcalError

N_PROMPTS = 10
NEW = 4


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts():
    return load_instructions()[:N_PROMPTS]


def _perturbed(model, scale=0.05, seed=1):
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return m


def test_instructions_asset_loads():
    items = load_instructions()
    assert len(items) >= 30
    ids = [it["id"] for it in items]
    assert len(set(ids)) == len(ids)
    assert all(set(it) == {"id", "prompt"} and it["prompt"].strip() for it in items)


def test_drift_against_itself_is_zero(tiny, prompts):
    model, tok = tiny
    r = alignment_drift(model, model, tok, prompts=prompts, max_new_tokens=NEW, progress=False, batch_size=4)
    assert r["mean_kl"] == pytest.approx(0.0, abs=1e-6)
    assert r["n_prompts"] == N_PROMPTS and r["max_new_tokens"] == NEW
    assert [p["id"] for p in r["per_prompt"]] == [p["id"] for p in prompts]
    assert all(1 <= p["n_tokens"] <= NEW for p in r["per_prompt"])
    assert r["n_tokens"] == sum(p["n_tokens"] for p in r["per_prompt"])
    assert all(abs(p["mean_kl"]) <= 1e-6 for p in r["per_prompt"])


def test_drift_against_a_perturbed_copy_is_positive_and_batch_invariant(tiny, prompts):
    model, tok = tiny
    other = _perturbed(model)
    r = alignment_drift(model, other, tok, prompts=prompts, max_new_tokens=NEW, progress=False, batch_size=4)
    assert r["mean_kl"] > 1e-4
    assert all(p["mean_kl"] > 0 for p in r["per_prompt"])
    want = sum(p["mean_kl"] * p["n_tokens"] for p in r["per_prompt"]) / r["n_tokens"]
    assert r["mean_kl"] == pytest.approx(want)
    # Padding must not change anything: one prompt at a time gives the same numbers.
    one = alignment_drift(model, other, tok, prompts=prompts[:3], max_new_tokens=NEW, progress=False, batch_size=1)
    for a, b in zip(one["per_prompt"], r["per_prompt"][:3]):
        assert a["n_tokens"] == b["n_tokens"]
        assert a["mean_kl"] == pytest.approx(b["mean_kl"], rel=1e-4, abs=1e-7)


def _direct_kl(model, other, tok, ids, new: int) -> tuple[int, float]:
    """Greedy response of ``model`` to prompt ``ids`` with generate(), then its mean per-token
    KL(model || other) from two unpadded forwards: (response length, mean KL)."""
    ids = torch.tensor([ids])
    with torch.no_grad():
        full = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        lo = torch.log_softmax(model(full).logits[0, ids.shape[1] - 1:-1].float(), -1)
        lt = torch.log_softmax(other(full).logits[0, ids.shape[1] - 1:-1].float(), -1)
    return full.shape[1] - ids.shape[1], (lo.exp() * (lo - lt)).sum(-1).mean().item()


def test_drift_matches_a_direct_computation(tiny, prompts):
    """One prompt by hand: greedy response with generate(), then KL from two unpadded forwards."""
    model, tok = tiny
    other = _perturbed(model, seed=2)
    p = prompts[0]
    text = tok.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=False,
                                   add_generation_prompt=True)
    n, want = _direct_kl(model, other, tok, tok(text, add_special_tokens=False)["input_ids"], NEW)
    got = alignment_drift(model, other, tok, prompts=[p], max_new_tokens=NEW, progress=False)
    assert got["n_tokens"] == n
    assert got["mean_kl"] == pytest.approx(want, rel=1e-4)


def test_drift_with_peft_adapter_disabled(tiny, prompts):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                                 target_modules=["q_proj", "v_proj"]))
    peft_model.train()  # dropout on: the measurement must switch it off and restore the mode
    kw = dict(prompts=prompts[:6], max_new_tokens=NEW, progress=False, batch_size=3)
    assert alignment_drift(None, peft_model, tok, **kw)["mean_kl"] == pytest.approx(0.0, abs=1e-6)  # B = 0
    assert peft_model.training
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    r = alignment_drift(None, peft_model, tok, **kw)
    assert r["mean_kl"] > 1e-4
    # The same number as with a separate copy of the original.
    assert alignment_drift(model, peft_model, tok, **kw)["mean_kl"] == pytest.approx(r["mean_kl"], rel=1e-5)


def test_drift_rejects_bad_input(tiny):
    model, tok = tiny
    with pytest.raises(LlmcalError, match="peft"):
        alignment_drift(None, model, tok, prompts=["hi"], progress=False)
    with pytest.raises(LlmcalError, match="max_new_tokens"):
        alignment_drift(model, model, tok, prompts=["hi"], max_new_tokens=0, progress=False)
    with pytest.raises(LlmcalError, match="no prompts"):
        alignment_drift(model, model, tok, prompts=[], progress=False)
    with pytest.raises(LlmcalError, match="duplicate"):
        alignment_drift(model, model, tok, prompts=[{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}],
                        progress=False)


def test_responses_stop_at_eos_and_padding_is_exact(tiny, prompts):
    """Make the 3rd greedy token of prompt 0 the eos: its response stops there, others run on (mixed lengths)."""
    model, tok = tiny
    text = tok.apply_chat_template([{"role": "user", "content": prompts[0]["prompt"]}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                             eos_token_id=None, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    # the setting this test needs: a 3rd greedy token that is new (else the response would stop earlier)
    assert gen[2] not in gen[:2], gen
    orig = copy.deepcopy(model)
    orig.generation_config.eos_token_id = gen[2]
    other = _perturbed(model, seed=3)
    kw = dict(prompts=prompts[:5], max_new_tokens=6, progress=False)
    batched = alignment_drift(orig, other, tok, batch_size=5, **kw)
    single = alignment_drift(orig, other, tok, batch_size=1, **kw)
    lengths = [p["n_tokens"] for p in batched["per_prompt"]]
    assert lengths[0] == 3 and len(set(lengths)) > 1
    for a, b in zip(batched["per_prompt"], single["per_prompt"]):
        assert a["n_tokens"] == b["n_tokens"]
        assert a["mean_kl"] == pytest.approx(b["mean_kl"], rel=1e-4, abs=1e-7)


def test_plain_text_fallback_without_chat_template(tiny, prompts):
    model, tok = tiny
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    other = _perturbed(model)
    r = alignment_drift(model, other, plain, prompts=prompts[:3], max_new_tokens=3, progress=False)
    # each prompt's text itself is the prompt, measured as by hand
    for p, got in zip(prompts[:3], r["per_prompt"]):
        n, want = _direct_kl(model, other, plain, plain(p["prompt"])["input_ids"], 3)
        assert got["id"] == p["id"] and got["n_tokens"] == n
        assert got["mean_kl"] == pytest.approx(want, rel=1e-4)
    assert r["n_tokens"] == sum(p["n_tokens"] for p in r["per_prompt"])
    assert alignment_drift(model, model, plain, prompts=prompts[:3], max_new_tokens=3,
                           progress=False)["mean_kl"] == pytest.approx(0.0, abs=1e-6)


# ---- the original's responses are generated once and cached ------------------------------------------------------
def test_responses_are_cached_and_reused(tiny, prompts, tmp_path):
    model, tok = tiny
    other = _perturbed(model)
    kw = dict(prompts=prompts[:4], max_new_tokens=NEW, progress=False, batch_size=2, cache=tmp_path)
    first = alignment_drift(model, other, tok, **kw)
    assert not first["responses_cached"] and len(list(tmp_path.rglob("*.jsonl"))) == 1
    second = alignment_drift(model, _perturbed(model, seed=5), tok, **kw)  # another tuned model, same original
    assert second["responses_cached"] and len(list(tmp_path.rglob("*.jsonl"))) == 1
    again = alignment_drift(model, other, tok, **kw)
    assert again["responses_cached"] and again == {**first, "responses_cached": True}


def test_cache_key_changes_with_what_changes_the_responses(tiny, prompts, tmp_path):
    from llmcal.drift import _encode, _normalise_prompts, responses_key

    model, tok = tiny
    enc = _encode(_normalise_prompts(prompts[:3]), tok)
    base = dict(max_new_tokens=NEW, eos={tok.eos_token_id}, pad_id=tok.pad_token_id, batch_size=2)
    k = responses_key(model, False, enc, **base)
    assert responses_key(model, False, enc, **base) == k
    assert responses_key(_perturbed(model, scale=1e-3), False, enc, **base) != k  # weights
    assert responses_key(copy.deepcopy(model).to(torch.bfloat16), False, enc, **base) != k  # dtype
    assert responses_key(model, False, enc[:2], **base) != k  # prompts
    assert responses_key(model, False, _encode(_normalise_prompts(prompts[:3]), _plain(tok)), **base) != k  # template
    for change in ({"max_new_tokens": NEW + 1}, {"eos": {tok.eos_token_id, 5}}, {"batch_size": 3}):
        assert responses_key(model, False, enc, **{**base, **change}) != k


def _plain(tok):
    t = copy.deepcopy(tok)
    t.chat_template = None
    return t


def test_cache_key_from_the_model_spec_follows_the_weight_files(tiny, prompts, tmp_path, tiny_model_dir):
    import os
    import shutil

    from llmcal.drift import _encode, _normalise_prompts, responses_key
    from llmcal.models import resolve_model

    model, tok = tiny
    d = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, d)
    enc = _encode(_normalise_prompts(prompts[:2]), tok)
    kw = dict(max_new_tokens=NEW, eos={tok.eos_token_id}, pad_id=tok.pad_token_id, batch_size=2)
    k = responses_key(model, False, enc, original_spec=resolve_model(str(d)), **kw)
    assert k != responses_key(model, False, enc, **kw)
    weights = d / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten weights
    assert responses_key(model, False, enc, original_spec=resolve_model(str(d)), **kw) != k


def test_an_adapters_original_named_by_its_spec_is_cached_under_the_scores_fingerprint(tiny, prompts, tmp_path,
                                                                                      tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from llmcal.cache import Store, weights_fingerprint
    from llmcal.drift import _encode, _normalise_prompts, responses_key_doc
    from llmcal.models import resolve_model

    model, tok = tiny
    spec = resolve_model(str(tiny_model_dir))
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    kw = dict(prompts=prompts[:3], max_new_tokens=NEW, progress=False, batch_size=2, cache=tmp_path,
              original_spec=spec)
    first = alignment_drift(None, peft_model, tok, **kw)
    assert not first["responses_cached"] and alignment_drift(None, peft_model, tok, **kw)["responses_cached"]
    (entry,) = tmp_path.rglob("*.jsonl")
    enc = _encode(_normalise_prompts(prompts[:3]), tok)
    doc = responses_key_doc(peft_model, True, enc, max_new_tokens=NEW, eos={tok.eos_token_id},
                            pad_id=tok.pad_token_id, batch_size=2, original_spec=spec)
    assert doc["weights"] == weights_fingerprint(spec)  # the files, not the parameters: what the scores key uses
    assert entry == Store("drift", tmp_path).path(Store("drift").key(doc))


def _damage(entry, how, vocab):
    """Damage a drift store entry (header line, then one {"id", "tokens"} record per prompt) in place."""
    import json

    head, *lines = entry.read_text().splitlines()
    if how == "token":  # valid JSON, a plausible token id: only the checksum catches it
        rec = json.loads(lines[0])
        rec["tokens"][0] = (rec["tokens"][0] + 1) % vocab
        lines[0] = json.dumps(rec)
    elif how == "truncate":
        entry.write_text(entry.read_text()[:40])
        return
    elif how == "checksum":
        head = json.dumps({**json.loads(head), "sha256": "0" * 64})
    else:  # a consistent entry (checksum rewritten) whose records are not this measurement's prompts
        lines = lines[:-1]
        body = "".join(line + "\n" for line in lines).encode()
        import hashlib

        head = json.dumps({**json.loads(head), "n": len(lines), "sha256": hashlib.sha256(body).hexdigest()})
    entry.write_text("".join(line + "\n" for line in [head, *lines]))


@pytest.mark.parametrize("damage", ["token", "truncate", "checksum", "records"])
def test_a_damaged_cache_entry_is_recomputed_not_trusted(tiny, prompts, tmp_path, damage, caplog):
    import logging

    model, tok = tiny
    other = _perturbed(model)
    kw = dict(prompts=prompts[:4], max_new_tokens=NEW, progress=False, batch_size=2, cache=tmp_path)
    want = alignment_drift(model, other, tok, **kw)
    (entry,) = tmp_path.rglob("*.jsonl")
    _damage(entry, damage, len(tok))
    with caplog.at_level(logging.WARNING, logger="llmcal.cache"):
        got = alignment_drift(model, other, tok, **kw)
    assert not got["responses_cached"] and got == want
    assert any("damaged drift response cache entry" in r.getMessage() for r in caplog.records)
    assert alignment_drift(model, other, tok, **kw)["responses_cached"]  # rewritten, good again


def test_generation_ignores_the_models_own_generation_defaults(tiny, prompts):
    model, tok = tiny
    other = _perturbed(model)
    kw = dict(prompts=prompts[:4], max_new_tokens=6, progress=False, cache=False)
    plain = alignment_drift(model, other, tok, **kw)
    assert plain["n_tokens"] > plain["n_prompts"]
    penalised = copy.deepcopy(model)
    # if generate() took the model's own defaults, every response would be the eos token alone
    penalised.generation_config.suppress_tokens = [t for t in range(len(tok)) if t != tok.eos_token_id]
    penalised.generation_config.repetition_penalty = 50.0
    got = alignment_drift(penalised, other, tok, **kw)
    assert got == plain
    assert penalised.generation_config.repetition_penalty == 50.0  # the model's config is restored
