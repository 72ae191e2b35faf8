"""Asking the served model through ``backends.openai.OpenAIClient``, with the per-question tally of cost and parses.

Every request is a ``POST /chat/completions`` through the run's one client (its retries, backoff, timeout,
concurrency and API key handling), carrying a ``seed`` derived from the run's seed, the question id and the
request's place (``derive_seed``): llama.cpp's server (and vLLM, and OpenAI on a best-effort basis) samples
deterministically for a given seed, which is what lets a killed run resume to the same predictions.

``ask_until_read`` is the retry rule shared by the modes: a reply the reader cannot read is kept in the
conversation and answered by a user turn saying what was wrong and restating the format
(``prompts.parse_retry_message``), at most ``--max-parse-retries`` times; each reason is recorded.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import LlmcalError
from .prompts import parse_retry_message

SEED_RANGE = 2 ** 31 - 1  # seeds fit a signed 32-bit integer, which every server accepts


def derive_seed(seed: int, qid: str, *place: Any) -> int:
    """A request's seed: a hash of the run's seed, the question id and the request's place (stage, sample, try)."""
    text = ":".join(str(x) for x in (seed, qid, *place))
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") % SEED_RANGE


@dataclass
class Tally:
    """One question's requests, tokens, raw replies and parse failures (the record's ``usage``).

    No time is recorded per question: a predictions file is a function of the model, the questions and the
    seeds, so a resumed run ends with the same bytes as an uninterrupted one (the run's block has the time).
    """

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    responses: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)  # every unreadable reply's reason, in order

    def add_usage(self, response: Any) -> None:
        self.requests += 1
        usage = response.get("usage") if isinstance(response, dict) else None
        if isinstance(usage, dict):
            for key in ("prompt_tokens", "completion_tokens"):
                v = usage.get(key)
                if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                    setattr(self, key, getattr(self, key) + v)

    def usage(self) -> dict:
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens}


def reply_text(response: Any, where: str) -> str:
    """The reply's text (``choices[0].message.content``; no content is the empty reply, which is unreadable)."""
    try:
        message = response["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        raise LlmcalError(f"{where}: the response is no chat completion (no choices[0].message): "
                          f"{str(response)[:200]}") from None
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else ""


def with_cut_off(reason: str, response: Any, max_tokens: int) -> str:
    """``reason``, plus that the reply hit the token limit when the server says so (``finish_reason`` "length")."""
    try:
        cut = response["choices"][0].get("finish_reason") == "length"
    except (KeyError, IndexError, TypeError, AttributeError):
        cut = False
    return f"{reason}; cut off at {max_tokens} tokens (--max-new-tokens)" if cut else reason


def chat_body(model: str, messages: list[dict], *, max_tokens: int, temperature: float, seed: int,
              top_logprobs: int | None = None) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": int(max_tokens), "temperature": float(temperature),
            "seed": int(seed), "n": 1, "stream": False}
    if top_logprobs is not None:
        body.update(logprobs=True, top_logprobs=int(top_logprobs))
    return body


def post_chat(client: Any, body: dict, tally: Tally, *, scored: bool = False) -> Any:
    """POST one chat request, counting it; ``scored``: read logprobs (``post_scored``'s min_tokens rule)."""
    from ..backends.openai import post_scored

    if scored:  # post_scored may ask twice (min_tokens): both requests count
        return post_scored(client, "chat/completions", body, on_response=tally.add_usage)
    response = client.post("chat/completions", body)
    tally.add_usage(response)
    return response


def ask_until_read(client: Any, tally: Tally, messages: list[dict], read: Callable[[str], tuple[Any, str | None]],
                   expected: str, *, max_tokens: int, temperature: float, seed_of: Callable[[int], int],
                   retries: int, where: str) -> tuple[Any, list[dict], str | None]:
    """(value, the conversation with the reply that was read, None) or (None, the conversation, last reason)."""
    model = client.settings.model
    recorded = None
    for attempt in range(retries + 1):
        response = post_chat(client, chat_body(model, messages, max_tokens=max_tokens, temperature=temperature,
                                               seed=seed_of(attempt)), tally)
        text = reply_text(response, where)
        tally.responses.append(text)
        value, reason = read(text)
        messages = messages + [{"role": "assistant", "content": text}]
        if value is not None:
            return value, messages, None
        recorded = with_cut_off(reason, response, max_tokens)  # the model is told the reason alone
        tally.reasons.append(recorded)
        if attempt < retries:
            tally.retries += 1
            messages = messages + [{"role": "user", "content": parse_retry_message(reason, expected)}]
    return None, messages, recorded
