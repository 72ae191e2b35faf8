"""Prompt templates (byte-for-byte plain format) and letter-token discovery."""
from __future__ import annotations

import pytest

from llmcal.data.schema import Question
from llmcal.errors import LlmcalError
from llmcal.prompts import encode_questions, format_prompt, resolve_template

Q = Question(id="x1", question="  What is 2+2?\n", choices=("3", "4", "5", "22"), answer=1, subject="elementary mathematics")


def test_plain_is_lm_eval_mmlu_format():
    want = ("The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
            "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:")
    assert format_prompt(Q, "plain") == want


def test_plain_without_subject_omits_header():
    q = Question(id="x", question="Q?", choices=("a", "b"), answer=0)
    assert format_prompt(q, "plain") == "Q?\nA. a\nB. b\nAnswer:"


def test_chat_uses_tokenizer_template(tiny_tokenizer):
    p = format_prompt(Q, "chat", tiny_tokenizer)
    assert p.startswith("<|im_start|>user\n") and p.endswith("<|im_start|>assistant\n")
    assert "A. 3\nB. 4\nC. 5\nD. 22" in p


def test_letter_ids_are_first_new_token(tiny_tokenizer):
    tok = tiny_tokenizer
    for template, cont in (("plain", " {}"), ("chat", "{}")):
        [e] = encode_questions([Q], tok, template)
        for j, L in enumerate("ABCD"):
            prompt = format_prompt(Q, template, tok)
            full = tok(prompt + cont.format(L), add_special_tokens=template == "plain").input_ids
            assert full[-1] == e.letter_ids[j]
        assert list(e.input_ids) == tok(format_prompt(Q, template, tok),
                                        add_special_tokens=template == "plain").input_ids


def test_multi_token_letter_is_an_error_naming_tokenizer_and_letter():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import build_tokenizer

    tok = build_tokenizer(letters_single=False)  # " A" was never merged: two tokens
    with pytest.raises(LlmcalError, match=r"tokenizer .*letter 'A'.*not exactly one new token"):
        encode_questions([Q], tok, "plain")


def test_auto_template(tiny_tokenizer):
    assert resolve_template("auto", tiny_tokenizer) == "chat"
    with pytest.raises(LlmcalError, match="unknown template"):
        resolve_template("fancy", tiny_tokenizer)


def test_chat_without_template_is_a_clear_error(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    with pytest.raises(LlmcalError, match="no chat template"):
        encode_questions([Q], tok, "chat")
    assert resolve_template("auto", tok) == "plain"


# ---- few-shot prompts --------------------------------------------------------------------------
S1 = Question(id="s1", question="What is 1+1?", choices=("1", "2", "3", "4"), answer=1, subject="elementary mathematics")
S2 = Question(id="s2", question=" What is 3-1? ", choices=("0", "1", "2", "3"), answer=2, subject="elementary mathematics")


def test_plain_fewshot_is_lm_eval_mmlu_fewshot_format():
    # lm-eval: description, then per example doc_to_text + " " + target + "\n\n", then doc_to_text.
    want = ("The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
            "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
            "What is 3-1?\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: C\n\n"
            "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:")
    assert format_prompt(Q, "plain", shots=(S1, S2)) == want
    assert format_prompt(Q, "plain", shots=()) == format_prompt(Q, "plain")


def test_chat_fewshot_is_one_turn_pair_per_example(tiny_tokenizer):
    p = format_prompt(Q, "chat", tiny_tokenizer, shots=(S1,))
    assert p.count("<|im_start|>user\n") == 2 and "<|im_start|>assistant\nB<|im_end|>" in p
    assert p.endswith("<|im_start|>assistant\n") and p.index("What is 1+1?") < p.index("What is 2+2?")


@pytest.mark.parametrize("template", ["plain", "chat"])
def test_questions_with_the_same_examples_share_their_prefix_tokens(tiny_tokenizer, template):
    tok = tiny_tokenizer
    q2 = Question(id="x2", question="What is 7+8?", choices=("15", "16"), answer=0, subject="elementary mathematics")
    q3 = Question(id="x3", question="Which is larger?", choices=("1", "2"), answer=1, subject="other")
    shots = {"x1": (S1, S2), "x2": (S1, S2), "x3": (S2,)}
    e1, e2, e3 = encode_questions([Q, q2, q3], tok, template, shots)
    assert e1.prefix_len == e2.prefix_len > 0
    assert e1.input_ids[: e1.prefix_len] == e2.input_ids[: e2.prefix_len]
    # the prefix ends before the question's own text and is the context's tokens
    from llmcal.prompts import chat_user_message, plain_body

    ctx = format_prompt(Q, template, tok, shots=(S1, S2))
    ctx = ctx[: ctx.rindex(plain_body(Q) if template == "plain" else chat_user_message(Q))]
    ctx_ids = tok(ctx, add_special_tokens=template == "plain").input_ids
    assert list(e1.input_ids[: e1.prefix_len]) == ctx_ids[: e1.prefix_len] and e1.prefix_len >= len(ctx_ids) - 1
    assert 0 < e3.prefix_len < len(e3.input_ids)
    # the prompt tokens are the whole prompt's, as without a prefix
    assert list(e1.input_ids) == tok(format_prompt(Q, template, tok, shots=(S1, S2)),
                                     add_special_tokens=template == "plain").input_ids
    assert encode_questions([Q], tok, template)[0].prefix_len == 0
