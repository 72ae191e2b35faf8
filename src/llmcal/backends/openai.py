"""The served-model backend (``--backend openai``): any OpenAI-compatible endpoint, scored from top logprobs.

A model behind an endpoint (vLLM, llama.cpp, TGI, a provider) is named by
``--base-url`` (ending in ``/v1``) and ``--model``, the name the server knows it
by.  Each question is one request for a single token at temperature 0:

- ``completions``: ``POST /completions`` with llmcal's ``plain`` prompt text,
  ``max_tokens=1, logprobs=N``;
- ``chat``: ``POST /chat/completions`` with llmcal's ``chat`` user message (the
  server applies its own chat template), ``max_tokens=1, logprobs=true,
  top_logprobs=N``;
- ``auto``: the mode the template names (``plain``: completions, ``chat``:
  chat); with ``--template auto`` too, completions when the server answers a
  completions request with logprobs, otherwise chat.

The option distribution is read from the top-N log-probabilities of the first
generated token (``read_letters``): a token that is an option letter, spelled
``"A"``, ``" A"`` or as a raw tokenizer piece (``"ĠA"``, ``"▁A"``), counts for
that letter, and several spellings of one letter are added (logsumexp).  A
letter outside the top N gets an upper bound of its log-probability; the
record keeps how much probability the letters carried and which were missing
(docs/reference.md, "Served models").  An endpoint that returns no logprobs is
refused: without them there is no distribution to calibrate.  Every value is
checked where it enters (``check_logprob``, ``read_letters``): a log-probability
that is not a finite number <= 0, or a top list whose probabilities add up to
more than 1, makes the response invalid; an invalid response is retried like a
server fault and then refused, naming the URL, the question and the value, so
nothing invalid ever reaches a predictions file.  (A model
whose greedy first token ends the sequence gets no logprobs from llama.cpp's
server: that request is sent again with ``min_tokens=1``, see ``post_scored``.)

The client retries 429, 5xx and connection errors with exponential backoff
(honouring ``Retry-After``), keeps at most ``--concurrency`` requests in flight,
and hands finished predictions to the pipeline in question order, so a killed
run resumes like a local one.  Nothing is cached: the weights behind an endpoint
are not on disk and can change.

With ``--confidence verbalized|ptrue|consistency`` (``ApiSettings.confidence``)
the engine asks each question in words through the chat endpoint instead
(``llmcal.confidence``: its prompts, readers and retry rule), through this same
client, and the mode is chat without a probe.  The client counts the requests
and the tokens the server's ``usage`` reports (``OpenAIClient.usage``), which
the run's ``confidence`` block records.
"""
from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from ..data.schema import LETTERS, Question
from ..errors import LlmcalError
from ..models import LoadedModel, ModelSpec
from ..predictions import Prediction
from ..prompts import TEMPLATES, chat_user_message, plain_prompt
from ..redact import redact_text
from .base import Backend, register_backend

log = logging.getLogger(__name__)

API_MODES = ("completions", "chat", "auto")
RETRY_STATUS = (429, 500, 502, 503, 504)
MASS_FLOOR = 1e-12  # the mass outside the top N is floored here before its log (as NLL floors p_y)
WINDOW_PER_WORKER = 4  # questions finished out of order wait at most this many per worker for their turn
LOGPROB_ROUNDING = 1e-6  # a log-probability in (0, this] is log(1) rounded up by the server's float arithmetic
MASS_ROUNDING = 1e-3  # the returned top-N probabilities may add up to at most 1 + this
# Raw tokenizer pieces for a leading space: GPT-2 byte-level BPE and SentencePiece.
SPACE_PIECES = (" ", "\u0120", "\u2581")


@dataclass(frozen=True)
class ApiSettings:
    """How to reach the endpoint (from EvalConfig's served-model options)."""

    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    mode: str = "auto"
    template: str = "auto"
    top_logprobs: int = 20
    concurrency: int = 4
    timeout_s: float = 60.0
    max_retries: int = 5
    backoff_s: float = 1.0  # first retry's wait; doubles each time, capped at BACKOFF_CAP_S
    backoff_cap_s: float = 30.0
    confidence: Any = None  # llmcal.confidence.ConfidenceSettings: ask in words (None: read top logprobs)

    @property
    def root(self) -> str:
        return self.base_url.rstrip("/")

    @property
    def shown_root(self) -> str:
        """The endpoint as messages and records show it: without the credentials a URL may carry."""
        return redact_text(self.root)


def api_spec(model: str, base_url: str) -> ModelSpec:
    """The run's record of a served model: its name on the server and where it was served."""
    return ModelSpec(name=model, kind="api", path=redact_text(base_url.rstrip("/")))


def mode_for_template(template: str, mode: str) -> tuple[str, str]:
    """(template, mode) with ``auto`` resolved where the other one decides it; both ``auto`` stay for the probe.

    The plain prompt is raw text for the completions endpoint; the chat template
    is the server's own, applied to the chat endpoint's messages.  llmcal has no
    tokenizer for a served model, so it cannot render a chat template into a
    completions prompt.
    """
    if template not in TEMPLATES:
        raise LlmcalError(f"unknown --template {template!r}; choose one of {', '.join(TEMPLATES)}")
    if mode not in API_MODES:
        raise LlmcalError(f"unknown --api-mode {mode!r}; choose one of {', '.join(API_MODES)}")
    if template == "auto" and mode != "auto":
        return ("plain" if mode == "completions" else "chat"), mode
    if mode == "auto" and template != "auto":
        return template, ("completions" if template == "plain" else "chat")
    if (template, mode) == ("chat", "completions"):
        raise LlmcalError("--template chat with --api-mode completions: llmcal has no tokenizer for a served model "
                          "to render its chat template into a prompt; use --api-mode chat (the server applies its "
                          "chat template) or --template plain")
    if (template, mode) == ("plain", "chat"):
        raise LlmcalError("--template plain is a raw-text prompt for --api-mode completions; with --api-mode chat "
                          "use --template chat (or auto)")
    return template, mode


# ---- requests and responses (pure functions) -------------------------------------------------
@dataclass(frozen=True)
class ApiQuestion:
    """A question ready for the endpoint: the request body (what ``EncodedQuestion`` is for local models)."""

    question: Question
    body: dict


def request_body(q: Question, mode: str, model: str, top_logprobs: int) -> dict:
    """One question's request: a single greedy token with its top-N log-probabilities."""
    common = {"model": model, "max_tokens": 1, "temperature": 0.0, "n": 1, "stream": False}
    if mode == "completions":
        return {**common, "prompt": plain_prompt(q), "logprobs": int(top_logprobs), "echo": False}
    if mode == "chat":
        return {**common, "messages": [{"role": "user", "content": chat_user_message(q)}], "logprobs": True,
                "top_logprobs": int(top_logprobs)}
    raise LlmcalError(f"resolve --api-mode first (got {mode!r})")


def endpoint(mode: str) -> str:
    return "completions" if mode == "completions" else "chat/completions"


def first_token_logprobs(response: Any) -> list[tuple[str, float]] | None:
    """(token text, logprob) pairs of the first generated token's top logprobs; None when there are none.

    Reads both shapes servers use: the legacy completions one
    (``logprobs.top_logprobs[0]`` a ``{token: logprob}`` mapping, the sampled
    token in ``logprobs.tokens[0]``) and the chat one, which vLLM and llama.cpp
    also use for completions (``logprobs.content[0].top_logprobs`` a list of
    ``{token, logprob}``).  The sampled token is added when the list lacks it.

    Raises ``BadResponse`` when a value is not a finite log-probability
    (``check_logprob``) or an entry of the list is not a (token, logprob) pair.
    """
    try:
        lp = response["choices"][0].get("logprobs")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    if not isinstance(lp, dict):
        return None
    pairs: list[tuple[str, float]] = []
    sampled: tuple[str, float] | None = None
    content = lp.get("content")
    if isinstance(content, list) and content and isinstance(content[0], dict):
        first = content[0]
        pairs = _pairs(first.get("top_logprobs"))
        if isinstance(first.get("token"), str) and first.get("logprob") is not None:
            sampled = (first["token"], check_logprob(first["logprob"], first["token"]))
    elif isinstance(lp.get("top_logprobs"), list) and lp["top_logprobs"]:
        pairs = _pairs(lp["top_logprobs"][0])
        tokens, values = lp.get("tokens"), lp.get("token_logprobs")
        if isinstance(tokens, list) and isinstance(values, list) and tokens and values:
            if isinstance(tokens[0], str) and values[0] is not None:
                sampled = (tokens[0], check_logprob(values[0], tokens[0]))
    if sampled is not None and sampled[0] not in {t for t, _ in pairs}:
        pairs.append(sampled)
    return pairs or None


def stopped_at_once(response: Any) -> bool:
    """The model ended the sequence as its first token (finish_reason "stop", nothing generated)."""
    try:
        choice = response["choices"][0]
        text = choice.get("text")
        if text is None:
            text = (choice.get("message") or {}).get("content")
        tokens = (response.get("usage") or {}).get("completion_tokens")
        return choice.get("finish_reason") == "stop" and not text and tokens in (0, None)
    except (KeyError, IndexError, TypeError, AttributeError):
        return False


def post_scored(client: "OpenAIClient", path: str, body: dict,
                on_response: Callable[[Any], None] | None = None) -> Any:
    """POST one scoring request; when the model ended the sequence at once and so returned no logprobs, ask
    again with ``min_tokens=1``.  ``on_response`` sees every response, the first of two included (a caller
    that counts requests and tokens per question counts both).

    llama.cpp's server (and others) report no log-probabilities when the greedy
    first token is end-of-sequence, which is common after a prompt that ends in
    "Answer:".  ``min_tokens=1`` (understood by llama.cpp and vLLM) only keeps
    the *sampler* from choosing end-of-sequence; the reported logprobs are the
    model's unchanged distribution, end-of-sequence included.  A server that
    refuses the parameter gets the usual no-logprobs error.
    """
    seen = on_response or (lambda r: None)
    response = client.post(path, body)
    seen(response)
    try:
        without = first_token_logprobs(response) is None
    except BadResponse:  # it has logprobs, invalid ones: the caller refuses or retries them
        without = False
    if without and stopped_at_once(response) and "min_tokens" not in body:
        try:
            again = client.post(path, {**body, "min_tokens": 1})
            seen(again)
            return again
        except ApiStatusError as e:
            log.warning("%s: the model stopped at once and the server refused min_tokens=1 (%s)", path, e)
    return response


class BadResponse(LlmcalError):
    """A response whose log-probabilities are not a distribution; ``problem`` says which value and why.

    A server fault as far as the client is concerned: the request is retried,
    then the question is refused (``fetch_prediction``).
    """

    def __init__(self, problem: str):
        super().__init__(problem)
        self.problem = problem


def check_logprob(v: Any, token: Any) -> float:
    """``v`` as a log-probability: a finite number <= 0 (up to ``LOGPROB_ROUNDING``, read as 0), else ``BadResponse``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadResponse(f"the log-probability of token {token!r} is {_short(v)}, not a number")
    x = float(v)
    if not math.isfinite(x):
        raise BadResponse(f"the log-probability of token {token!r} is {x!r}, not a finite number")
    if x > LOGPROB_ROUNDING:
        raise BadResponse(f"the log-probability of token {token!r} is {x!r} > 0 (a probability above 1)")
    return min(x, 0.0)


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _pairs(top: Any) -> list[tuple[str, float]]:
    if top is None:
        return []
    if isinstance(top, dict):
        return [(t, check_logprob(v, t)) for t, v in top.items()]
    if isinstance(top, list):
        out = []
        for e in top:
            if not (isinstance(e, dict) and isinstance(e.get("token"), str)):
                raise BadResponse(f"a top_logprobs entry is {_short(e)}, not {{token, logprob}}")
            out.append((e["token"], check_logprob(e.get("logprob"), e["token"])))
        return out
    raise BadResponse(f"top_logprobs is {_short(top)}, not a list or a mapping")


@dataclass(frozen=True)
class LetterReading:
    """The K option letters read from one top-N list (docs/reference.md, "Served models")."""

    logprobs: tuple[float, ...]  # found letters: their log-probability; missing ones: the upper bound
    mass: float  # probability the found letters carried
    missing: tuple[int, ...]  # options whose letter was not in the top N


def letter_of(token: str, k: int) -> int | None:
    """The option index a token spells (``"B"``, ``" B"``, ``"ĠB"``, ``"▁B"``), or None."""
    t = token[1:] if token[:1] in SPACE_PIECES else token
    if len(t) == 1 and t in LETTERS[:k]:
        return LETTERS.index(t)
    return None


def read_letters(pairs: Sequence[tuple[str, float]], k: int) -> LetterReading:
    """Option log-probabilities from the first token's top logprobs.

    Found: logsumexp over the letter's spellings (they are different tokens,
    so their probabilities add).  Missing: ``min(smallest returned logprob,
    log(1 - returned mass))``: a token outside the returned list is no more
    likely than the least likely returned one, nor than all unreturned tokens
    together, so this is an upper bound and never makes a missing option less
    likely than it could be.
    """
    if not pairs:
        raise LlmcalError("no top logprobs to read the option letters from")
    pairs = [(token, check_logprob(v, token)) for token, v in pairs]
    found: dict[int, list[float]] = {}
    for token, v in pairs:
        j = letter_of(token, k)
        if j is not None:
            found.setdefault(j, []).append(v)
    returned = math.fsum(math.exp(v) for _, v in pairs)
    if returned > 1.0 + MASS_ROUNDING:
        shown = ", ".join(f"{t!r}: {v:.6g}" for t, v in pairs[:6]) + (", ..." if len(pairs) > 6 else "")
        raise BadResponse(f"the returned top log-probabilities add up to probability {returned:.6g} > 1 ({shown})")
    floor = min(min(v for _, v in pairs), math.log(max(1.0 - returned, MASS_FLOOR)))
    values = [_logsumexp(found[j]) if j in found else floor for j in range(k)]
    mass = math.fsum(math.exp(values[j]) for j in found)
    return LetterReading(logprobs=tuple(values), mass=min(mass, 1.0),
                         missing=tuple(j for j in range(k) if j not in found))


def _logsumexp(vs: Sequence[float]) -> float:
    m = max(vs)
    return m + math.log(math.fsum(math.exp(v - m) for v in vs))


def prediction_from_response(item: ApiQuestion, response: Any, *, where: str) -> Prediction:
    """A ``Prediction`` from one response; a response without logprobs is refused (nothing to calibrate).

    ``BadResponse`` for invalid values (the caller retries); the prediction
    returned is always a finite distribution.
    """
    q = item.question
    pairs = first_token_logprobs(response)
    if pairs is None:
        raise LlmcalError(
            f"{where} returned no log-probabilities for question {q.id}: llmcal reads the option distribution from "
            f"the first token's top logprobs, and without them confidence and ECE would be meaningless. Use a "
            f"server that returns logprobs (vLLM, llama.cpp, TGI do), or check that it accepts "
            f"{'logprobs=N' if 'prompt' in item.body else 'logprobs=true with top_logprobs=N'}")
    r = read_letters(pairs, q.k)
    p = Prediction.from_logits(q.id, q.subject, q.answer, r.logprobs, letter_mass=r.mass, missing=r.missing)
    if not all(math.isfinite(v) for v in (*p.logits, *p.probs)) or not 0.0 <= p.letter_mass <= 1.0:
        raise BadResponse(f"its option log-probabilities {list(r.logprobs)} give no distribution")
    return p


def retry_invalid(client: "OpenAIClient", where: str, qid: str, attempt: Callable[[], Any]) -> Any:
    """``attempt()`` (one request and its reading) until it returns without ``BadResponse``: an invalid response is
    a server fault, retried with the client's backoff and retry count, then refused naming the URL, the question
    and the value."""
    attempts = client.settings.max_retries + 1
    for i in range(attempts):
        try:
            return attempt()
        except BadResponse as e:
            last = e
            if i + 1 < attempts:
                delay = client.delay(i)
                log.warning("%s: question %s: invalid response (%s); retrying in %.1f s (%d of %d)", where, qid,
                            e.problem, delay, i + 1, attempts - 1)
                client.sleep(delay)
    raise LlmcalError(f"{where}: question {qid}: invalid response: {last.problem} (in each of {attempts} "
                      f"attempts); nothing was recorded for this question: rerun the same command once the server "
                      f"answers correctly to resume")


def fetch_prediction(client: "OpenAIClient", path: str, item: ApiQuestion) -> Prediction:
    """One question's prediction; an invalid response (``BadResponse``) is retried (``retry_invalid``)."""
    where = f"{client.settings.shown_root}/{path}"
    return retry_invalid(client, where, item.question.id,
                         lambda: prediction_from_response(item, post_scored(client, path, item.body), where=where))


# ---- the HTTP client -----------------------------------------------------------------------
class ApiStatusError(LlmcalError):
    """The endpoint answered with an HTTP error that retrying does not fix."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class OpenAIClient:
    """POSTs JSON to the endpoint with retries and backoff (``transport`` and ``sleep`` for tests)."""

    def __init__(self, settings: ApiSettings, *, transport: Any = None, sleep: Callable[[float], None] = time.sleep):
        import httpx

        self.settings = settings
        headers = {"Accept": "application/json"}
        key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
        if key:  # local servers need no key; the key itself is never written anywhere
            headers["Authorization"] = f"Bearer {key}"
        self.sleep = sleep
        self._counted = threading.Lock()
        self._usage = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self._http = httpx.Client(base_url=settings.root + "/", headers=headers, transport=transport,
                                  timeout=httpx.Timeout(settings.timeout_s),
                                  limits=httpx.Limits(max_connections=max(1, settings.concurrency)))

    def close(self) -> None:
        self._http.close()

    def usage(self) -> dict:
        """Answered requests and the prompt/completion tokens their ``usage`` reported, so far (a copy)."""
        with self._counted:
            return dict(self._usage)

    def _count(self, doc: Any) -> None:
        usage = doc.get("usage") if isinstance(doc, dict) else None
        with self._counted:
            self._usage["requests"] += 1
            for key in ("prompt_tokens", "completion_tokens"):
                v = usage.get(key) if isinstance(usage, dict) else None
                if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                    self._usage[key] += v

    def post(self, path: str, body: dict) -> Any:
        import httpx

        url = f"{self.settings.shown_root}/{path}"
        attempts = self.settings.max_retries + 1
        for attempt in range(attempts):
            retry_after = None
            try:
                r = self._http.post(path, json=body)
            except httpx.TransportError as e:  # connection refused or reset, timeouts
                why = redact_text(f"{type(e).__name__}: {e}")
            else:
                if r.status_code < 300:
                    try:
                        doc = r.json()
                    except ValueError:
                        raise LlmcalError(f"{url}: the response is not JSON ({redact_text(r.text[:200])!r})") \
                            from None
                    self._count(doc)
                    return doc
                why = f"HTTP {r.status_code}: {redact_text(_error_text(r))}"
                if r.status_code not in RETRY_STATUS:
                    raise ApiStatusError(f"{url}: {why}{_hint(r.status_code, why, self.settings)}", r.status_code)
                retry_after = _retry_after(r.headers.get("retry-after"))
            if attempt + 1 == attempts:
                raise LlmcalError(f"{url}: no answer after {attempts} attempts (last: {why}); the run keeps what "
                                  f"was scored: rerun the same command to resume")
            delay = self.delay(attempt, retry_after)
            log.warning("%s: %s; retrying in %.1f s (%d of %d)", url, why, delay, attempt + 1, attempts - 1)
            self.sleep(delay)
        raise AssertionError("unreachable")

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry ``attempt + 1``: doubling backoff, capped, plus jitter; Retry-After wins."""
        delay = min(self.settings.backoff_cap_s, self.settings.backoff_s * 2 ** attempt)
        return max(delay * (1 + 0.25 * random.random()), retry_after or 0.0)  # jitter spreads the clients


def _error_text(r: Any) -> str:
    try:
        doc = r.json()
        err = doc.get("error", doc) if isinstance(doc, dict) else doc
        msg = err.get("message") or err.get("detail") if isinstance(err, dict) else err
        return str(msg or doc)[:300]
    except ValueError:
        return r.text[:300]


def _retry_after(value: str | None) -> float | None:
    try:
        return min(60.0, max(0.0, float(value))) if value else None
    except ValueError:  # an HTTP date: fall back to the backoff
        return None


def _hint(status: int, why: str, s: ApiSettings) -> str:
    if status in (401, 403):
        return f" (set the API key in ${s.api_key_env}, or name another variable with --api-key-env)"
    if status == 404:
        return f" (check --base-url, which usually ends in /v1, and --model {s.model!r}, the server's model name)"
    if "logprob" in why.lower():
        return f" (the server may allow fewer log-probabilities: lower --top-logprobs, now {s.top_logprobs})"
    return ""


# ---- the engine ------------------------------------------------------------------------------
class OpenAIEngine:
    """Scores questions through the endpoint (``OpenAIBackend.score``)."""

    def __init__(self, client: OpenAIClient, mode: str):
        self.client, self.mode = client, mode
        self.settings = client.settings

    def encode(self, questions: Sequence[Question]) -> list[ApiQuestion]:
        s = self.settings
        if s.confidence is not None:  # llmcal.confidence builds each step's request itself
            return [ApiQuestion(q, {}) for q in questions]
        return [ApiQuestion(q, request_body(q, self.mode, s.model, s.top_logprobs)) for q in questions]

    def score_one(self, item: ApiQuestion) -> Prediction:
        if self.settings.confidence is not None:
            from ..confidence import score_question

            return score_question(self.client, self.settings.confidence, item.question,
                                  f"{self.settings.shown_root}/chat/completions")
        return fetch_prediction(self.client, endpoint(self.mode), item)

    def score(self, encoded: Sequence[ApiQuestion], *, options=None, done: Iterable[str] = (),
              on_batch: Callable[[list[Prediction]], None] | None = None) -> list[Prediction]:
        """Predictions for the questions not in ``done``, handed to ``on_batch`` in question order.

        At most ``concurrency`` requests are in flight, and none starts more than
        ``WINDOW_PER_WORKER * concurrency`` questions past the first unfinished
        one: a killed run loses at most that many finished answers.
        """
        from ..progress import bar

        done = set(done)
        todo = [e for e in encoded if e.question.id not in done]
        workers = max(1, self.settings.concurrency)
        window = WINDOW_PER_WORKER * workers
        show = True if options is None else options.progress
        desc = "scoring (openai)" if options is None else f"{options.description} (openai)"
        results: list[Prediction] = []
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llmcal-api")
        pending: dict[Future, int] = {}
        finished: dict[int, Prediction] = {}
        submitted = flushed = 0
        try:
            with bar(desc, len(encoded), show=show, completed=len(encoded) - len(todo)) as task:
                while flushed < len(todo):
                    while submitted < len(todo) and submitted < flushed + window and len(pending) < workers:
                        pending[pool.submit(self.score_one, todo[submitted])] = submitted
                        submitted += 1
                    ready, _ = wait(pending, return_when=FIRST_COMPLETED)
                    error: BaseException | None = None
                    for fut in ready:
                        i = pending.pop(fut)
                        try:
                            finished[i] = fut.result()
                        except BaseException as e:  # keep the others' answers, then raise the first error
                            error = error or e
                    batch = []
                    while flushed in finished:
                        batch.append(finished.pop(flushed))
                        flushed += 1
                    if batch:
                        if on_batch is not None:
                            on_batch(batch)
                        results.extend(batch)
                        task.advance(len(batch))
                    if error is not None:
                        raise error
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return results


def probe_mode(client: OpenAIClient) -> str:
    """``--api-mode auto`` with ``--template auto``: completions if the server scores a prompt with logprobs, else chat."""
    probe = Question(id="llmcal-probe", question="Which letter comes first in the alphabet?",
                     choices=("A", "B"), answer=0)
    s = client.settings
    tried = []
    for mode in ("completions", "chat"):
        try:
            response = post_scored(client, endpoint(mode), request_body(probe, mode, s.model, s.top_logprobs))
        except ApiStatusError as e:
            if e.status in (401, 403):
                raise
            tried.append(f"{mode}: {e}")
            continue
        try:
            pairs = first_token_logprobs(response)
        except BadResponse as e:
            raise LlmcalError(f"{s.shown_root}/{endpoint(mode)}: question {probe.id} (the --api-mode auto probe): "
                              f"invalid response: {e.problem}") from None
        if pairs is not None:
            log.info("%s: --api-mode auto chose %s", s.shown_root, mode)
            return mode
        tried.append(f"{mode}: answered without log-probabilities")
    raise LlmcalError(f"{s.shown_root}: no request mode returns log-probabilities, which llmcal needs to read the option "
                      f"distribution ({'; '.join(tried)})")


def load_openai(settings: ApiSettings, *, transport: Any = None,
                sleep: Callable[[float], None] = time.sleep) -> LoadedModel:
    """A ``LoadedModel`` whose engine scores through the endpoint; ``extra`` records the resolved template and mode."""
    template, mode = mode_for_template(settings.template, settings.mode)
    if settings.confidence is not None:  # asked in words: the chat endpoint (llmcal.confidence checks the flags)
        template, mode = "chat", "chat"
    client = OpenAIClient(settings, transport=transport, sleep=sleep)
    if mode == "auto":
        mode = probe_mode(client)
        template = "plain" if mode == "completions" else "chat"
    engine = OpenAIEngine(client, mode)
    return LoadedModel(model=None, tokenizer=None, spec=api_spec(settings.model, settings.base_url),
                       device="remote", dtype="server", backend="openai",
                       extra={"engine": engine, "template": template, "api_mode": mode})


# EvalConfig's served-model options: read by this backend, refused with every other one.
API_FIELDS = ("base_url", "api_key_env", "api_mode", "top_logprobs", "concurrency", "request_timeout", "max_retries")


@register_backend("openai")
class OpenAIBackend(Backend):
    """A model behind an OpenAI-compatible endpoint (see the module docstring); nothing is cached."""

    supports_fewshot = False
    fewshot_note = " (the request is one question)"
    supports_distributed = False
    one_process_note = "--concurrency sets the requests in flight"
    needs_base_url = True
    cacheable = False  # the weights behind an endpoint are not on disk and can change
    options = API_FIELDS
    asks_in_words = True  # --confidence verbalized|ptrue|consistency (llmcal.confidence)

    @classmethod
    def check(cls) -> None:
        import importlib.util

        if importlib.util.find_spec("httpx") is None:
            raise LlmcalError("--backend openai needs the httpx package: pip install httpx")

    def check_config(self, cfg: Any) -> None:
        super().check_config(cfg)
        if not cfg.base_url or not str(cfg.base_url).startswith(("http://", "https://")):
            raise LlmcalError(f"--backend openai needs --base-url, an http(s) URL such as http://127.0.0.1:8000/v1 "
                              f"(got {cfg.base_url!r})")
        if cfg.gguf_file or cfg.base:
            raise LlmcalError(f"--{'gguf-file' if cfg.gguf_file else 'base'} does not apply to --backend openai: "
                              f"--model is the name the server knows the model by")
        # --api-mode, --top-logprobs, --concurrency, --max-retries, --request-timeout: their types in EvalConfig

    def spec(self, cfg: Any) -> ModelSpec:
        return api_spec(cfg.model, cfg.base_url or "")  # the server's name for the model: nothing to resolve

    def settings(self, cfg: Any) -> ApiSettings:
        """The endpoint from the config (the API key stays in its environment variable)."""
        from ..confidence import settings_of

        return ApiSettings(base_url=cfg.base_url or "", model=cfg.model, api_key_env=cfg.api_key_env or None,
                           mode=cfg.api_mode, template=cfg.template, top_logprobs=cfg.top_logprobs,
                           concurrency=cfg.concurrency, timeout_s=float(cfg.request_timeout),
                           max_retries=cfg.max_retries, confidence=settings_of(cfg))

    def open(self, spec: ModelSpec, *, dtype: str, device: str, world: Any, api: ApiSettings) -> LoadedModel:
        return load_openai(api)

    def template(self, loaded: LoadedModel, requested: str) -> str:
        return loaded.extra["template"]  # resolved against the server by load_openai

    def encode(self, loaded: LoadedModel, questions: Sequence[Question], template: str,
               shots: dict | None = None) -> list[ApiQuestion]:
        return loaded.extra["engine"].encode(questions)

    def score(self, loaded: LoadedModel, encoded: Sequence[ApiQuestion], *, options: Any, done: Iterable[str] = (),
              on_batch: Callable[[list[Prediction]], None] | None = None) -> list[Prediction]:
        return loaded.extra["engine"].score(encoded, options=options, done=done, on_batch=on_batch)

    def meta(self, loaded: LoadedModel) -> dict:
        s = loaded.extra["engine"].settings
        return {"base_url": s.root, "api_mode": loaded.extra["api_mode"], "top_logprobs": s.top_logprobs}
