"""Reading a model's reply: the option letter it chose, the confidence it stated, P(True) from logprobs.

Strict but tolerant, in these documented ways only (docs/reference.md, "Confidence without logprobs").
Every reader returns ``(value, None)`` or ``(None, reason)``; a reason is recorded with the question and
the reply is asked again (``--max-parse-retries``).

**The option letter** (``parse_letter``; letters are capital A, B, ... up to the question's options; the
reply is first stripped of surrounding whitespace and Markdown emphasis ``*``, ``_``, backticks):

1. a line that is a letter alone, optionally in parentheses or followed by ``.``, ``)`` or ``:``
   (``B``, ``(B)``, ``B.``);
2. a line that starts with a letter followed by ``.``, ``)``, ``:`` or ``,`` (``B. 4``, ``(B) four``,
   ``B, 90%``); a letter followed by a space alone does not count (``A cat ...``);
3. a phrase naming the letter: ``answer``/``option``/``choice`` followed by ``:``, ``is``, ``-`` or
   nothing, then the letter, optionally in parentheses (``Answer: B``, ``The correct answer is (C)``);
   the letters rules 1-3 find must all agree: ``A. foo\nThe answer is D`` and a reply listing options line
   by line (``A. foo\nC. bar``) name several letters;
4. the reply is exactly one option's text (case and a final period aside): that option.

A letter past the question's options (``E`` of four) is "not an option"; anything else is "no option
letter". **After reasoning** (``--reasoning``, ``parse_final_letter``) only rule 3's ``Answer: X`` (or
``answer is X``) counts, and its *last* occurrence wins: a chain of thought discusses several options
before the final line.

**A stated confidence** (``parse_confidence``): the number after the label ``Confidence`` (``:``, ``is``,
``=`` or nothing between); without the label, the only number followed by ``%``; in a reply that should be
the confidence alone (``alone=True``: verbalized's second stage), the only number in it.  A number with
``%`` (or "percent") is a percentage, 0-100.  Without ``%``: a number written with a decimal point and at
most 1 is a probability (``0.85``); in the probability template (``1stage-prob``) any number from 0 to 1 is
one (``1`` is certainty) and a number above 1 up to 100 is read as a percentage; otherwise a number from 0
to 100 is a percentage.  A fraction ``x/y`` or ``x out of y`` (``9/10``, ``8 out of 10``; ``0 <= x <= y``)
is the probability x/y (unlabelled only where the reply is the confidence alone).  Negative numbers,
numbers above 100 (percent), a decimal comma (``0,85``), exponent notation (``1e-2``), a fraction with
``%`` and two different labelled values are unparseable, each with its reason (never read as some other
number); words ("high") are "no number".

**P(True)** (``read_true``): from the first generated token's top log-probabilities, the tokens that spell
True or Yes (any case, after a leading space piece, without a trailing ``.``) against those that spell False
or No; P(True) = p(true) / (p(true) + p(false)).  A side absent from the top N gets the upper bound the
logprob reader gives a missing letter (``backends.openai.read_letters``: the smaller of the least likely
returned probability and the mass the list leaves out), so P(True) is then a bound, and the record says
which side was missing.  Neither side in the top N is unparseable.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

from ..data.schema import LETTERS, Question

_EMPHASIS = re.compile(r"[*_`]+")
_ALONE = re.compile(r"^\(?\[?([A-Z])\]?\)?[.):]?$")
_LEADING = re.compile(r"^\(?([A-Z])(?:\)|[.:,])")
# re.ASCII throughout: under IGNORECASE alone [A-Z] also matches the Kelvin sign and dotted I, which are no
# option letters, and \d matches every script's digits
_PHRASE = re.compile(r"\b(?:answer|option|choice)\s*(?:is\s*|:\s*|-\s*|=\s*)?(?:option\s*|choice\s*)?\(?\[?([A-Z])\b"
                     r"(?!['\w])", re.IGNORECASE | re.ASCII)
_FINAL = re.compile(r"\banswer\s*(?:is\s*:?|:|=)\s*\(?\[?([A-Z])\b(?!['\w])", re.IGNORECASE | re.ASCII)
# groups: the number, what directly follows it when that makes it something else (a decimal comma, an
# exponent), a fraction's denominator, the percent sign
_NUMBER = (r"(\d+(?:\.\d+)?|\.\d+)((?:,\d+)+(?:\.\d+)?|[eE][-+]?\d+)?(?:\s*(?:/|\bout\s+of\b)\s*(\d+(?:\.\d+)?))?"
           r"\s*(%|percent\b)?")
_LABELLED = re.compile(r"\bconfidence(?:\s+level|\s+score)?\s*(?:is\s*|:\s*|=\s*|of\s*)*" + _NUMBER,
                       re.IGNORECASE | re.ASCII)
_ANY_NUMBER = re.compile(r"(?<![\w.])-?" + _NUMBER, re.IGNORECASE | re.ASCII)
_SPACE_PIECES = (" ", "\u0120", "\u2581")
TRUE_WORDS = ("true", "yes")
FALSE_WORDS = ("false", "no")


def _clean(text: str) -> str:
    return _EMPHASIS.sub("", text or "").strip()


def _letter(ch: str, k: int) -> tuple[int | None, str | None]:
    ch = ch.upper()
    if ch not in LETTERS:
        return None, "no option letter"
    i = LETTERS.index(ch)
    if i >= k:
        return None, f"letter {ch} is not an option (A-{LETTERS[k - 1]})"
    return i, None


def parse_letter(text: str, q: Question) -> tuple[int | None, str | None]:
    """The option index a direct answer names (rules 1-4 of the module docstring), or (None, reason)."""
    k = q.k
    t = _clean(text)
    if not t:
        return None, "empty reply"
    lines = [line.strip() for line in t.splitlines()]
    found = [_ALONE.match(line) or _LEADING.match(line) for line in lines]
    leading = [m.group(1) for m in found if m and m.group(1).isupper()]
    named = leading + [m.group(1) for m in _PHRASE.finditer(t) if m.group(1).isupper()]
    if named:
        distinct = sorted(set(named))
        if len(distinct) > 1:
            return None, f"names several letters ({', '.join(distinct)})"
        return _letter(distinct[0], k)
    norm = t.rstrip(".").strip().lower()
    same = [i for i, c in enumerate(q.choices) if str(c).strip().rstrip(".").lower() == norm]
    if len(same) == 1:
        return same[0], None
    return None, "no option letter"


def parse_final_letter(text: str, q: Question) -> tuple[int | None, str | None]:
    """After reasoning: the letter of the last ``Answer: X`` (or ``answer is X``), or (None, reason)."""
    t = _clean(text)
    if not t:
        return None, "empty reply"
    found = [m.group(1) for m in _FINAL.finditer(t) if m.group(1).isupper()]
    if not found:
        return None, "no final \"Answer: X\" line"
    return _letter(found[-1], q.k)


def _value(number: str, odd: str | None, den: str | None, percent: bool,
           template: str) -> tuple[float | None, str | None]:
    if odd:
        kind = "a comma (decimal or thousands: not read)" if odd.startswith(",") else "exponent notation"
        return None, f"confidence {number}{odd} written with {kind}"
    if den is not None:
        x, y = float(number), float(den)
        if percent:
            return None, f"confidence {number}/{den}% is neither a fraction nor a percentage"
        if y <= 0.0 or x > y:
            return None, f"confidence {number}/{den} is not a fraction from 0 to 1"
        return x / y, None
    v = float(number)
    if percent:
        return (v / 100.0, None) if 0.0 <= v <= 100.0 else (None, f"confidence {number}% outside 0-100%")
    if ("." in number and v <= 1.0) or (template == "1stage-prob" and v <= 1.0):
        return v, None
    if v <= 100.0:
        return v / 100.0, None
    return None, f"confidence {number} outside 0-100"


def parse_confidence(text: str, template: str, *, alone: bool = False) -> tuple[float | None, str | None]:
    """A stated confidence as a probability in [0, 1] (the module docstring's rules), or (None, reason).

    ``template``: the verbalized template the reply answers (``1stage-prob`` reads bare numbers up to 1 as
    probabilities); ``alone``: the reply should be the confidence alone (the second stage).
    """
    t = _clean(text)
    if not t:
        return None, "empty reply"
    # (the value as written, its parts for _value)
    labelled = [(t[m.start(1):m.end()].strip(), (m.group(1), m.group(2), m.group(3), bool(m.group(4))))
                for m in _LABELLED.finditer(t)]
    if labelled:
        values = {_value(*parts, template) for _, parts in labelled}
        if len(values) > 1:
            return None, f"several confidences ({', '.join(s for s, _ in labelled)})"
        return values.pop()
    numbers = [(m.group(0).strip(), (m.group(1), m.group(2), m.group(3), bool(m.group(4))))
               for m in _ANY_NUMBER.finditer(t)]
    if any(s.startswith("-") for s, _ in numbers):
        return None, f"a negative confidence ({next(s for s, _ in numbers if s.startswith('-'))})"
    # unlabelled, only a percentage is a confidence: a fraction or a bare number in an explanation is not
    candidates = numbers if alone else [x for x in numbers if x[1][3]]
    if not candidates:
        return None, "no confidence number" if not numbers else "no confidence label or percentage"
    if len({parts for _, parts in candidates}) > 1:
        return None, f"several numbers ({', '.join(s for s, _ in candidates)})"
    return _value(*candidates[0][1], template)


def _word(token: str) -> str:
    t = token[1:] if token[:1] in _SPACE_PIECES else token
    return t.strip().rstrip(".").lower()


def read_true(pairs: Sequence[tuple[str, float]]) -> tuple[float | None, str | None, str | None]:
    """(P(True), None, missing side or None) from the first token's (token, logprob) pairs, or (None, reason, None)."""
    if not pairs:
        return None, "no log-probabilities for the first token", None
    true = [v for t, v in pairs if _word(t) in TRUE_WORDS]
    false = [v for t, v in pairs if _word(t) in FALSE_WORDS]
    if not true and not false:
        shown = ", ".join(repr(t) for t, _ in list(pairs)[:5])
        return None, f"neither True nor False among the top {len(pairs)} first tokens ({shown}, ...)", None
    returned = math.fsum(math.exp(v) for _, v in pairs)
    bound = min(math.exp(min(v for _, v in pairs)), max(1.0 - returned, 0.0))
    p_true = math.fsum(math.exp(v) for v in true) if true else bound
    p_false = math.fsum(math.exp(v) for v in false) if false else bound
    missing = None if true and false else ("true" if not true else "false")
    if p_true + p_false <= 0.0:
        return None, "True and False both have probability 0", None
    return p_true / (p_true + p_false), None, missing
