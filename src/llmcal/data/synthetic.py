"""Synthetic MCQ tasks: ``synthetic:<task>?param=value&...``, generated deterministically.

Tasks (subject = task name, ids ``<task>/<index>``):

- ``arithmetic`` (difficulty, n, k, seed): "What is 37 - 8 * 4 + 12?".  Difficulty d
  uses d operations on operands of ceil(d/2) digits; from d=3 on, some operations
  are multiplications by a one-digit number (usual precedence).  The K-1
  distractors are distinct integers from a window of about 2K integers that
  contains the true value at a random place, so they are near it and the true
  value is not simply the middle one.
- ``compare`` (difficulty, n, k, seed): which of K distinct (d+1)-digit numbers
  is the largest (or the smallest; the question says which); as d grows the
  numbers also come from a narrower window, so they share leading digits.
- ``facts`` (n, k, seed): made-up facts ("What is the secret word of the guild
  Kalmorin?", options are made-up words).  Each question is about a different
  made-up entity, so nothing learned on one question helps with another: a
  fine-tuned model can reach train accuracy 1.0 by memorisation while
  held-out accuracy stays at chance (1/K) -- the non-calibratable regime.
  The fact itself is in ``explanation``.

Defaults: n=500, k=4, difficulty=2; ``seed`` defaults to the seed passed to
``load_dataset``.  Generation is sequential from one ``random.Random`` seeded by
a string of (task, seed, difficulty, k), so the same parameters give the same
questions in any process, and a smaller ``n`` gives a prefix of a larger one.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable
from urllib.parse import parse_qsl

from ..errors import LlmcalError
from .schema import MAX_CHOICES, MIN_CHOICES, Question

PREFIX = "synthetic:"
DEFAULTS = {"n": 500, "k": 4, "difficulty": 2}
MAX_N = 1_000_000


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    generate: Callable[..., Question]  # (rng, index, k, difficulty, state) -> question i
    params: tuple[str, ...]
    max_difficulty: int = 1


def _operand(rng: random.Random, digits: int) -> int:
    lo = 10 ** (digits - 1) if digits > 1 else 1
    return rng.randint(lo, 10**digits - 1)


def _near_distractors(rng: random.Random, value: int, k: int) -> list[int]:
    width = max(2 * k, 10)
    start = value - rng.randint(1, width - 1)  # value sits at a random place in [start, start + width)
    candidates = [v for v in range(start, start + width + 1) if v != value]
    return rng.sample(candidates, k - 1)


def _place(rng: random.Random, correct: str, distractors: list[str]) -> tuple[tuple[str, ...], int]:
    answer = rng.randrange(len(distractors) + 1)
    choices = list(distractors)
    choices.insert(answer, correct)
    return tuple(choices), answer


def _arithmetic(rng: random.Random, i: int, k: int, difficulty: int, state: dict) -> Question:
    ops = difficulty
    digits = (difficulty + 1) // 2
    first = _operand(rng, digits)
    text = str(first)
    sums = [first]  # additive terms after collapsing multiplications; sign carried in the term
    for _ in range(ops):
        op = rng.choice("+-*" if difficulty >= 3 else "+-")
        if op == "*":
            factor = rng.randint(2, 9)
            sums[-1] *= factor
            text += f" * {factor}"
        else:
            x = _operand(rng, digits)
            sums.append(x if op == "+" else -x)
            text += f" {op} {x}"
    value = sum(sums)
    choices, answer = _place(rng, str(value), [str(v) for v in _near_distractors(rng, value, k)])
    return Question(
        id=f"arithmetic/{i}",
        question=f"What is {text}?",
        choices=choices,
        answer=answer,
        subject="arithmetic",
        explanation=f"{text} = {value}",
    )


def _compare(rng: random.Random, i: int, k: int, difficulty: int, state: dict) -> Question:
    lo, hi = 10**difficulty, 10 ** (difficulty + 1)
    # higher difficulty: more digits, and the numbers share more leading digits
    width = min(hi - lo, max(3 * k, 10 ** (difficulty + 1 - difficulty // 2)))
    start = rng.randint(lo, hi - width)
    numbers = rng.sample(range(start, start + width), k)
    largest = rng.random() < 0.5
    target = max(numbers) if largest else min(numbers)
    word = "largest" if largest else "smallest"
    return Question(
        id=f"compare/{i}",
        question=f"Which of these numbers is the {word}?",
        choices=tuple(str(x) for x in numbers),
        answer=numbers.index(target),
        subject="compare",
        explanation=f"{target} is the {word}.",
    )


_SYLLABLES = (
    "ka ri mo ta ven lo zor mi nel dra fi gal hu ber sa tor qui len mar os "
    "pel vin ru tha ke dun sil ya bro fen"
).split()
_KINDS = ("the wizard", "the village", "the starship", "the river", "the guild", "the comet", "the queen")
_ATTRIBUTES = ("secret word", "code name", "motto", "founder", "patron spirit", "lucky charm")


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize()


def _facts(rng: random.Random, i: int, k: int, difficulty: int, state: dict) -> Question:
    used: set[str] = state.setdefault("used", set())  # entity names must be unique in a dataset
    syllables, tries = 3, 0
    while True:
        name = _word(rng, syllables)
        if name not in used:
            break
        tries += 1
        if tries % 50 == 0:  # the name space at this length is (nearly) used up
            syllables += 1
    used.add(name)
    kind, attr = rng.choice(_KINDS), rng.choice(_ATTRIBUTES)
    values: list[str] = []
    while len(values) < k:
        v = _word(rng, 2)
        if v not in values:
            values.append(v)
    answer = rng.randrange(k)
    return Question(
        id=f"facts/{i}",
        question=f"What is the {attr} of {kind} {name}?",
        choices=tuple(values),
        answer=answer,
        subject="facts",
        explanation=f"The {attr} of {kind} {name} is {values[answer]}.",
    )


TASKS: dict[str, Task] = {
    "arithmetic": Task(
        "arithmetic", "integer arithmetic; difficulty = number of operations (operand digits grow with it)",
        _arithmetic, ("n", "k", "seed", "difficulty"), max_difficulty=12,
    ),
    "compare": Task(
        "compare", "which of K numbers is the largest/smallest; difficulty = digits - 1",
        _compare, ("n", "k", "seed", "difficulty"), max_difficulty=9,
    ),
    "facts": Task(
        "facts", "made-up facts to memorise: train accuracy can reach 1.0, held-out stays at chance",
        _facts, ("n", "k", "seed"),
    ),
}


def parse_spec(spec: str, default_seed: int = 0) -> tuple[str, dict[str, int]]:
    """``synthetic:<task>?a=1&b=2`` -> (task, {"n", "k", "seed", "difficulty"}) with defaults filled in."""
    if not spec.startswith(PREFIX):
        raise LlmcalError(f"not a synthetic spec: {spec!r} (expected {PREFIX}<task>?n=500&k=4)")
    body = spec[len(PREFIX):]
    task, _, query = body.partition("?")
    if task not in TASKS:
        raise LlmcalError(f"unknown synthetic task {task!r}; choose one of {', '.join(TASKS)}")
    t = TASKS[task]
    params = {"n": DEFAULTS["n"], "k": DEFAULTS["k"], "seed": default_seed}
    if "difficulty" in t.params:
        params["difficulty"] = DEFAULTS["difficulty"]
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise LlmcalError(f"cannot parse the parameters of {spec!r}; write them as {PREFIX}{task}?n=500&k=4") from None
    for key, value in pairs:
        if key not in t.params:
            raise LlmcalError(f"{spec}: unknown parameter {key!r} for task {task!r}; valid: {', '.join(t.params)}")
        try:
            params[key] = int(value)
        except ValueError:
            raise LlmcalError(f"{spec}: parameter {key}={value!r} must be an integer") from None
    if not MIN_CHOICES <= params["k"] <= MAX_CHOICES:
        raise LlmcalError(f"{spec}: k={params['k']} must be in {MIN_CHOICES}..{MAX_CHOICES}")
    if not 1 <= params["n"] <= MAX_N:
        raise LlmcalError(f"{spec}: n={params['n']} must be in 1..{MAX_N}")
    if "difficulty" in params and not 1 <= params["difficulty"] <= t.max_difficulty:
        raise LlmcalError(f"{spec}: difficulty={params['difficulty']} must be in 1..{t.max_difficulty}")
    return task, params


def canonical_spec(task: str, params: dict[str, int]) -> str:
    """The spec with every parameter spelled out, in a fixed order (for run configs)."""
    order = [p for p in ("difficulty", "n", "k", "seed") if p in params]
    return f"{PREFIX}{task}?" + "&".join(f"{p}={params[p]}" for p in order)


def generate(task: str, *, n: int = 500, k: int = 4, seed: int = 0, difficulty: int = 2) -> tuple[Question, ...]:
    """The ``n`` questions of a synthetic task (see the module docstring)."""
    if task not in TASKS:
        raise LlmcalError(f"unknown synthetic task {task!r}; choose one of {', '.join(TASKS)}")
    t = TASKS[task]
    if "difficulty" not in t.params:
        difficulty = 0
    rng = random.Random(f"llmcal-synthetic:{task}:{seed}:{difficulty}:{k}")
    state: dict = {}  # per-dataset memory of a generator (facts: the names used so far)
    return tuple(t.generate(rng, i, k, difficulty, state) for i in range(n))
