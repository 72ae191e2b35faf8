"""The prompt templates of the confidence modes (docs/reference.md, "Confidence without logprobs").

Every mode asks through the chat endpoint (the server applies the model's own chat template) and starts
from llmcal's ``chat`` question text (``prompts.chat_user_message``: subject line, question, lettered
options) with the instruction replaced by the mode's own:

- **answer** (``ptrue``, ``consistency``, ``verbalized --verbalized-template 2stage``): "Answer with the
  letter of the correct option only." With ``--reasoning``: think step by step first, then end with a
  line "Answer: X".
- **verbalized, one stage**: the letter and a confidence in one reply, in a fixed two-line format
  (``1stage-percent``: "Confidence: <0-100>%"; ``1stage-prob``: "Confidence: <0.0-1.0>").
- **verbalized, two stages**: the answer turn, then a second user turn asking how confident the model is
  that its answer is correct, as a percentage.
- **P(True)** (Kadavath et al. 2022, "Language Models (Mostly) Know What They Know"): a new conversation
  that shows the question with the model's proposed answer and asks whether it is correct, True or False.
- **correction**: after an unreadable reply, the reply stays in the conversation and a user turn says what
  could not be read and restates the format (``parse_retry_message``).
"""
from __future__ import annotations

from ..data.schema import LETTERS, Question
from ..prompts import chat_user_message, options_block

ANSWER_INSTRUCTION = "Answer with the letter of the correct option only."
REASONING_INSTRUCTION = ("Think step by step, then give your final answer on the last line in the form "
                         "\"Answer: X\", where X is the letter of the correct option.")
VERBALIZED_INSTRUCTION = {
    "1stage-percent": ("Give the letter of the correct option and your confidence that it is correct, as a "
                       "percentage from 0 to 100. Reply in exactly this format:\nAnswer: <letter>\n"
                       "Confidence: <number>%"),
    "1stage-prob": ("Give the letter of the correct option and the probability that it is correct, a number "
                    "from 0.0 to 1.0. Reply in exactly this format:\nAnswer: <letter>\nConfidence: <number>"),
}
CONFIDENCE_QUESTION = ("How confident are you that your answer is correct? Reply with a percentage from 0 to 100 "
                       "only, in the form \"Confidence: <number>%\".")
PTRUE_QUESTION = "Is the proposed answer correct? Reply with one word: True or False."

# What the correction turn restates, per kind of reply expected.
FORMATS = {
    "answer": "Reply with the letter of the correct option only.",
    "reasoning": "End your reply with a line \"Answer: X\", where X is the letter of the correct option.",
    "1stage-percent": "Reply in exactly this format:\nAnswer: <letter>\nConfidence: <number>%",
    "1stage-prob": "Reply in exactly this format:\nAnswer: <letter>\nConfidence: <number from 0.0 to 1.0>",
    "confidence": "Reply with a percentage from 0 to 100 only, in the form \"Confidence: <number>%\".",
    "ptrue": "Reply with one word: True or False.",
}


def answer_message(q: Question, *, reasoning: bool = False) -> str:
    return chat_user_message(q, REASONING_INSTRUCTION if reasoning else ANSWER_INSTRUCTION)


def verbalized_message(q: Question, template: str) -> str:
    return chat_user_message(q, VERBALIZED_INSTRUCTION[template])


def ptrue_message(q: Question, letter: str) -> str:
    """The question with the model's proposed answer, asking whether it is correct (Kadavath et al.'s setup)."""
    head = f"The following is a multiple choice question about {q.subject}." if q.subject else \
        "The following is a multiple choice question."
    choice = q.choices[LETTERS.index(letter)]
    return (f"{head}\n\n{q.question.strip()}{options_block(q)}\n\nProposed answer: {letter}. {choice}\n\n"
            f"{PTRUE_QUESTION}")


def parse_retry_message(reason: str, expected: str) -> str:
    """The user turn after an unreadable reply: what was wrong, then the format again."""
    return f"Your reply could not be read ({reason}). {FORMATS[expected]}"
