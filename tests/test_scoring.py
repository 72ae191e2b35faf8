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
