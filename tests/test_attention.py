"""CPU causal attention: equals sdpa's, hands every other case to sdpa, and the switch restores the model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmcal import attention
from llmcal.attention import attention_forward, causal_attention, scoring_attention


def _reference(q, k, v, scaling):
    """Causal attention written out: repeated key heads, explicit mask, float64."""
    H, KV = q.shape[1], k.shape[1]
    k = k.double().repeat_interleave(H // KV, dim=1)
    v = v.double().repeat_interleave(H // KV, dim=1)
    T = q.shape[2]
    scores = q.double() @ k.transpose(-1, -2) * scaling
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)  # (B, T, H, D)


def _qkv(B, H, KV, T, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # (B, T, heads, D) storage viewed as (B, heads, T, D), the strided layout transformers passes in
    q = torch.randn(B, T, H, D, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(B, T, KV, D, generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(B, T, KV, D, generator=g).to(dtype).transpose(1, 2)
    return q, k, v


@pytest.mark.parametrize("block,score_bytes", [(48, 2 << 20), (5, 2 << 20), (7, 1)])
@pytest.mark.parametrize("B,H,KV,T", [(3, 4, 2, 29), (2, 6, 6, 1 + 16), (1, 9, 3, 70), (4, 8, 1, 2)])
def test_causal_attention_matches_reference(monkeypatch, block, score_bytes, B, H, KV, T):
    # small blocks and a 1-byte budget exercise several query blocks and one batch row per chunk
    monkeypatch.setattr(attention, "QUERY_BLOCK", block)
    monkeypatch.setattr(attention, "SCORE_BYTES", score_bytes)
    q, k, v = _qkv(B, H, KV, T, 16)
    got = causal_attention(q, k, v, 0.3)
    assert got.shape == (B, T, H, 16) and got.is_contiguous() and got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), _reference(q, k, v, 0.3).numpy(), atol=2e-6)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=0.3).transpose(1, 2)
    torch.testing.assert_close(got, sdpa, atol=2e-6, rtol=1e-5)


def test_causal_attention_default_scaling_and_bfloat16():
    q, k, v = _qkv(2, 6, 2, 50, 32, dtype=torch.bfloat16)
    got = causal_attention(q, k, v)
    assert got.dtype == torch.bfloat16
    want = _reference(q.float(), k.float(), v.float(), 32 ** -0.5)
    # float32 inside, one rounding to bfloat16 at the end
    assert (got.double() - want).abs().max().item() < 2e-2


class _Module(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2


def _spy(monkeypatch):
    calls = []
    real = attention.causal_attention

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(attention, "causal_attention", spy)
    return calls


def test_attention_forward_takes_only_the_plain_causal_case(monkeypatch):
    calls = _spy(monkeypatch)
    q, k, v = _qkv(2, 4, 2, 9, 8)
    out, weights = attention_forward(_Module(), q, k, v, None, scaling=0.25)
    assert calls == [1] and weights is None
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=0.25).transpose(1, 2)
    torch.testing.assert_close(out, sdpa, atol=2e-6, rtol=1e-5)

    # every other case goes to sdpa, and gets sdpa's answer for it
    mask = torch.ones(2, 1, 9, 9, dtype=torch.bool).tril()
    out, _ = attention_forward(_Module(), q, k, v, mask, scaling=0.25)  # a mask (here the causal one): sdpa
    torch.testing.assert_close(out, sdpa, atol=2e-6, rtol=1e-5)
    out, _ = attention_forward(_Module(), q[:, :, -1:], k, v, None, scaling=0.25)  # one query (decoding): sdpa
    torch.testing.assert_close(out, sdpa[:, -1:], atol=2e-6, rtol=1e-5)  # the last query sees every key
    out, _ = attention_forward(_Module(), q, k, v, None, scaling=0.25, is_causal=False)  # bidirectional: sdpa
    both = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, scale=0.25).transpose(1, 2)
    torch.testing.assert_close(out, both, atol=2e-6, rtol=1e-5)
    assert not torch.allclose(both, sdpa, atol=1e-3)  # the case differs from the causal one
    # training: sdpa, differentiable, with sdpa's gradient (checked on a clone of the same inputs)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out, _ = attention_forward(_Module(), qg, kg, vg, None, scaling=0.25)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))  # a loss that weighs every output
    (out * w).sum().backward()
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qr, kr, vr, is_causal=True, enable_gqa=True, scale=0.25).transpose(1, 2)
    (ref * w).sum().backward()
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    for got, want in ((qg.grad, qr.grad), (kg.grad, kr.grad), (vg.grad, vr.grad)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert calls == [1]


def test_score_with_and_without_cpu_attention_agree(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcal.data.schema import Question
    from llmcal.prompts import encode_questions
    from llmcal.scoring import ScoreOptions, score

    monkeypatch.setattr(attention, "QUERY_BLOCK", 8)  # several blocks at these prompt lengths
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    qs = [Question(id=f"q{i}", question="What is " + "one and " * i + "two?", choices=("1", "2", "3"),
                   answer=i % 3, subject="s") for i in range(7)]
    enc = encode_questions(qs, tok, "plain")
    calls = _spy(monkeypatch)
    assert model.config._attn_implementation == "sdpa"
    fast = score(model, tok, enc, options=ScoreOptions(progress=False, batch_tokens=200))
    assert calls and model.config._attn_implementation == "sdpa"  # used, then restored
    n = len(calls)
    slow = score(model, tok, enc, options=ScoreOptions(progress=False, batch_tokens=200, cpu_attention=False))
    assert len(calls) == n
    for a, b in zip(fast, slow):
        assert a.id == b.id and a.pred == b.pred
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)


def test_scoring_attention_restores_on_error_and_skips_other_implementations(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with pytest.raises(RuntimeError), scoring_attention(model):
        assert model.config._attn_implementation == attention.NAME
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
    with scoring_attention(eager):
        assert eager.config._attn_implementation == "eager"
    with scoring_attention(model, enabled=False):
        assert model.config._attn_implementation == "sdpa"


def _family_model(family, tok):
    import transformers as tf

    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                  max_position_embeddings=512)
    config, cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM),
        "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM),
    }[family]
    extra = {"gemma3_text": dict(head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
             "qwen3": dict(head_dim=8)}.get(family, {})
    torch.manual_seed(0)
    return cls(config(**common, **extra)).eval()


def _tiny_questions(tok):
    from llmcal.data.schema import Question
    from llmcal.prompts import encode_questions

    qs = [Question(id=f"q{i}", question="What is " + "one and " * (2 * i) + "two?", choices=("1", "2", "3"),
                   answer=i % 3, subject="s") for i in range(6)]
    return encode_questions(qs, tok, "plain")


@pytest.mark.parametrize("family", sorted(attention.FAMILIES))
def test_every_listed_family_scores_as_with_sdpa(family, tiny_tokenizer, monkeypatch):
    from llmcal.scoring import ScoreOptions, score

    model = _family_model(family, tiny_tokenizer)
    assert model.config.get_text_config().model_type == family
    enc = _tiny_questions(tiny_tokenizer)
    calls = _spy(monkeypatch)
    fast = score(model, tiny_tokenizer, enc, options=ScoreOptions(progress=False, batch_tokens=150))
    # gemma3's sliding layer (window 8, shorter than the prompts) gets a mask and stays on sdpa
    assert calls, f"{family}: the CPU attention was never used"
    slow = score(model, tiny_tokenizer, enc, options=ScoreOptions(progress=False, batch_tokens=150,
                                                                 cpu_attention=False))
    for a, b in zip(fast, slow):
        assert a.pred == b.pred
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)
    assert model.config._attn_implementation == "sdpa"


def test_no_switch_for_unlisted_families_or_mixed_implementations(tiny_model_dir, tiny_tokenizer, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    monkeypatch.setattr(attention, "FAMILIES", frozenset({"qwen2"}))
    with scoring_attention(model):
        assert model.config._attn_implementation == "sdpa"
    monkeypatch.undo()
    # a sub-model on another implementation: switching and restoring all of them would lose it
    model.model.config = model.config.__class__(**model.config.to_dict())
    model.model.config._attn_implementation = "eager"
    with scoring_attention(model):
        assert model.config._attn_implementation == "sdpa"
        assert model.model.config._attn_implementation == "eager"


def test_attention_forward_leaves_other_value_head_sizes_to_sdpa(monkeypatch):
    calls = _spy(monkeypatch)
    q, k, _ = _qkv(1, 4, 2, 6, 8)
    v = torch.randn(1, 2, 6, 4)
    out, _ = attention_forward(_Module(), q, k, v, None, scaling=0.3)
    assert calls == [] and out.shape == (1, 6, 4, 4)
