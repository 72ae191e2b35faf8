"""Prompt templates and the answer position (docs/reference.md, "Prompt templates").

``plain`` is lm-evaluation-harness's zero-shot MMLU format byte for byte; its
answer continuation is " A", " B", ...  ``chat`` puts the same question and
lettered options in the tokenizer's chat template with a generation prompt; its
continuation is "A", "B", ...

The letter token ids are never guessed: each prompt is tokenised alone and
with each continuation appended, and the first new token is the letter's id.
A continuation that is not exactly one new token (or that changes how the
prompt itself is tokenised) is an error naming the tokenizer and the letter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .data.schema import LETTERS, Question
from .errors import LlmcalError

TEMPLATES = ("plain", "chat", "auto")

CHAT_INSTRUCTION = "Answer with the letter of the correct option."


def options_block(q: Question) -> str:
    return "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(q.choices))


def plain_prompt(q: Question) -> str:
    """The zero-shot MMLU prompt of lm-evaluation-harness (ends with "Answer:")."""
    head = ""
    if q.subject:
        head = f"The following are multiple choice questions (with answers) about {q.subject}.\n\n"
    return f"{head}{q.question.strip()}{options_block(q)}\nAnswer:"


def chat_user_message(q: Question) -> str:
    head = f"The following is a multiple choice question about {q.subject}. " if q.subject else ""
    return f"{head}{CHAT_INSTRUCTION}\n\n{q.question.strip()}{options_block(q)}"


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


def format_prompt(q: Question, template: str, tokenizer: Any = None) -> str:
    """The exact text the model sees before the answer letter."""
    if template == "plain":
        return plain_prompt(q)
    if template == "chat":
        if tokenizer is None:
            raise LlmcalError("the chat template needs a tokenizer")
        if not getattr(tokenizer, "chat_template", None):
            raise LlmcalError(f"tokenizer {tokenizer_name(tokenizer)} has no chat template; use --template plain")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": chat_user_message(q)}], tokenize=False, add_generation_prompt=True
        )
    raise LlmcalError(f"unknown template {template!r}")


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
    """A question ready for the scoring engine: prompt tokens and one token id per option."""

    question: Question
    input_ids: tuple[int, ...]
    letter_ids: tuple[int, ...]


def encode_questions(
    questions: Sequence[Question], tokenizer: Any, template: str
) -> list[EncodedQuestion]:
    """Tokenise prompts and find each option letter's token id by tokenising prompt+continuation."""
    if template not in ("plain", "chat"):
        raise LlmcalError(f"resolve the template first (got {template!r})")
    special = add_special_tokens_for(template)
    prompts = [format_prompt(q, template, tokenizer) for q in questions]
    prompt_ids = tokenizer(prompts, add_special_tokens=special)["input_ids"]
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
        out.append(EncodedQuestion(question=q, input_ids=tuple(p), letter_ids=tuple(letters)))
    return out
