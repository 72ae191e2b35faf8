"""The scoring engine: option logits equal the full model's, batching, resume, NaN handling."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llmcal.data.schema import Question
from llmcal.errors import LlmcalError
from llmcal.prompts import encode_questions
from llmcal.scoring import ScoreOptions, collate, make_batches, option_logits, score


def _questions(n=12):
    return [Question(id=f"q{i}", question=f"What is {i} + {i % 5}? " + "and " * (i % 6),
                     choices=tuple(str(i + d) for d in range(2 + i % 4)), answer=i % 2, subject="math")
            for i in range(n)]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return model, tok


def test_make_batches_respects_budget_and_covers_all():
    lengths = [5, 17, 3, 40, 12, 12, 8, 100]
    batches = make_batches(lengths, batch_tokens=48)
    seen = sorted(i for b in batches for i in b)
    assert seen == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 48
    # longest first, deterministic
    assert batches[0] == [7]
    assert make_batches(lengths, 48) == batches


def test_make_batches_rejects_bad_budget():
    with pytest.raises(LlmcalError, match="batch-tokens"):
        make_batches([3], 0)


@pytest.mark.parametrize("template", ["plain", "chat"])
def test_option_logits_equal_full_forward(tiny, template):
    model, tok = tiny
    enc = encode_questions(_questions(8), tok, template)
    ids, mask, letters, lmask = collate(enc, tok.pad_token_id, "cpu")
    with torch.no_grad():
        got = option_logits(model, ids, mask, letters, lmask)
        for r, e in enumerate(enc):
            full = model(input_ids=torch.tensor([e.input_ids])).logits[0, -1]
            want = full[list(e.letter_ids)]
            k = len(e.letter_ids)
            torch.testing.assert_close(got[r, :k], want, rtol=1e-4, atol=1e-5)
            assert torch.isinf(got[r, k:]).all()


def test_score_batch_budget_does_not_change_results(tiny):
    model, tok = tiny
    enc = encode_questions(_questions(12), tok, "plain")
    a = {p.id: p for p in score(model, tok, enc, options=ScoreOptions(batch_tokens=10_000, progress=False))}
    b = {p.id: p for p in score(model, tok, enc, options=ScoreOptions(batch_tokens=1, progress=False))}
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k].probs, b[k].probs, atol=1e-5)
        assert a[k].pred == b[k].pred


def test_score_skips_done_and_streams_batches(tiny):
    model, tok = tiny
    enc = encode_questions(_questions(10), tok, "plain")
    seen = []
    out = score(model, tok, enc, options=ScoreOptions(batch_tokens=60, progress=False),
                done={"q0", "q1"}, on_batch=seen.append)
    assert {p.id for p in out} == {f"q{i}" for i in range(2, 10)}
    assert len(seen) > 1 and sum(len(b) for b in seen) == 8


def test_shards_partition_the_questions(tiny):
    model, tok = tiny
    enc = encode_questions(_questions(10), tok, "plain")
    ids = []
    for rank in range(2):
        ids += [p.id for p in score(model, tok, enc, options=ScoreOptions(batch_tokens=60, progress=False,
                                                                         shard=(rank, 2)))]
    assert sorted(ids) == sorted(f"q{i}" for i in range(10))


def test_nan_logits_name_the_questions(tiny, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model, tok = tiny
    broken = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        broken.lm_head.weight[enc_letter(tok)] = float("nan")
    enc = encode_questions(_questions(3), tok, "plain")
    with pytest.raises(LlmcalError, match=r"NaN or infinite logits.*q0"):
        score(broken, tok, enc, options=ScoreOptions(progress=False))


def enc_letter(tok):
    return tok(" A", add_special_tokens=False).input_ids[0]


# ---- shared prefixes (few-shot prompts) ------------------------------------------------------
def _fewshot_encoded(tok, template, n_pool=12, n_test=14, k=3):
    from llmcal.data.fewshot import choose_shots

    qs = [Question(id=f"f{i}", question=f"What is {i} + {i % 7}?" + " and" * (i % 5),
                   choices=tuple(str(i + d) for d in range(3 + i % 2)), answer=i % 3,
                   subject=("math", "sums", None)[i % 3]) for i in range(n_pool + n_test)]
    pool, test = qs[:n_pool], qs[n_pool:]
    return encode_questions(test, tok, template, choose_shots(test, pool, k, seed=0))


def test_plan_batches_keeps_prefix_groups_apart_and_zero_shot_unchanged(tiny):
    from llmcal.scoring import plan_batches

    model, tok = tiny
    enc = _fewshot_encoded(tok, "plain")
    assert all(e.prefix_len > 20 for e in enc)
    batches = plan_batches(enc, batch_tokens=64)
    assert sorted(i for b in batches for i in b) == list(range(len(enc)))
    for b in batches:
        heads = {tuple(enc[i].input_ids[: enc[i].prefix_len]) for i in b}
        assert len(heads) == 1  # one shared prefix per batch
        assert len(b) == 1 or len(b) * max(len(enc[i].input_ids) - enc[i].prefix_len for i in b) <= 64
    assert len({tuple(enc[b[0]].input_ids[: enc[b[0]].prefix_len]) for b in batches}) == 3  # three subjects
    zero = encode_questions(_questions(12), tok, "plain")
    assert plan_batches(zero, 64) == make_batches([len(e.input_ids) for e in zero], 64)


@pytest.mark.parametrize("template", ["plain", "chat"])
def test_prefix_cache_predictions_equal_the_full_prompts(tiny, template):
    model, tok = tiny
    enc = _fewshot_encoded(tok, template)
    cached = score(model, tok, enc, options=ScoreOptions(progress=False, batch_tokens=96))
    plain = score(model, tok, enc, options=ScoreOptions(progress=False, batch_tokens=96, prefix_cache=False))
    assert [p.id for p in cached] != [] and {p.id for p in cached} == {e.question.id for e in enc}
    by_id = {p.id: p for p in plain}
    with torch.no_grad():
        for p in cached:
            e = next(x for x in enc if x.question.id == p.id)
            full = model(input_ids=torch.tensor([e.input_ids])).logits[0, -1, list(e.letter_ids)].numpy()
            np.testing.assert_allclose(p.logits, full, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(p.logits, by_id[p.id].logits, rtol=1e-4, atol=1e-5)
            assert p.pred == by_id[p.id].pred


def test_prefix_cache_is_computed_once_per_group(tiny, monkeypatch):
    import llmcal.scoring as scoring

    model, tok = tiny
    enc = _fewshot_encoded(tok, "plain")
    calls = []
    real = scoring.prefix_kv
    monkeypatch.setattr(scoring, "prefix_kv", lambda m, ids: calls.append(len(ids)) or real(m, ids))
    score(model, tok, enc, options=ScoreOptions(progress=False, batch_tokens=48))
    assert len(scoring.plan_batches(enc, 48)) > 3 and len(calls) == 3


def test_sliding_window_models_score_the_full_prompts(tiny_tokenizer):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from llmcal.scoring import prefix_kv

    torch.manual_seed(0)
    tok = tiny_tokenizer
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=16,
                           max_position_embeddings=1024, pad_token_id=tok.pad_token_id)
    model = Gemma3ForCausalLM(cfg).eval()
    enc = _fewshot_encoded(tok, "plain", n_test=4)
    assert prefix_kv(model, enc[0].input_ids[: enc[0].prefix_len]) is None
    got = score(model, tok, enc, options=ScoreOptions(progress=False))
    with torch.no_grad():
        for p, e in zip(sorted(got, key=lambda p: p.id), sorted(enc, key=lambda e: e.question.id)):
            full = model(input_ids=torch.tensor([e.input_ids])).logits[0, -1, list(e.letter_ids)].numpy()
            np.testing.assert_allclose(p.logits, full, rtol=1e-4, atol=1e-4)
