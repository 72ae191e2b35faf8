"""Confidence without logprobs: verbalized, P(True) and sampling consistency (``llmcal eval --confidence``).

``--confidence logprobs`` (the default) reads the option distribution from the first token's log-probabilities
(``backends.openai``, or the local engines).  The other sources ask a served model in words, through the chat
endpoint of ``--backend openai`` (docs/reference.md, "Confidence without logprobs"):

- ``verbalized`` (``verbalized.py``): the model states a confidence, in one request with its answer or in a
  second one (``--verbalized-template``);
- ``ptrue`` (``ptrue.py``): the probability of "True" when the model is asked whether its answer is correct;
- ``consistency`` (``consistency.py``): the share of ``--samples`` answers sampled at ``--sample-temperature``
  (``--reasoning``: each after a chain of thought).

One module per idea: ``prompts`` (the templates), ``parse`` (the readers and their tolerances), ``ask``
(requests through the run's ``OpenAIClient``, seeds, the retry rule), ``record`` (the distribution, the
unparseable rule), ``cost`` (the run's ``confidence`` block).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import LlmcalError

# EvalConfig's fields for these sources, with the source each belongs to (None: every source but logprobs).
FIELDS = {"verbalized_template": ("verbalized",), "samples": ("consistency",), "sample_temperature": ("consistency",),
          "reasoning": ("ptrue", "consistency", "verbalized"), "max_parse_retries": None, "max_new_tokens": None}
ANSWER_TOKENS = 32  # a letter, or a short sentence naming it, and a stated confidence
REASONING_TOKENS = 512  # a chain of thought before "Answer: X"
CONFIDENCE_TOKENS = 32


@dataclass(frozen=True)
class ConfidenceSettings:
    """How the served model is asked (from EvalConfig's confidence fields; ``backends.openai.ApiSettings.confidence``)."""

    source: str
    template: str = "1stage-percent"
    samples: int = 10
    temperature: float = 1.0
    reasoning: bool = False
    max_parse_retries: int = 2
    max_new_tokens: int | None = None
    seed: int = 0
    top_logprobs: int = 20

    @property
    def answer_tokens(self) -> int:
        return self.max_new_tokens or (REASONING_TOKENS if self.reasoning else ANSWER_TOKENS)

    @property
    def confidence_tokens(self) -> int:
        """A verbalized reply: the letter and the confidence, or the confidence alone."""
        return self.max_new_tokens or CONFIDENCE_TOKENS


def settings_of(cfg: Any) -> ConfidenceSettings | None:
    """The confidence settings of an EvalConfig, or None for ``--confidence logprobs``."""
    source = getattr(cfg, "confidence", "logprobs")
    if source == "logprobs":
        return None
    return ConfidenceSettings(source=source, template=cfg.verbalized_template, samples=cfg.samples,
                              temperature=float(cfg.sample_temperature), reasoning=bool(cfg.reasoning),
                              max_parse_retries=cfg.max_parse_retries, max_new_tokens=cfg.max_new_tokens,
                              seed=cfg.seed, top_logprobs=cfg.top_logprobs)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_confidence(cfg: Any) -> None:
    """Refuse a confidence source or option that cannot apply, naming the flag, before any run is started."""
    from ..backends import find_backend

    source = cfg.confidence  # each field's own type (a source, a range) was checked when cfg was built
    defaults = type(cfg).__dataclass_fields__
    for name, sources in FIELDS.items():
        if getattr(cfg, name) == defaults[name].default:
            continue
        if source == "logprobs" or (sources is not None and source not in sources):
            goes = "any --confidence but logprobs" if sources is None else \
                " or ".join(f"--confidence {x}" for x in sources)
            raise LlmcalError(f"{_flag(name)} goes with {goes} (not --confidence {source})")
    if source == "logprobs":
        return
    backend = find_backend(cfg.backend)
    if backend is None or not getattr(backend, "asks_in_words", False):
        raise LlmcalError(f"--confidence {source} asks a served model in words and reads its replies: it needs "
                          f"--backend openai (a chat endpoint, e.g. a llama.cpp or vLLM server); --backend "
                          f"{cfg.backend} reads confidence from logprobs only (--confidence logprobs)")
    if getattr(cfg, "permutations", "none") != "none":
        raise LlmcalError(f"--permutations {cfg.permutations} goes with --confidence logprobs (option-order "
                          f"debiasing re-reads the letter logprobs), not with --confidence {source}")
    if source == "verbalized" and cfg.reasoning and cfg.verbalized_template != "2stage":
        raise LlmcalError(f"--reasoning with --confidence verbalized goes with --verbalized-template 2stage (the "
                          f"answer is reasoned, then the confidence asked), not {cfg.verbalized_template}")
    if cfg.template == "plain" or getattr(cfg, "api_mode", "auto") == "completions":
        raise LlmcalError(f"--confidence {source} talks to the chat endpoint (the server applies the model's chat "
                          f"template to the conversation): use --api-mode chat or auto and --template chat or auto")


def score_question(client: Any, s: ConfidenceSettings, question: Any, where: str):
    """One question's ``Prediction`` under the source ``s.source``."""
    from . import consistency, ptrue, verbalized

    module = {"verbalized": verbalized, "ptrue": ptrue, "consistency": consistency}[s.source]
    return module.score(client, s, question, where)
