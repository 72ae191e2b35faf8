"""The optional vLLM backend: the guard without vLLM, and logprobs -> Prediction with fake vLLM objects.

vLLM itself is not installed in CI; a fake ``vllm`` module whose engine runs the
tiny transformers model checks the whole path (requests, allowed letters,
post-processing, run files) against the transformers backend.
"""
from __future__ import annotations

import importlib.machinery
import math
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest

from llmcal.backends import check_backend, get_backend, load_for_backend
from llmcal.backends import vllm as vb
from llmcal.data.schema import Question
from llmcal.errors import LlmcalError
from llmcal.evaluate import EvalConfig, run_eval
from llmcal.predictions import load_predictions
from llmcal.prompts import EncodedQuestion

DATA = "synthetic:arithmetic?n=30&k=4&difficulty=2"


def _enc(letter_ids=(65, 66, 67, 68), qid="q1", answer=2) -> EncodedQuestion:
    q = Question(id=qid, question="2+2?", choices=("1", "2", "4", "5")[: len(letter_ids)], answer=answer,
                 subject="math")
    return EncodedQuestion(question=q, input_ids=(5, 6, 7), letter_ids=tuple(letter_ids))


def _output(values: dict) -> SimpleNamespace:
    """A RequestOutput as vLLM returns it: outputs[0].logprobs[0] = {token id: Logprob}."""
    step = {t: SimpleNamespace(logprob=v, rank=i + 1, decoded_token=None) for i, (t, v) in enumerate(values.items())}
    return SimpleNamespace(outputs=[SimpleNamespace(token_ids=[next(iter(values))], logprobs=[step])])


@pytest.fixture
def no_vllm(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)


# ---- the guard ---------------------------------------------------------------------------------
def test_guard_without_vllm_is_a_clear_error(no_vllm, tiny_model_dir, tmp_path):
    with pytest.raises(LlmcalError, match=r"--backend vllm needs the vllm package.*pip install"):
        check_backend("vllm")
    cfg = EvalConfig(model=str(tiny_model_dir), data=DATA, template="plain", backend="vllm")
    with pytest.raises(LlmcalError, match="pip install"):
        run_eval(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before the run directory was touched


def test_unknown_backend_is_refused():
    with pytest.raises(LlmcalError, match="unknown --backend 'onnx'"):
        check_backend("onnx")
    check_backend("hf")


def test_hf_backend_works_without_vllm(no_vllm, tiny_model_dir, tmp_path):
    cfg = EvalConfig(model=str(tiny_model_dir), data=DATA, template="plain", n_bootstrap=20)
    rec = run_eval(cfg, tmp_path / "run", progress=False)
    assert rec.results[0].metrics["n"] == 30


# ---- post-processing ---------------------------------------------------------------------------
def test_logprobs_become_the_same_prediction_schema():
    e = _enc()
    # letters out of order, plus an unrelated token vLLM may add (the sampled one)
    out = _output({67: -0.2, 999: -5.0, 65: -2.5, 68: -3.0, 66: -1.0})
    p = vb.prediction_from_output(e, out)
    z = np.array([-2.5, -1.0, -0.2, -3.0])
    want = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    np.testing.assert_allclose(p.probs, want, rtol=1e-12)
    assert p.logits == tuple(z) and p.pred == 2 and p.conf == pytest.approx(want.max())
    assert (p.id, p.subject, p.answer, p.correct) == ("q1", "math", 2, True)
    assert set(p.to_dict()) == {"id", "subject", "answer", "probs", "pred", "conf", "logits"}


def test_bare_float_logprobs_are_accepted():
    p = vb.prediction_from_output(_enc((10, 11)), _output({10: 0.0, 11: math.log(3.0)}))
    np.testing.assert_allclose(p.probs, [0.25, 0.75])


def test_missing_letter_names_question_and_option():
    with pytest.raises(LlmcalError, match=r"option\(s\) B, D of question q9.*processed_logits"):
        vb.prediction_from_output(_enc(qid="q9"), _output({65: -1.0, 67: -2.0}))


def test_no_logprobs_or_nan_are_errors():
    with pytest.raises(LlmcalError, match="no log-probabilities for question q1"):
        vb.prediction_from_output(_enc(), SimpleNamespace(outputs=[SimpleNamespace(logprobs=None)]))
    with pytest.raises(LlmcalError, match="non-finite"):
        vb.prediction_from_output(_enc(), _output({65: float("nan"), 66: -1.0, 67: -1.0, 68: -1.0}))
    with pytest.raises(LlmcalError, match="2 outputs for 1 requests"):
        vb.predictions_from_outputs([_enc()], [_output({65: 0.0}), _output({65: 0.0})])


def test_sampling_parameters_ask_for_exactly_the_letters():
    kw = vb.sampling_kwargs(_enc((7, 8, 9)))
    assert kw == {"max_tokens": 1, "temperature": 0.0, "logprobs": 3, "allowed_token_ids": [7, 8, 9],
                  "detokenize": False}


# ---- the whole path with a fake vLLM that runs the tiny model ----------------------------------
class FakeSamplingParams:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class FakeLLM:
    """Behaves like vllm.LLM(logprobs_mode="processed_logits") for one-token requests."""

    instances: list = []

    def __init__(self, **kwargs):
        import torch
        from transformers import AutoModelForCausalLM

        self.kwargs = kwargs
        self.model = AutoModelForCausalLM.from_pretrained(kwargs["model"], dtype=torch.float32).eval()
        self.calls = 0
        FakeLLM.instances.append(self)

    def generate(self, prompts, params, use_tqdm=True):
        import torch

        assert self.kwargs["logprobs_mode"] == "processed_logits"
        self.calls += 1
        outs = []
        for prompt, sp in zip(prompts, params):
            assert sp.max_tokens == 1 and sp.temperature == 0.0
            with torch.no_grad():
                logits = self.model(input_ids=torch.tensor([prompt["prompt_token_ids"]])).logits[0, -1]
            masked = torch.full_like(logits, float("-inf"))
            masked[sp.allowed_token_ids] = logits[sp.allowed_token_ids]
            top = torch.topk(masked, sp.logprobs)
            outs.append(_output({int(t): float(v) for t, v in zip(top.indices, top.values)}))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    mod.__version__ = "0.0-fake"
    mod.LLM = FakeLLM
    mod.SamplingParams = FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", mod)
    FakeLLM.instances.clear()
    return mod


def test_vllm_backend_run_equals_the_hf_backend(fake_vllm, tiny_model_dir, tmp_path):
    base = dict(model=str(tiny_model_dir), data=DATA, template="plain", dtype="float32", n_bootstrap=20)
    hf = run_eval(EvalConfig(**base), tmp_path / "hf", progress=False)
    vl = run_eval(EvalConfig(**base, backend="vllm"), tmp_path / "vllm", progress=False)
    (llm,) = FakeLLM.instances
    assert llm.kwargs["max_logprobs"] >= 4 and llm.kwargs["dtype"] == "float32"
    a = load_predictions(tmp_path / "hf" / "predictions.jsonl")
    b = load_predictions(tmp_path / "vllm" / "predictions.jsonl")
    assert [p.id for p in a] == [p.id for p in b]
    assert [p.pred for p in a] == [p.pred for p in b]
    np.testing.assert_allclose([p.probs for p in a], [p.probs for p in b], atol=1e-5)
    assert vl.meta["device"] == "cuda" and hf.results[0].metrics["n"] == vl.results[0].metrics["n"] == 30


def test_vllm_engine_is_started_only_when_something_is_scored(fake_vllm, tiny_model_dir, tmp_path):
    cfg = EvalConfig(model=str(tiny_model_dir), data=DATA, template="plain", dtype="float32", n_bootstrap=20,
                     backend="vllm")
    run_eval(cfg, tmp_path / "a", progress=False)
    assert len(FakeLLM.instances) == 1
    run_eval(cfg, tmp_path / "b", progress=False)  # every score from the scoring cache
    assert len(FakeLLM.instances) == 1
    assert (tmp_path / "a/predictions.jsonl").read_bytes() == (tmp_path / "b/predictions.jsonl").read_bytes()


def test_vllm_engine_skips_done_and_flushes(fake_vllm, tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    from llmcal.data import load_dataset
    from llmcal.models import resolve_model
    from llmcal.prompts import encode_questions
    from llmcal.scoring import ScoreOptions

    monkeypatch.setattr(vb, "CHUNK_QUESTIONS", 8)
    loaded = load_for_backend(resolve_model(str(tiny_model_dir)), backend="vllm", dtype="float32")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    enc = encode_questions(list(load_dataset(DATA).questions), tok, "plain")
    seen = []
    done = {e.question.id for e in enc[:5]}
    preds = get_backend("vllm").score(loaded, enc, options=ScoreOptions(progress=False), done=done,
                                      on_batch=seen.append)
    assert [p.id for p in preds] == [e.question.id for e in enc[5:]]
    assert [len(b) for b in seen] == [8, 8, 8, 1]


def test_vllm_refuses_adapters_cpu_and_sharding(fake_vllm, tiny_model_dir):
    from llmcal.distributed import World
    from llmcal.models import ModelSpec, resolve_model

    spec = resolve_model(str(tiny_model_dir))
    with pytest.raises(LlmcalError, match="chooses its own GPUs"):
        load_for_backend(spec, backend="vllm", device="cpu")
    with pytest.raises(LlmcalError, match="one process"):
        load_for_backend(spec, backend="vllm", world=World(rank=0, world_size=2))
    lora = ModelSpec(name="a", kind="lora", path="/x", base=spec)
    with pytest.raises(LlmcalError, match="LoRA"):
        load_for_backend(lora, backend="vllm")
