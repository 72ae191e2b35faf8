"""``--confidence ptrue``: P(True) (Kadavath et al. 2022), the probability the model gives to its own answer being correct.

Two requests: the answer (greedy, ``prompts.answer_message``, read by ``parse.parse_letter``; with
``--reasoning`` after a chain of thought, ``parse.parse_final_letter``), then a new conversation showing the
question and that proposed answer and asking "Is the proposed answer correct? Reply with one word: True or
False." (``prompts.ptrue_message``), for one token with its top ``--top-logprobs`` log-probabilities.
P(True) is read from them by ``parse.read_true`` (True/Yes against False/No, renormalised; a side missing
from the top N is bounded, and the record's ``p_true_missing`` names it).  Neither side in the top N is an
unparseable reply: retried with a correction turn, then the question is recorded as unparseable.  A server
that returns no log-probabilities at all cannot give P(True): the run is refused.  The distribution:
``record.stated_distribution`` with ``c = P(True)``.  Cost: 2 requests per question, plus parse retries.
"""
from __future__ import annotations

from typing import Any

from ..data.schema import LETTERS, Question
from ..errors import LlmcalError
from ..predictions import Prediction
from .ask import Tally, ask_until_read, chat_body, derive_seed, post_chat, reply_text
from .parse import parse_final_letter, parse_letter, read_true
from .prompts import answer_message, parse_retry_message, ptrue_message
from .record import letter, make_prediction, parse_doc, stated_distribution, uniform


def _first_token(client: Any, body: dict, tally: Tally, where: str, qid: str) -> tuple[Any, Any]:
    """(response, its first token's logprob pairs or None); an invalid logprob list is retried as a server fault,
    as on the logprob path (``backends.openai.retry_invalid``)."""
    from ..backends.openai import first_token_logprobs, retry_invalid

    def attempt() -> tuple[Any, Any]:
        response = post_chat(client, body, tally, scored=True)
        return response, first_token_logprobs(response)

    return retry_invalid(client, where, qid, attempt)


def judge(client: Any, s: Any, q: Question, j: int, tally: Tally,
          where: str) -> tuple[float | None, str | None, str | None]:
    """(P(True), None, missing side) or (None, reason, None) after the parse retries."""
    messages = [{"role": "user", "content": ptrue_message(q, LETTERS[j])}]
    why = None
    for attempt in range(s.max_parse_retries + 1):
        body = chat_body(client.settings.model, messages, max_tokens=1, temperature=0.0,
                         seed=derive_seed(s.seed, q.id, "ptrue", attempt), top_logprobs=s.top_logprobs)
        response, pairs = _first_token(client, body, tally, where, q.id)
        text = reply_text(response, where)
        tally.responses.append(text)
        if pairs is None:
            raise LlmcalError(f"{where}: question {q.id}: the server returned no log-probabilities, which "
                              f"--confidence ptrue reads P(True) from; use --confidence verbalized or consistency "
                              f"with this server")
        p, why, missing = read_true(pairs)
        if p is not None:
            return p, None, missing
        tally.reasons.append(why)
        if attempt < s.max_parse_retries:
            tally.retries += 1
            messages = messages + [{"role": "assistant", "content": text},
                                   {"role": "user", "content": parse_retry_message(why, "ptrue")}]
    return None, why, None


def score(client: Any, s: Any, q: Question, where: str) -> Prediction:
    tally = Tally()
    read = (lambda t: parse_final_letter(t, q)) if s.reasoning else (lambda t: parse_letter(t, q))
    j, _, why = ask_until_read(client, tally, [{"role": "user", "content": answer_message(q, reasoning=s.reasoning)}],
                               read, "reasoning" if s.reasoning else "answer", max_tokens=s.answer_tokens,
                               temperature=0.0, seed_of=lambda a: derive_seed(s.seed, q.id, "answer", a),
                               retries=s.max_parse_retries, where=f"{where}: question {q.id}")
    if j is None:
        return make_prediction(q, "ptrue", uniform(q.k), tally, parse_doc(tally, why, "answer"),
                               answer_letter=None, p_true=None, p_true_missing=None, below_chance=False)
    p, why, missing = judge(client, s, q, j, tally, where)
    if p is None:
        return make_prediction(q, "ptrue", uniform(q.k), tally, parse_doc(tally, why, "ptrue"),
                               answer_letter=letter(j), p_true=None, p_true_missing=None, below_chance=False)
    return make_prediction(q, "ptrue", stated_distribution(q.k, j, p), tally, parse_doc(tally, None),
                           answer_letter=letter(j), p_true=p, p_true_missing=missing, below_chance=p <= 1.0 / q.k)
