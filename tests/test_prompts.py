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
