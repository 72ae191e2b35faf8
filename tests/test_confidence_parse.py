"""llmcal.confidence.parse: the letter, the stated confidence and P(True), on real replies and on edge cases.

tests/data/confidence_replies.jsonl holds replies collected from the served models (llama.cpp's server with
the SmolLM2-135M-Instruct and Qwen2.5-Coder-1.5B-Instruct GGUFs, through ``llmcal eval --confidence ...``),
each with the parse a reader of the reply would give it (checked by hand): a letter, a confidence, or
unparseable with the reason.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from llmcal.confidence.parse import parse_confidence, parse_final_letter, parse_letter, read_true
from llmcal.data.schema import LETTERS, Question

CORPUS = Path(__file__).parent / "data" / "confidence_replies.jsonl"
Q = Question(id="q", question="Which is a conic projection?", choices=("Mercator", "Lambert", "a globe", "Robinson"),
             answer=1)


def _corpus() -> list[dict]:
    return [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


def _read(entry: dict) -> dict:
    q = Question(id="q", question=entry["question"], choices=tuple(entry["choices"]), answer=0)
    kind = entry["kind"]
    if kind in ("answer", "final"):
        j, why = (parse_letter if kind == "answer" else parse_final_letter)(entry["text"], q)
        return {"letter": LETTERS[j]} if j is not None else {"unparseable": why}
    if kind == "confidence":
        c, why = parse_confidence(entry["text"], "2stage", alone=True)
        return {"confidence": c} if c is not None else {"unparseable": why}
    j, why = parse_letter(entry["text"], q)
    if j is None:
        return {"unparseable": why}
    c, why = parse_confidence(entry["text"], kind)
    return {"letter": LETTERS[j], "confidence": c} if c is not None else {"unparseable": why}


def test_the_corpus_covers_both_models_every_kind_and_both_outcomes():
    corpus = _corpus()
    assert {e["model"] for e in corpus} == {"smollm2-135m-instruct", "qwen2.5-coder-1.5b-instruct"}
    assert {e["kind"] for e in corpus} == {"answer", "final", "confidence", "1stage-percent", "1stage-prob"}
    assert any("unparseable" in e["expected"] for e in corpus)
    assert any("confidence" in e["expected"] for e in corpus) and any("letter" in e["expected"] for e in corpus)


@pytest.mark.parametrize("entry", _corpus(), ids=lambda e: f"{e['model']}-{e['kind']}-{e['text'][:30]!r}")
def test_real_replies_parse_as_expected(entry):
    got = _read(entry)
    want = entry["expected"]
    if "confidence" in want:
        assert got.get("confidence") == pytest.approx(want["confidence"]) and got.get("letter") == want.get("letter")
    else:
        assert got == want


# ---- the letter --------------------------------------------------------------------------------
@pytest.mark.parametrize("text, want", [
    ("B", 1), (" B ", 1), ("(B)", 1), ("B.", 1), ("B)", 1), ("B:", 1), ("**B**", 1), ("`C`", 2),
    ("B. Lambert", 1), ("(B) Lambert", 1), ("B, 90%", 1), ("B: Lambert is conic", 1),
    ("Answer: B", 1), ("The correct answer is (C).", 2), ("answer is D", 3), ("The answer: B. Lambert", 1),
    ("Option B", 1), ("choice: A", 0), ("B. Lambert\nThe correct answer is B. Lambert", 1),
    ("lambert", 1), ("A globe.", 2),  # the text of exactly one option (case and a final period aside)
])
def test_letters_that_are_read(text, want):
    assert parse_letter(text, Q) == (want, None)


@pytest.mark.parametrize("text, reason", [
    ("", "empty reply"), ("   ", "empty reply"), ("I am not sure.", "no option letter"),
    ("A conic projection distorts shapes.", "no option letter"),  # "A" followed by a space is a word
    ("E", "letter E is not an option (A-D)"), ("Answer: F", "letter F is not an option (A-D)"),
    ("A. Mercator\nThe answer is D. Robinson", "names several letters (A, D)"),
    ("Answer: A or Answer: B", "names several letters (A, B)"), ("the answer is b", "no option letter"),
    ("The answer is \u212a", "no option letter"),  # the Kelvin sign, which IGNORECASE alone matches as K
    ("Answer: \u0130", "no option letter"),  # dotted capital I
])
def test_replies_that_are_not_read_say_why(text, reason):
    assert parse_letter(text, Q) == (None, reason)


def test_after_reasoning_the_last_answer_line_wins_and_nothing_else_counts():
    text = "Option A is a cylinder. Option B is a cone, so the answer is B.\nWait, D?\nAnswer: D"
    assert parse_final_letter(text, Q) == (3, None)
    assert parse_final_letter("B. Lambert", Q) == (None, "no final \"Answer: X\" line")
    assert parse_final_letter("so the answer is: C", Q) == (2, None)
    assert parse_final_letter("Answer: G", Q) == (None, "letter G is not an option (A-D)")
    assert parse_final_letter("Answer: \u212a", Q) == (None, "no final \"Answer: X\" line")


# ---- the stated confidence --------------------------------------------------------------------------
@pytest.mark.parametrize("text, template, alone, want", [
    ("Answer: B\nConfidence: 85%", "1stage-percent", False, 0.85),
    ("Answer: B\nConfidence: 85", "1stage-percent", False, 0.85),  # a bare number is a percentage here
    ("Answer: B\nConfidence: 0.85", "1stage-percent", False, 0.85),  # a decimal at most 1 is a probability
    ("Answer: B\nConfidence: 1", "1stage-percent", False, 0.01),
    ("Answer: B\nConfidence: 1", "1stage-prob", False, 1.0),  # the probability template: 1 is certainty
    ("Answer: B\nConfidence: 0.7", "1stage-prob", False, 0.7),
    ("Answer: B\nConfidence: 70", "1stage-prob", False, 0.7),  # above 1: a percentage
    ("Answer: B\nconfidence level is 60 percent", "1stage-percent", False, 0.6),
    ("B, 90%", "1stage-percent", False, 0.9),  # no label: the only number with %
    ("Confidence: 100%", "1stage-percent", False, 1.0), ("Confidence: 0%", "1stage-percent", False, 0.0),
    ("I'm 95% confident that my answer is correct.", "2stage", True, 0.95),
    ("80", "2stage", True, 0.8), ("A. 90%", "2stage", True, 0.9), ("Confidence: .5", "2stage", True, 0.5),
    ("Answer: B\nConfidence: 9/10", "1stage-percent", False, 0.9),  # a fraction is x/y, not the 9 before it
    ("Answer: B\nConfidence: 8 out of 10", "1stage-prob", False, 0.8), ("7/10", "2stage", True, 0.7),
    ("Confidence: 90, as I said", "2stage", True, 0.9),  # a comma followed by a space ends the number
])
def test_confidences_that_are_read(text, template, alone, want):
    c, why = parse_confidence(text, template, alone=alone)
    assert why is None and c == pytest.approx(want)


@pytest.mark.parametrize("text, template, alone, reason", [
    ("Answer: B", "1stage-percent", False, "no confidence number"),
    ("Answer: B. 4", "1stage-percent", False, "no confidence label or percentage"),  # 4 is the option text
    ("Confidence: high", "1stage-percent", False, "no confidence number"),
    ("Confidence: 150%", "1stage-percent", False, "confidence 150% outside 0-100%"),
    ("Confidence: 250", "1stage-prob", False, "confidence 250 outside 0-100"),
    ("Confidence: 80%. Confidence: 60%", "1stage-percent", False, "several confidences (80%, 60%)"),
    ("A. 90%\nB. 10%", "2stage", True, "several numbers (90%, 10%)"),
    ("-20", "2stage", True, "a negative confidence (-20)"), ("", "2stage", True, "empty reply"),
    # written in ways that would read as another number: refused with the reason, never misread
    ("Answer: B\nConfidence: 0,85", "1stage-prob", False,
     "confidence 0,85 written with a comma (decimal or thousands: not read)"),
    ("Answer: B\nConfidence: 1e-2", "1stage-prob", False, "confidence 1e-2 written with exponent notation"),
    ("Answer: B\nConfidence: 11/10", "1stage-prob", False, "confidence 11/10 is not a fraction from 0 to 1"),
    ("Answer: B\nConfidence: 9/0", "1stage-prob", False, "confidence 9/0 is not a fraction from 0 to 1"),
    ("Answer: B\nConfidence: 9/10%", "1stage-percent", False,
     "confidence 9/10% is neither a fraction nor a percentage"),
    ("Answer: B, since 3/4 of the cases agree", "1stage-percent", False, "no confidence label or percentage"),
])
def test_confidences_that_are_not_read_say_why(text, template, alone, reason):
    assert parse_confidence(text, template, alone=alone) == (None, reason)


# ---- P(True) ----------------------------------------------------------------------------------
def test_p_true_adds_the_spellings_of_each_side_and_renormalises():
    pairs = [("True", math.log(0.5)), (" true", math.log(0.1)), ("False", math.log(0.2)), ("No", math.log(0.1)),
             ("The", math.log(0.05))]
    p, why, missing = read_true(pairs)
    assert why is None and missing is None and p == pytest.approx(0.6 / 0.9)
    assert read_true([("\u0120Yes", math.log(0.3)), ("\u2581no.", math.log(0.3))])[0] == pytest.approx(0.5)


def test_a_missing_side_gets_the_upper_bound_of_an_unreturned_token():
    # Returned mass 0.95: what is left is 0.05, less than the least likely returned token (0.15).
    p, why, missing = read_true([("True", math.log(0.8)), ("The", math.log(0.15))])
    assert missing == "false" and p == pytest.approx(0.8 / 0.85)
    p, _, missing = read_true([("False", math.log(0.9)), ("It", math.log(0.02))])
    assert missing == "true" and p == pytest.approx(0.02 / 0.92)


def test_neither_side_is_unparseable():
    p, why, _ = read_true([("The", -0.1), ("It", -3.0)])
    assert p is None and why.startswith("neither True nor False among the top 2 first tokens ('The', 'It'")
    assert read_true([]) == (None, "no log-probabilities for the first token", None)
