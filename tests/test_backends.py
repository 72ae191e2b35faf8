"""llmcal.backends: the Backend interface, its registry, and a backend added from outside used end to end."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import llmcal
from llmcal.backends import base as registry
from llmcal.backends import Backend, backend_names, check_backend, get_backend, register_backend
from llmcal.errors import LlmcalError
from llmcal.evaluate import EvalConfig, run_eval

DOCS = Path(__file__).resolve().parents[1] / "docs" / "reference.md"
DATA = "synthetic:arithmetic?n=40&k=4&difficulty=2"


@pytest.fixture
def own_registry(monkeypatch):
    """Backends registered by the test are gone afterwards."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def _docs_example() -> str:
    section = DOCS.read_text(encoding="utf-8").split('<a id="backends"></a>', 1)[1].split("\n## ", 2)[1]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return block


# ---- the registry ------------------------------------------------------------------------------
def test_the_built_in_backends_are_registered_with_their_capabilities():
    assert backend_names()[:3] == ("hf", "vllm", "openai")
    hf, vllm, openai = (get_backend(n) for n in ("hf", "vllm", "openai"))
    assert all(isinstance(b, Backend) for b in (hf, vllm, openai))
    assert [b.name for b in (hf, vllm, openai)] == ["hf", "vllm", "openai"]
    assert (hf.supports_fewshot, hf.supports_distributed, hf.needs_base_url, hf.cacheable) == (True, True, False, True)
    assert (vllm.supports_distributed, vllm.cacheable) == (False, True)
    assert (openai.supports_fewshot, openai.supports_distributed, openai.needs_base_url, openai.cacheable) == \
        (False, False, True, False)
    assert "base_url" in openai.options and not hf.options and not vllm.options


def test_an_unknown_name_is_refused_listing_the_registered_ones():
    with pytest.raises(LlmcalError, match=r"^unknown --backend 'onnx'; choose hf, vllm or openai$"):
        get_backend("onnx")
    with pytest.raises(LlmcalError, match="unknown --backend 'onnx'"):
        check_backend("onnx")


def test_an_unknown_backend_fails_before_the_run_directory_is_touched(tmp_path):
    with pytest.raises(LlmcalError, match="unknown --backend 'onnx'"):
        run_eval(EvalConfig(model="m", data=DATA, backend="onnx"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_registered_backend_is_listed_and_a_name_is_taken_once(own_registry):
    @register_backend("mine")
    class Mine(Backend):
        def open(self, spec, **kw):
            raise NotImplementedError

        def score(self, loaded, encoded, **kw):
            raise NotImplementedError

    assert Mine.name == "mine" and isinstance(get_backend("mine"), Mine)
    with pytest.raises(LlmcalError, match=r"choose hf, vllm, openai or mine$"):
        get_backend("onnx")
    with pytest.raises(ValueError, match="already registered"):
        register_backend("hf")(Mine)
    with pytest.raises(TypeError, match="not a Backend subclass"):
        register_backend("plain")(object)


def test_the_flags_are_checked_by_load_before_open(own_registry):
    from llmcal.distributed import World
    from llmcal.models import ModelSpec

    opened = []

    @register_backend("single")
    class Single(Backend):
        supports_distributed = False
        one_process_note = "it has one connection"
        needs_base_url = True

        def open(self, spec, **kw):
            opened.append(spec)
            return "opened"

        def score(self, loaded, encoded, **kw):
            return []

    spec = ModelSpec(name="m", kind="toy", path="m")
    with pytest.raises(LlmcalError, match=r"^--backend single runs as one process \(it has one connection\); "
                                          r"start it without torchrun/accelerate launch$"):
        get_backend("single").load(spec, world=World(rank=0, world_size=2), api=object())
    with pytest.raises(LlmcalError, match="--backend single needs --base-url"):
        get_backend("single").load(spec)
    assert opened == []
    assert get_backend("single").load(spec, api=object()) == "opened"


def test_a_backend_that_cannot_do_few_shot_refuses_it_and_others_refuse_its_options(own_registry):
    @register_backend("zero-shot")
    class ZeroShot(Backend):
        supports_fewshot = False

        def open(self, spec, **kw):
            raise NotImplementedError

        def score(self, loaded, encoded, **kw):
            raise NotImplementedError

    from llmcal.evaluate import _check

    with pytest.raises(LlmcalError, match=r"^--num-fewshot is not supported with --backend zero-shot yet$"):
        _check(EvalConfig(model="m", data=DATA, backend="zero-shot", num_fewshot=2))
    _check(EvalConfig(model="m", data=DATA, backend="zero-shot"))
    with pytest.raises(LlmcalError, match=r"^--concurrency applies to --backend openai \(not zero-shot\)$"):
        _check(EvalConfig(model="m", data=DATA, backend="zero-shot", concurrency=8))


# ---- a backend added from outside, through llmcal.evaluate --------------------------------------
def test_the_docs_toy_backend_runs_through_llmcal_evaluate(own_registry, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(_docs_example(), str(DOCS), "exec"), ns)  # noqa: S102 - the documented example, as written
    run = ns["run"]
    assert "longest" in backend_names()
    # its numbers are the ones an independent reading of the same questions gives
    from llmcal.data import load_dataset

    qs = list(load_dataset(DATA).questions)
    want = np.mean([int(np.argmax([len(c) for c in q.choices])) == q.answer for q in qs])
    assert run.metrics["accuracy"] == pytest.approx(want, abs=1e-12) and run.metrics["n"] == 40
    rows = [json.loads(line) for line in (tmp_path / "runs/toy/predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [q.id for q in qs]
    assert rows[0]["logits"] == [float(len(c)) for c in qs[0].choices]
    config = json.loads((tmp_path / "runs/toy/config.json").read_text())
    assert config["backend"] == "longest" and config["model_spec"]["kind"] == "toy"
    assert run.meta["dtype"] == "none" and run.meta["device"] == "cpu"
    assert capsys.readouterr().out.split() == [str(run.metrics["accuracy"]), "none"]


class Boom(Exception):
    pass


def test_a_toy_backend_resumes_and_is_cached_like_the_built_in_ones(own_registry, tmp_path):
    """``done`` and ``on_batch`` make an outside backend resumable; ``cacheable`` lets the cache serve it."""
    from llmcal.data import load_dataset
    from llmcal.models import LoadedModel, ModelSpec
    from llmcal.prompts import EncodedQuestion

    calls, die_after = [], [2]

    @register_backend("first")
    class First(Backend):
        def spec(self, cfg):
            return ModelSpec(name=cfg.model, kind="toy", path=cfg.model)

        def open(self, spec, *, dtype, device, world, api):
            return LoadedModel(model=None, tokenizer=None, spec=spec, device="cpu", dtype="none", backend=self.name)

        def template(self, loaded, requested):
            return "plain"

        def encode(self, loaded, questions, template, shots=None):  # the cache key reads token ids
            return [EncodedQuestion(q, tuple(ord(ch) for ch in q.question), tuple(range(len(q.choices))))
                    for q in questions]

        def score(self, loaded, encoded, *, options, done=(), on_batch=None):
            todo = [e for e in encoded if e.question.id not in done]
            calls.append(len(todo))
            preds = []
            for i in range(0, len(todo), 8):
                if die_after and i == 8 * die_after[0]:
                    die_after.clear()
                    raise Boom()
                batch = [llmcal.Prediction.from_logits(e.question.id, e.question.subject, e.question.answer,
                                                       [1.0] + [0.0] * (len(e.letter_ids) - 1))
                         for e in todo[i:i + 8]]
                on_batch(batch)
                preds += batch
            return preds

    with pytest.raises(Boom):
        llmcal.evaluate("m", DATA, out=tmp_path / "a", backend="first", progress=False)
    rec = llmcal.evaluate("m", DATA, out=tmp_path / "a", backend="first", progress=False)
    assert calls == [40, 24]  # the rerun scored only what the killed one had not flushed
    assert rec.metrics["accuracy"] == pytest.approx(np.mean([q.answer == 0 for q in load_dataset(DATA).questions]))
    llmcal.evaluate("m", DATA, out=tmp_path / "b", backend="first", progress=False)
    assert calls == [40, 24]  # served by the scoring cache
    assert (tmp_path / "a/predictions.jsonl").read_bytes() == (tmp_path / "b/predictions.jsonl").read_bytes()
