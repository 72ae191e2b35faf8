"""``--confidence consistency``: N answers sampled at temperature T; the distribution is the share of votes.

Each of the ``--samples`` requests asks for the answer (``prompts.answer_message``; with ``--reasoning``
the model thinks first and the final "Answer: X" is read, ``parse.parse_final_letter``) at
``--sample-temperature``, with its own seed (``ask.derive_seed(run seed, question id, sample, try)``), so the
samples differ from each other and a rerun draws the same ones.  A sample that names no option is drawn
again with the next try's seed (a fresh sample, not a correction: the votes are the model's answers to the
question as asked), at most ``--max-parse-retries`` times, then it is left out of the votes and counted
(``parse.unparseable_samples``).  ``probs`` = each option's share of the votes that named one, zeros
included (``record.vote_distribution``), ``conf`` = the modal answer's share; a question none of whose
samples named an option is unparseable (``record.uniform``).  Cost: N requests per question, plus retries.
"""
from __future__ import annotations

from typing import Any

from ..data.schema import Question
from ..predictions import Prediction
from .ask import Tally, chat_body, derive_seed, post_chat, reply_text, with_cut_off
from .parse import parse_final_letter, parse_letter
from .prompts import answer_message
from .record import letter, make_prediction, parse_doc, uniform, vote_distribution


def score(client: Any, s: Any, q: Question, where: str) -> Prediction:
    tally = Tally()
    read = (lambda t: parse_final_letter(t, q)) if s.reasoning else (lambda t: parse_letter(t, q))
    messages = [{"role": "user", "content": answer_message(q, reasoning=s.reasoning)}]
    votes: list[int] = []
    samples: list[str | None] = []
    failed, why = 0, None
    for i in range(s.samples):
        j = None
        for attempt in range(s.max_parse_retries + 1):
            body = chat_body(client.settings.model, messages, max_tokens=s.answer_tokens,
                             temperature=s.temperature, seed=derive_seed(s.seed, q.id, "sample", i, attempt))
            response = post_chat(client, body, tally)
            text = reply_text(response, f"{where}: question {q.id}")
            tally.responses.append(text)
            j, why = read(text)
            if j is not None:
                break
            why = with_cut_off(why, response, s.answer_tokens)
            tally.reasons.append(why)
            if attempt < s.max_parse_retries:
                tally.retries += 1
        samples.append(letter(j))
        if j is None:
            failed += 1
        else:
            votes.append(j)
    if not votes:
        parse = {**parse_doc(tally, why, "sample"), "unparseable_samples": failed}
        return make_prediction(q, "consistency", uniform(q.k), tally, parse, samples=samples)
    parse = {**parse_doc(tally, None), "unparseable_samples": failed}
    return make_prediction(q, "consistency", vote_distribution(q.k, votes), tally, parse, samples=samples)
