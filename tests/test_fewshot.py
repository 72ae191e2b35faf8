"""Few-shot examples: from the train split, same subject, seeded, never the question itself."""
from __future__ import annotations

import pytest

from llmcal.data import apply_split, hash_unit
from llmcal.data.fewshot import choose_shots
from llmcal.data.schema import Question
from llmcal.errors import LlmcalError


def _qs(n=60):
    return [Question(id=f"q{i}", question=f"Q{i}?", choices=("a", "b"), answer=i % 2,
                     subject=("alg", "geo", None)[i % 3]) for i in range(n)]


def test_examples_are_the_first_n_of_the_subject_by_seeded_hash():
    qs = _qs()
    pool = apply_split(qs, "train", 0)
    test = apply_split(qs, "test", 0)
    shots = choose_shots(test, pool, 3, seed=0)
    for q in test:
        same = sorted((p for p in pool if p.subject == q.subject), key=lambda p: hash_unit(p.id, "fewshot:0"))
        assert shots[q.id] == tuple(same[:3])
        assert q.id not in {s.id for s in shots[q.id]}
    # every question of a subject gets the same examples; a different seed, different ones
    assert len({shots[q.id] for q in test if q.subject == "alg"}) == 1
    other = choose_shots(test, pool, 3, seed=1)
    assert any(other[q.id] != shots[q.id] for q in test)


def test_choice_does_not_depend_on_pool_order_or_other_questions():
    qs = _qs()
    pool = list(apply_split(qs, "train", 0))
    test = list(apply_split(qs, "test", 0))
    a = choose_shots(test, pool, 4, seed=0)
    b = choose_shots(test[:2], pool[::-1], 4, seed=0)
    assert all(b[k] == a[k] for k in b)


def test_a_question_among_its_subjects_examples_takes_the_next_one():
    qs = _qs()
    shots = choose_shots(qs, qs, 2, seed=0)  # --split all: the pool holds the questions themselves
    alg = sorted((q for q in qs if q.subject == "alg"), key=lambda q: hash_unit(q.id, "fewshot:0"))
    first, second, third = alg[:3]
    assert shots[first.id] == (second, third)
    assert shots[third.id] == (first, second) == shots[alg[5].id]


def test_zero_shots_and_too_small_pool():
    qs = _qs(9)
    assert choose_shots(qs, qs, 0) == {}
    with pytest.raises(LlmcalError, match=r"train split has 3 question\(s\) of subject 'alg'.*itself"):
        choose_shots(qs, qs, 3)
    with pytest.raises(LlmcalError, match=r"choose_shots: n must be an integer from 0 to 64 \(got -1\)"):
        choose_shots(qs, qs, -1)
