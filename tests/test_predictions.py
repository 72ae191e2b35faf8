"""llmcal.predictions: the Prediction record, softmax, stack_probs and the predictions file."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from llmcal.errors import LlmcalError
from llmcal.predictions import Prediction, load_predictions, softmax, stack_probs, write_predictions


def test_from_logits_derives_probs_pred_conf():
    p = Prediction.from_logits("q1", "astronomy", 2, [0.0, 1.0, 3.0, -1.0])
    z = np.array([0.0, 1.0, 3.0, -1.0])
    want = np.exp(z) / np.exp(z).sum()
    assert p.probs == pytest.approx(tuple(want), abs=1e-15)
    assert p.pred == 2 and p.conf == pytest.approx(want[2], abs=1e-15)
    assert p.correct
    assert not Prediction.from_logits("q2", None, 0, [0.0, 1.0]).correct
    assert all(type(v) is float for v in p.logits + p.probs)


def test_ties_predict_the_first_option():
    p = Prediction.from_logits("q", None, 1, [2.0, 2.0, 2.0])
    assert p.pred == 0 and p.conf == pytest.approx(1 / 3)
    assert not p.correct


def test_prediction_is_frozen():
    p = Prediction.from_logits("q", None, 0, [1.0, 0.0])
    with pytest.raises(AttributeError):
        p.conf = 0.1  # type: ignore[misc]


def test_dict_round_trip_is_exact():
    rng = np.random.default_rng(0)
    for k in (2, 4, 26):
        p = Prediction.from_logits(f"id-{k}", None if k == 2 else "bio", k - 1, rng.normal(size=k) * 5)
        d = p.to_dict()
        assert set(d) == {"id", "subject", "answer", "probs", "pred", "conf", "logits"}
        assert Prediction.from_dict(json.loads(json.dumps(d))) == p


def test_served_model_fields_round_trip_and_are_written_only_when_set():
    """letter_mass/missing (--backend openai) travel through the file; a local record has neither key."""
    local = Prediction.from_logits("q", "bio", 1, [0.5, 1.5, -1.0])
    assert local.letter_mass is None and local.missing == ()
    assert list(local.to_dict()) == ["id", "subject", "answer", "probs", "pred", "conf", "logits"]
    served = Prediction.from_logits("q", "bio", 1, [0.5, 1.5, -1.0], letter_mass=0.75, missing=[2])
    d = served.to_dict()
    assert d["letter_mass"] == 0.75 and d["missing"] == [2]
    assert {k: v for k, v in d.items() if k not in ("letter_mass", "missing")} == local.to_dict()
    back = Prediction.from_dict(json.loads(json.dumps(d)))
    assert back == served and back.missing == (2,) and type(back.letter_mass) is float
    assert Prediction.from_dict(json.loads(json.dumps(local.to_dict()))) == local
    # A served record with every letter found still says so (missing = []), unlike a local one.
    full = Prediction.from_logits("q", None, 0, [0.0, 1.0], letter_mass=1.0).to_dict()
    assert full["missing"] == [] and Prediction.from_dict(full).letter_mass == 1.0


def test_from_dict_recomputes_from_logits():
    """probs/pred/conf on disk are derived data: the logits are the record."""
    d = Prediction.from_logits("q", None, 0, [0.0, 2.0]).to_dict()
    d.update(probs=[0.9, 0.1], pred=0, conf=0.9)
    back = Prediction.from_dict(d)
    assert back.pred == 1 and back.conf == pytest.approx(1 / (1 + math.exp(-2)))


def test_file_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    preds = [Prediction.from_logits(f"q{i}", ["a", None][i % 2], int(rng.integers(0, k)), rng.normal(size=k))
             for i, k in enumerate([2, 3, 4, 5, 26])]
    path = tmp_path / "run" / "predictions.jsonl"
    write_predictions(path, preds)
    assert len(path.read_text().splitlines()) == len(preds)
    assert load_predictions(path) == preds


# --- softmax ------------------------------------------------------------------------------------


def test_softmax_is_stable_for_huge_and_tiny_logits():
    p = softmax(np.array([1000.0, 1001.0, 999.0]))
    assert np.all(np.isfinite(p))
    assert p == pytest.approx(softmax(np.array([1.0, 2.0, 0.0])), abs=1e-15)
    q = softmax(np.array([-1e4, -1e4 - 1.0]))
    assert q == pytest.approx([1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))])
    r = softmax(np.array([0.0, -np.inf, 1.0]))  # a masked option gets exactly zero
    assert r[1] == 0.0 and r.sum() == pytest.approx(1.0)


def test_softmax_float32_input_is_computed_in_float64():
    z = np.array([20.0, 0.0], dtype=np.float32)
    p = softmax(z)
    assert p.dtype == np.float64
    assert p[1] == pytest.approx(math.exp(-20) / (1 + math.exp(-20)), rel=1e-12)
    # a confidence within 1e-9 of 1 stays distinguishable from 1 (float32 would round it to 1.0)
    assert Prediction.from_logits("q", None, 0, [30.0, 0.0]).conf < 1.0


def test_softmax_axis():
    z = np.array([[0.0, 1.0], [2.0, 2.0], [5.0, -5.0]])
    rows = softmax(z)
    assert rows.sum(axis=1) == pytest.approx([1.0, 1.0, 1.0])
    assert rows[1] == pytest.approx([0.5, 0.5])
    cols = softmax(z, axis=0)
    assert cols.sum(axis=0) == pytest.approx([1.0, 1.0])
    assert cols[:, 0] == pytest.approx(softmax(z[:, 0]))


# --- stack_probs --------------------------------------------------------------------------------


def test_stack_probs_pads_ragged_k_with_zeros():
    preds = [Prediction.from_logits("a", None, 1, [0.0, 1.0]),
             Prediction.from_logits("b", None, 3, [1.0, 0.0, 2.0, 3.0, -1.0]),
             Prediction.from_logits("c", None, 0, [0.5, 0.5, 0.5])]
    probs, answers = stack_probs(preds)
    assert probs.shape == (3, 5) and probs.dtype == np.float64
    assert answers.tolist() == [1, 3, 0] and answers.dtype == np.int64
    assert probs[0].tolist() == list(preds[0].probs) + [0.0, 0.0, 0.0]
    assert probs[1].tolist() == list(preds[1].probs)
    assert probs[2, 3:].tolist() == [0.0, 0.0]
    assert probs.sum(axis=1) == pytest.approx([1.0, 1.0, 1.0])


def test_stack_probs_rejects_empty():
    with pytest.raises(LlmcalError, match="no predictions"):
        stack_probs([])


# --- load_predictions errors --------------------------------------------------------------------


def _good_line(i: int) -> str:
    return json.dumps(Prediction.from_logits(f"q{i}", None, 0, [1.0, 0.0]).to_dict())


def test_load_missing_file_names_it(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(LlmcalError, match="nope.jsonl: no predictions file"):
        load_predictions(path)


@pytest.mark.parametrize("bad, why", [
    ('{"id": "q9", "answer": 0, "logi', "line 1 column"),   # torn JSON: the decoder's position
    ('{"id": "q9", "answer": 0}', "'logits'"),              # missing field: its name
    ('[1, 2]', "list indices"),                             # not an object
])
def test_load_bad_line_names_file_and_line(tmp_path, bad, why):
    path = tmp_path / "predictions.jsonl"
    path.write_text("\n".join([_good_line(0), "", _good_line(1), bad, _good_line(2)]) + "\n")
    with pytest.raises(LlmcalError) as e:
        load_predictions(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:4: bad prediction record")  # line 4 counts the blank line 2
    assert why in msg


def test_load_is_strict_about_a_torn_last_line(tmp_path):
    """Unlike the resume reader in llmcal.io, a finished predictions file must be whole."""
    path = tmp_path / "predictions.jsonl"
    path.write_text(_good_line(0) + "\n" + '{"id": "q1", "ans')
    with pytest.raises(LlmcalError, match=r"predictions\.jsonl:2:"):
        load_predictions(path)


def test_load_skips_blank_lines(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text("\n" + _good_line(0) + "\n\n" + _good_line(1) + "\n")
    assert [p.id for p in load_predictions(path)] == ["q0", "q1"]
