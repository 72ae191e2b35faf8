"""Prompt templates and the answer position (docs/reference.md, "Prompt templates").

``plain`` is lm-evaluation-harness's zero-shot MMLU format byte for byte; its
answer continuation is " A", " B", ...  ``chat`` puts the same question and
lettered options in the tokenizer's chat template with a generation prompt; its
continuation is "A", "B", ...

The letter token ids are never guessed: each prompt is tokenised alone and
with each continuation appended, and the first new token is the letter's id.
A continuation that is not exactly one new token (or that changes how the
prompt itself is tokenised) is an error naming the tokenizer and the letter.

Few-shot prompts (``--num-fewshot N``, docs/reference.md#fewshot) put N worked
examples before the question: for ``plain`` lm-evaluation-harness's MMLU
few-shot context byte for byte (the subject line, then each example's question
and options, "Answer:", a space, its letter and a blank line, then the
question); for ``chat`` one user turn per example answered by an assistant turn
holding its letter, then the question's user turn (lm-eval's
``--fewshot_as_multiturn``).  Questions with the same examples share their
first tokens, the *prefix*: ``EncodedQuestion.prefix_len`` says how many, and
the scoring engine computes their key/value cache once (scoring.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .data.schema import LETTERS, Question
from .errors import LlmcalError

TEMPLATES = ("plain", "chat", "auto")

CHAT_INSTRUCTION = "Answer with the letter of the correct option."


def options_block(q: Question) -> str:
    return "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(q.choices))


def plain_body(q: Question) -> str:
    """One question as lm-eval's MMLU ``doc_to_text``: question, lettered options, "Answer:"."""
    return f"{q.question.strip()}{options_block(q)}\nAnswer:"


def plain_prompt(q: Question, shots: Sequence[Question] = ()) -> str:
    """lm-evaluation-harness's MMLU prompt (ends with "Answer:"), zero-shot or with ``shots`` before it.

    Each example is its ``plain_body``, lm-eval's target delimiter " ", its answer
    letter and its few-shot delimiter "\\n\\n"; the subject line is lm-eval's
    per-subject description.
    """
    head = ""
    if q.subject:
        head = f"The following are multiple choice questions (with answers) about {q.subject}.\n\n"
    worked = "".join(f"{plain_body(s)} {s.answer_letter}\n\n" for s in shots)
    return f"{head}{worked}{plain_body(q)}"


def chat_user_message(q: Question, instruction: str = CHAT_INSTRUCTION) -> str:
    """The ``chat`` template's question text (``instruction``: llmcal.confidence puts its own in)."""
    head = f"The following is a multiple choice question about {q.subject}. " if q.subject else ""
    return f"{head}{instruction}\n\n{q.question.strip()}{options_block(q)}"


def resolve_template(template: str, tokenizer: Any) -> str:
    """``auto`` means ``chat`` when the tokenizer has a chat template, else ``plain``."""
    if template not in TEMPLATES:
        raise LlmcalError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise LlmcalError(
            f"tokenizer {tokenizer_name(tokenizer)} has no chat template; use --template plain"
        )
    return template


def chat_messages(q: Question, shots: Sequence[Question] = ()) -> list[dict]:
    """The chat turns: per example a user turn and an assistant turn with its letter, then the question."""
    msgs: list[dict] = []
    for s in shots:
        msgs += [{"role": "user", "content": chat_user_message(s)}, {"role": "assistant", "content": s.answer_letter}]
    return msgs + [{"role": "user", "content": chat_user_message(q)}]


def format_prompt(q: Question, template: str, tokenizer: Any = None, shots: Sequence[Question] = ()) -> str:
    """The exact text the model sees before the answer letter (``shots``: few-shot examples, in order)."""
    if template == "plain":
        return plain_prompt(q, shots)
    if template == "chat":
        if tokenizer is None:
            raise LlmcalError("the chat template needs a tokenizer")
        if not getattr(tokenizer, "chat_template", None):
            raise LlmcalError(f"tokenizer {tokenizer_name(tokenizer)} has no chat template; use --template plain")
        return tokenizer.apply_chat_template(chat_messages(q, shots), tokenize=False, add_generation_prompt=True)
    raise LlmcalError(f"unknown template {template!r}")


def _context_text(prompt: str, q: Question, template: str) -> str:
    """The part of ``prompt`` before the question's own text: what questions with the same examples share."""
    body = plain_body(q) if template == "plain" else chat_user_message(q)
    at = prompt.rfind(body)
    return prompt[:at] if at >= 0 else ""


def continuation(letter: str, template: str) -> str:
    return f" {letter}" if template == "plain" else letter


def add_special_tokens_for(template: str) -> bool:
    # A rendered chat template already carries its special tokens (BOS included
    # where the model wants one); the plain prompt gets the tokenizer's defaults.
    return template == "plain"


def tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


@dataclass(frozen=True)
class EncodedQuestion:
    """A question ready for the scoring engine: prompt tokens and one token id per option.

    ``prefix_len``: the first ``prefix_len`` tokens are the same for every question
    with the same few-shot examples (0: no shared prefix); the engine computes them once.
    """

    question: Question
    input_ids: tuple[int, ...]
    letter_ids: tuple[int, ...]
    prefix_len: int = 0


def encode_questions(
    questions: Sequence[Question], tokenizer: Any, template: str,
    shots: Mapping[str, Sequence[Question]] | None = None,
) -> list[EncodedQuestion]:
    """Tokenise prompts and find each option letter's token id by tokenising prompt+continuation.

    ``shots`` maps a question id to its few-shot examples (``data.fewshot.choose_shots``);
    questions with examples get a ``prefix_len`` (see :func:`_prefix_lengths`).
    """
    if template not in ("plain", "chat"):
        raise LlmcalError(f"resolve the template first (got {template!r})")
    special = add_special_tokens_for(template)
    shots = shots or {}
    prompts = [format_prompt(q, template, tokenizer, shots.get(q.id, ())) for q in questions]
    prompt_ids = tokenizer(prompts, add_special_tokens=special)["input_ids"]
    prefix = _prefix_lengths(questions, prompts, prompt_ids, tokenizer, template, shots, special)
    out: list[EncodedQuestion] = []
    # Group the prompt+letter encodings by letter so that the fast tokenizer can batch them.
    kmax = max((q.k for q in questions), default=0)
    full: dict[int, list] = {}
    for j in range(kmax):
        idx = [i for i, q in enumerate(questions) if q.k > j]
        texts = [prompts[i] + continuation(LETTERS[j], template) for i in idx]
        enc = tokenizer(texts, add_special_tokens=special)["input_ids"] if texts else []
        full[j] = dict(zip(idx, enc))
    for i, q in enumerate(questions):
        p = list(prompt_ids[i])
        letters = []
        for j in range(q.k):
            ids = list(full[j][i])
            new = ids[len(p):]
            if ids[: len(p)] != p or len(new) != 1:
                raise LlmcalError(
                    f"tokenizer {tokenizer_name(tokenizer)}: the answer letter {LETTERS[j]!r} "
                    f"(continuation {continuation(LETTERS[j], template)!r}, template {template}) is not "
                    f"exactly one new token after the prompt (got {len(new)} new tokens"
                    f"{'' if ids[:len(p)] == p else ', and the prompt tokens changed'}); "
                    f"question {q.id}"
                )
            letters.append(new[0])
        if len(set(letters)) != len(letters):
            raise LlmcalError(
                f"tokenizer {tokenizer_name(tokenizer)}: two answer letters map to the same token "
                f"in question {q.id}"
            )
        out.append(EncodedQuestion(question=q, input_ids=tuple(p), letter_ids=tuple(letters), prefix_len=prefix[i]))
    return out


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _prefix_lengths(questions, prompts, prompt_ids, tokenizer, template, shots, special) -> list[int]:
    """Per question, how many leading tokens it shares with every question that has the same examples.

    The context text (everything before the question's own text) is tokenised
    alone; a question's shared tokens are the common prefix of those tokens and
    its prompt's tokens (a boundary token that merges with the question's first
    characters is left out), and a group of questions with the same context takes
    its smallest value, so all of them have the same first ``prefix_len`` tokens.
    At least one token of each prompt stays outside the prefix.
    """
    out = [0] * len(questions)
    rows = [i for i, q in enumerate(questions) if shots.get(q.id)]
    if not rows:
        return out
    contexts = {i: _context_text(prompts[i], questions[i], template) for i in rows}
    texts = sorted({c for c in contexts.values() if c})
    ctx_ids = dict(zip(texts, tokenizer(texts, add_special_tokens=special)["input_ids"])) if texts else {}
    group: dict[str, int] = {}
    for i in rows:
        c = contexts[i]
        if not c:
            continue
        n = min(_common_prefix(ctx_ids[c], prompt_ids[i]), len(prompt_ids[i]) - 1)
        group[c] = min(group.get(c, n), n)
    for i in rows:
        out[i] = group.get(contexts[i], 0)
    return out
