"""The vLLM backend (``--backend vllm``): option-letter logits through vLLM's sampling parameters.

For large models on GPUs.  The prompts are the scoring engine's own token ids
(``prompts.encode_questions``), so both backends score exactly the same tokens.
Each question is one request for a single new token::

    SamplingParams(max_tokens=1, temperature=0, logprobs=K, allowed_token_ids=<the K letter ids>)

on an engine built with ``logprobs_mode="processed_logits"``: the returned
"logprobs" are then the logits after the allowed-token mask, i.e. the K letter
logits themselves (every other token is -inf), so the top K are exactly the
option letters.  (vLLM's default, ``raw_logprobs``, ranks the whole vocabulary,
and a letter outside the top K would be missing.)  The letters' values become a
``Prediction`` exactly as in the transformers backend: softmax over the K
letters, argmax, max probability.

vLLM is optional: this module imports it only inside functions, and
``require_vllm`` turns its absence into an LlmcalError that says what to install.
"""
from __future__ import annotations

import importlib.util
import logging
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..errors import LlmcalError
from ..models import LoadedModel, ModelSpec, dtype_name, load_tokenizer, resolve_dtype, weights_dir
from ..predictions import Prediction
from ..prompts import EncodedQuestion
from .base import Backend, register_backend

log = logging.getLogger(__name__)

LOGPROBS_MODE = "processed_logits"
MAX_OPTIONS = 26  # letters A..Z
CHUNK_QUESTIONS = 512  # requests per generate() call: progress, flushing and resume granularity
INSTALL_HINT = "pip install 'llmcal[vllm]' (or pip install vllm) on a machine with a CUDA GPU"


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    if not vllm_available():
        raise LlmcalError(f"--backend vllm needs the vllm package, which is not installed: {INSTALL_HINT}; "
                          f"or use --backend hf")


# ---- requests and their outputs (pure functions; tested with fake vLLM outputs) ---------------
def sampling_kwargs(e: EncodedQuestion) -> dict:
    """SamplingParams arguments for one question: one token, its K letter logits."""
    return {"max_tokens": 1, "temperature": 0.0, "logprobs": len(e.letter_ids),
            "allowed_token_ids": list(e.letter_ids), "detokenize": False}


def _value(entry: Any) -> float:
    """A vLLM Logprob object (``.logprob``) or a bare number."""
    v = getattr(entry, "logprob", entry)
    return float(v)


def letter_values(e: EncodedQuestion, step_logprobs: Mapping[int, Any]) -> list[float]:
    """The K letter values from one generated position's ``{token id: Logprob}`` mapping."""
    missing = [j for j, t in enumerate(e.letter_ids) if t not in step_logprobs]
    if missing:
        from ..data.schema import LETTERS

        raise LlmcalError(
            f"vLLM returned no log-probability for option(s) {', '.join(LETTERS[j] for j in missing)} of "
            f"question {e.question.id} (token ids {[e.letter_ids[j] for j in missing]}); the engine must run "
            f"with logprobs_mode={LOGPROBS_MODE!r} and max_logprobs >= {len(e.letter_ids)}"
        )
    return [_value(step_logprobs[t]) for t in e.letter_ids]


def prediction_from_output(e: EncodedQuestion, output: Any) -> Prediction:
    """A ``Prediction`` from vLLM's ``RequestOutput`` for question ``e`` (same schema as the hf backend)."""
    try:
        completion = output.outputs[0]
        steps = completion.logprobs
        first = steps[0]
    except (AttributeError, IndexError, TypeError) as err:
        raise LlmcalError(f"vLLM returned no log-probabilities for question {e.question.id} "
                          f"(request sampling parameters must ask for logprobs)") from err
    z = letter_values(e, first)
    if not all(math.isfinite(v) for v in z):
        raise LlmcalError(f"vLLM produced non-finite letter logits for question {e.question.id}: {z} "
                          f"(try --dtype float32)")
    q = e.question
    return Prediction.from_logits(q.id, q.subject, q.answer, z)


def predictions_from_outputs(encoded: Sequence[EncodedQuestion], outputs: Sequence[Any]) -> list[Prediction]:
    if len(outputs) != len(encoded):
        raise LlmcalError(f"vLLM returned {len(outputs)} outputs for {len(encoded)} requests")
    return [prediction_from_output(e, o) for e, o in zip(encoded, outputs)]


# ---- the engine -------------------------------------------------------------------------------
class VllmEngine:
    """Scores encoded questions with a ``vllm.LLM`` (``VllmBackend.score``)."""

    def __init__(self, llm: Any):
        self.llm = llm

    def score(self, encoded: Sequence[EncodedQuestion], *, options=None, done: Iterable[str] = (),
              on_batch: Callable[[list[Prediction]], None] | None = None) -> list[Prediction]:
        from vllm import SamplingParams

        from ..progress import bar

        done = set(done)
        todo = [e for e in encoded if e.question.id not in done]
        show = True if options is None else options.progress
        desc = "scoring (vllm)" if options is None else f"{options.description} (vllm)"
        results: list[Prediction] = []
        with bar(desc, len(encoded), show=show, completed=len(encoded) - len(todo)) as task:
            for start in range(0, len(todo), CHUNK_QUESTIONS):
                chunk = todo[start:start + CHUNK_QUESTIONS]
                prompts = [{"prompt_token_ids": list(e.input_ids)} for e in chunk]
                params = [SamplingParams(**sampling_kwargs(e)) for e in chunk]
                outputs = self.llm.generate(prompts, params, use_tqdm=False)
                preds = predictions_from_outputs(chunk, outputs)
                if on_batch is not None:
                    on_batch(preds)
                results.extend(preds)
                task.advance(len(chunk))
        return results


def load_vllm(spec: ModelSpec, *, dtype: str = "auto", device: str = "auto", **engine_kwargs: Any) -> LoadedModel:
    """``spec`` (a hub id, local directory or GGUF, converted once to safetensors) for a vLLM engine.

    The engine (``model``) is built when first used (``LoadedModel.loader``): a run whose scores all come
    from the scoring cache never starts it.
    """
    require_vllm()
    if spec.kind == "lora":
        raise LlmcalError("--backend vllm does not load LoRA adapters yet; merge the adapter into its base "
                          "(peft merge_and_unload + save_pretrained) or use --backend hf")
    if device not in ("auto", "cuda"):
        raise LlmcalError(f"--backend vllm chooses its own GPUs (set CUDA_VISIBLE_DEVICES); --device {device} "
                          f"is for --backend hf")
    dt = dtype_name(resolve_dtype(dtype, "cuda"))
    tok = load_tokenizer(spec)
    return LoadedModel(model=None, tokenizer=tok, spec=spec, device="cuda", dtype=dt, backend="vllm",
                       loader=lambda: _engine(spec, dt, engine_kwargs))


def _engine(spec: ModelSpec, dt: str, engine_kwargs: dict) -> Any:
    import vllm

    path = weights_dir(spec, dt)
    kwargs = {"model": path, "tokenizer": path, "dtype": dt, "seed": 0, "max_logprobs": MAX_OPTIONS,
              "logprobs_mode": LOGPROBS_MODE, **engine_kwargs}
    try:
        return vllm.LLM(**kwargs)
    except TypeError as e:
        if "logprobs_mode" in str(e):
            raise LlmcalError(f"this vLLM ({getattr(vllm, '__version__', '?')}) has no logprobs_mode; "
                              f"the vLLM backend needs vLLM >= 0.10.2") from e
        raise


@register_backend("vllm")
class VllmBackend(Backend):
    """Large models on GPUs; vLLM shards a model over them itself, so one process."""

    supports_distributed = False
    one_process_note = "vLLM shards a model over GPUs itself"

    @classmethod
    def check(cls) -> None:
        require_vllm()

    def open(self, spec: ModelSpec, *, dtype: str, device: str, world: Any, api: Any) -> LoadedModel:
        return load_vllm(spec, dtype=dtype, device=device)

    def score(self, loaded: LoadedModel, encoded: Sequence[EncodedQuestion], *, options: Any,
              done: Iterable[str] = (), on_batch: Callable | None = None) -> list[Prediction]:
        return VllmEngine(loaded.model).score(encoded, options=options, done=done, on_batch=on_batch)
