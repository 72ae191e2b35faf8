"""``--confidence verbalized``: the model states its answer and how confident it is, in words.

``1stage-percent`` / ``1stage-prob``: one request asks for "Answer: <letter>" and "Confidence: <number>%"
(or a probability) together (``prompts.VERBALIZED_INSTRUCTION``).  ``2stage``: the answer first (its own
request, read by ``parse.parse_letter``), then, in the same conversation, "How confident are you that your
answer is correct?" (``prompts.CONFIDENCE_QUESTION``, read by ``parse.parse_confidence(alone=True)``).
Greedy decoding (temperature 0, a derived seed).  The distribution: ``record.stated_distribution``.
Cost: 1 request per question (2 with ``2stage``), plus one per parse retry.
"""
from __future__ import annotations

from typing import Any

from ..data.schema import Question
from ..predictions import Prediction
from .ask import Tally, ask_until_read, derive_seed
from .parse import parse_confidence, parse_final_letter, parse_letter
from .prompts import CONFIDENCE_QUESTION, answer_message, verbalized_message
from .record import letter, make_prediction, parse_doc, stated_distribution, uniform


def read_one_stage(q: Question, template: str):
    """A reader of a one-stage reply: (option index, confidence), or (None, reason)."""
    def read(text: str):
        j, why = parse_letter(text, q)
        if j is None:
            return None, why
        c, why = parse_confidence(text, template)
        return ((j, c), None) if c is not None else (None, why)

    return read


def score(client: Any, s: Any, q: Question, where: str) -> Prediction:
    tally = Tally()

    def seed(stage: str):
        return lambda attempt: derive_seed(s.seed, q.id, stage, attempt)

    common = dict(temperature=0.0, retries=s.max_parse_retries, where=f"{where}: question {q.id}")
    if s.template == "2stage":
        read_answer = (lambda t: parse_final_letter(t, q)) if s.reasoning else (lambda t: parse_letter(t, q))
        first = [{"role": "user", "content": answer_message(q, reasoning=s.reasoning)}]
        j, convo, why = ask_until_read(client, tally, first, read_answer, "reasoning" if s.reasoning else "answer",
                                       max_tokens=s.answer_tokens, seed_of=seed("answer"), **common)
        c, stage = None, "answer"
        if j is not None:
            convo = convo + [{"role": "user", "content": CONFIDENCE_QUESTION}]
            c, _, why = ask_until_read(client, tally, convo, lambda t: parse_confidence(t, "2stage", alone=True),
                                       "confidence", max_tokens=s.confidence_tokens, seed_of=seed("confidence"),
                                       **common)
            stage = "confidence"
    else:
        msg = [{"role": "user", "content": verbalized_message(q, s.template)}]
        pair, _, why = ask_until_read(client, tally, msg, read_one_stage(q, s.template), s.template,
                                      max_tokens=s.confidence_tokens, seed_of=seed("verbalized"), **common)
        j, c = pair if pair is not None else (None, None)
        stage = "verbalized"
    if j is None or c is None:
        return make_prediction(q, "verbalized", uniform(q.k), tally, parse_doc(tally, why, stage),
                               answer_letter=letter(j), stated_confidence=None, below_chance=False)
    probs = stated_distribution(q.k, j, c)
    return make_prediction(q, "verbalized", probs, tally, parse_doc(tally, None), answer_letter=letter(j),
                           stated_confidence=c, below_chance=c <= 1.0 / q.k)
