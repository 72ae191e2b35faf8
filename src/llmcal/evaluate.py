"""Evaluation runs: the library API behind ``llmcal eval`` and ``llmcal calibrate --method ts``.

Data flow: dataset -> encoded prompts -> scoring engine (flushed to the run as
it goes, through ``llmcal.pipeline.Run``) -> predictions in dataset order ->
metrics -> plots and report.

Under a launcher (``torchrun --nproc_per_node N`` or ``accelerate launch``)
every process scores its share of the batches; rank 0 writes the run, which
equals a single-process run (see ``llmcal.pipeline``).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import Field

from . import distributed
from .backends import DEFAULT_BACKEND, backend_of, check_backend, check_options, get_backend
from .confidence import FIELDS as CONFIDENCE_OPTIONS
from .confidence import check_confidence
from .confidence import cost as confidence_cost
from .data import load_dataset
from .data.fewshot import NumFewshot, choose_shots
from .data.schema import Question
from .data.splits import SplitOrAll
from .debias import Mode
from .errors import LlmcalError
from .models import LoadedModel, ModelSpec
from .options import Dtype, Template, config, option, shared
from .pipeline import Run
from .runs import RunRecord
from .validation import Int, NonNegativeInt, Number, OpenFraction, PositiveFraction, PositiveInt, PositiveNumber, says

log = logging.getLogger(__name__)

SampleTemperature = Annotated[Number, Field(ge=0, le=2), says("a number from 0 to 2")]


@config
class EvalConfig:
    """Everything that decides an evaluation's numbers (stored as the run's config.json).

    Frozen, and checked against its field types when built (``llmcal.options.config``); the rules between
    fields are :func:`_check`'s.
    """

    model: str = shared("model")
    data: str = option(help="mmlu, arc-challenge, arc-easy, openbookqa, medmcqa, a .jsonl/.json/.csv/.parquet "
                            "file, or synthetic:<task>?difficulty=N&n=N.", short="-d")
    gguf_file: str | None = shared("gguf_file")
    base: str | None = shared("base")
    split: SplitOrAll = option(
        "all", help="Named split of --data: all, train (60%), calib (20%) or test (20%), by a "
                    "hash of each question id and the seed.")
    subjects: Optional[list[str]] = option(None, flag="--subject", help="Keep only this subject of --data "
                                                                        "(repeatable).")
    limit: Optional[PositiveInt] = option(None, help="Use a fixed, seeded subset of this many questions of --data.")
    seed: Int = shared("seed")
    template: Template = shared("template")
    num_fewshot: NumFewshot = option(
        0, help="Worked examples before each question (lm-eval's few-shot MMLU format with "
                "--template plain): N questions of the same subject from the train split "
                "of --data, the same N for every question of a subject (a seeded choice; "
                "use --split test so that they are never evaluated).")
    dtype: Dtype = shared("dtype")
    device: str = shared("device")
    batch_tokens: PositiveInt = shared("batch_tokens")
    n_bins: PositiveInt = shared("n_bins")
    n_bootstrap: PositiveInt = shared("n_bootstrap")
    mapping: Optional[dict] = shared("mapping")
    calib_fraction: OpenFraction = option(0.2, help="ts: share of --data held out to fit the temperature (a hash "
                                                    "of each id and the seed); the rest is the test part.")
    method: Literal["none", "ts"] = option(
        "none", cli=False, flag="--method", help="none (eval) or ts (calibrate --method ts).")
    backend: str = option("hf", help="Scoring backend: hf (transformers), vllm (GPU, needs vllm installed) or "
                                     "openai (a model served behind an OpenAI-compatible endpoint, named by "
                                     "--base-url; --model is then the name the server knows it by).")
    # ---- served models (--backend openai; docs/reference.md, "Served models") ----
    base_url: Optional[str] = option(None, help="--backend openai: the endpoint's base URL, e.g. "
                                                "http://127.0.0.1:8000/v1.")
    api_key_env: str = option("OPENAI_API_KEY", help="--backend openai: the environment variable that holds the "
                                                     "API key (sent as a bearer token; unset is fine for a local "
                                                     "server; the key is never recorded).")
    api_mode: Literal["completions", "chat", "auto"] = option(
        "auto", help="--backend openai: completions (the plain prompt), chat (the chat message, "
                     "in the server's chat template) or auto (the mode --template names; with "
                     "--template auto too, completions when the server returns logprobs for "
                     "it, else chat).")
    top_logprobs: PositiveInt = option(
        20, help="--backend openai: log-probabilities asked for the first generated token; "
                 "option letters outside them are missing (see the letter coverage).")
    concurrency: PositiveInt = option(4, help="--backend openai: requests in flight at once.")
    request_timeout: PositiveNumber = option(60.0, help="--backend openai: seconds to wait for one response.")
    max_retries: NonNegativeInt = option(
        5, help="--backend openai: retries of a request after HTTP 429 or 5xx, a timeout or "
                "a connection error (backoff from 1 s, doubling).")
    # ---- confidence without logprobs (--backend openai; docs/reference.md, "Confidence without logprobs") ----
    confidence: Literal["logprobs", "verbalized", "ptrue", "consistency"] = option(
        "logprobs", help="Where confidence comes from: logprobs (the option letters' probabilities of the first "
                         "token), or, asking a served model in words (--backend openai, chat endpoint): verbalized "
                         "(the model states a confidence), ptrue (the probability of 'True' when asked whether its "
                         "answer is correct) or consistency (the share of --samples sampled answers).")
    verbalized_template: Literal["1stage-percent", "1stage-prob", "2stage"] = option(
        "1stage-percent", help="--confidence verbalized: 1stage-percent (answer and a 0-100% confidence in one "
                               "reply), 1stage-prob (answer and a 0.0-1.0 probability) or 2stage (the answer, then "
                               "'how confident are you?' in a second turn).")
    samples: PositiveInt = option(10, help="--confidence consistency: answers sampled per question.")
    sample_temperature: SampleTemperature = option(1.0, help="--confidence consistency: sampling temperature (0 to "
                                                             "2).")
    reasoning: bool = option(False, help="--confidence consistency, ptrue or verbalized 2stage: let the model think "
                                         "step by step, then read the letter of its last 'Answer: X' line.")
    max_parse_retries: NonNegativeInt = option(
        2, help="--confidence verbalized, ptrue, consistency: times an unreadable reply "
                "is asked again (with the reason) before the question is recorded as "
                "unparseable (uniform distribution, flagged and counted).")
    max_new_tokens: Optional[PositiveInt] = option(
        None, help="--confidence verbalized, ptrue, consistency: tokens a reply "
                   "may have (default 32; 512 for a reasoned answer).")
    # ---- option-order debiasing (docs/reference.md, "Option-order debiasing") ----
    permutations: Mode = option(
        "none", help="llmcal eval only: option-order debiasing: none, cyclic (score every question under the K "
                     "cyclic shifts of its options and average them in the original order: K "
                     "forward passes per question) or pride (estimate the letter prior from "
                     "the K shifts of a seeded --pride-fraction of the questions and divide "
                     "it out of every question). Reports the letter prior and the results "
                     "none and debiased side by side.")
    pride_fraction: PositiveFraction = option(
        0.05, help="llmcal eval --permutations pride: share of the questions (per option count, at "
                   "least one) scored under every shift to estimate the letter prior.")


def _check(cfg: EvalConfig) -> None:
    """The rules between fields (each field's own type was checked when ``cfg`` was built)."""
    if cfg.permutations != "pride" and cfg.pride_fraction != EvalConfig.__dataclass_fields__["pride_fraction"].default:
        raise LlmcalError(f"--pride-fraction goes with --permutations pride (not {cfg.permutations})")
    check_confidence(cfg)  # --confidence and its options (llmcal.confidence): the backend, the api mode
    check_options(cfg)  # each backend's own options, and what it cannot do (--num-fewshot)


DEBIAS_FIELDS = ("permutations", "pride_fraction")
CONFIDENCE_FIELDS = ("confidence", *CONFIDENCE_OPTIONS)


def config_fields(cfg: Any) -> dict:
    """``asdict(cfg)``, without the debiasing keys of a run that does not debias, nor the confidence-source keys of a
    ``--confidence logprobs`` run (the default: its config.json is what it was before ``--confidence`` existed).

    So a plain run's config.json is what it was before ``--permutations`` existed, and runs interrupted
    then (study cells included) still resume; pride_fraction is recorded only with ``--permutations pride``.
    """
    d = asdict(cfg)
    if d.get("confidence", "logprobs") == "logprobs":  # so a logprobs run's config.json is what it was before
        for k in CONFIDENCE_FIELDS:
            d.pop(k, None)
    if d.get("permutations", "none") == "none":
        for k in DEBIAS_FIELDS:
            d.pop(k, None)
    elif d["permutations"] != "pride":
        d.pop("pride_fraction", None)
    return d


def _load_questions(cfg: EvalConfig, split: str | None) -> list[Question]:
    ds = load_dataset(cfg.data, split=None if split in (None, "all") else split, subjects=cfg.subjects,
                      limit=cfg.limit, seed=cfg.seed, mapping=cfg.mapping)
    if not ds.questions:
        raise LlmcalError(f"{cfg.data}: no questions left after the split/subject/limit filters")
    return list(ds.questions)


def load_for(cfg: Any, spec: ModelSpec) -> LoadedModel:
    """The model for this process: the backend ``cfg`` names, on this rank's device.

    A local model's weights are loaded when first scored with (``LoadedModel``): a run whose scores all
    come from the scoring cache never loads them.
    """
    backend = get_backend(getattr(cfg, "backend", DEFAULT_BACKEND))
    world = distributed.current_world()
    api = backend.settings(cfg)
    return distributed.collective(lambda: backend.load(spec, dtype=cfg.dtype, device=cfg.device, world=world,
                                                       api=api),
                                  what="loading the model")


def _spec(cfg: EvalConfig, loaded: LoadedModel | None) -> ModelSpec:
    return loaded.spec if loaded is not None else get_backend(cfg.backend).spec(cfg)


def _prepared(cfg: EvalConfig, loaded: LoadedModel, questions: list[Question],
              origin: dict[str, tuple[Question, int]] | None = None) -> tuple[str, Any, bool]:
    """(resolved template, encoded questions or None, whether the scoring cache may serve them).

    The backend resolves the template, encodes (``Run.score`` does it when this gives None) and says
    whether its scores may be cached (not a served model's: its weights are not on disk and can change
    behind the endpoint). ``origin``: for shifted copies of questions (``--permutations``), each copy's
    original question, whose few-shot examples the copy gets.
    """
    backend = backend_of(loaded)
    template = backend.template(loaded, cfg.template)
    if not getattr(cfg, "num_fewshot", 0):
        return template, None, backend.cacheable
    if origin is None:
        shots = fewshot_for(cfg, questions)
    else:
        originals = list({q.id: q for q, _ in origin.values()}.values())
        first = fewshot_for(cfg, originals)
        shots = {q.id: first[origin[q.id][0].id] for q in questions}
    return template, backend.encode(loaded, questions, template, shots), backend.cacheable


def fewshot_for(cfg: Any, questions: list[Question]) -> dict[str, tuple[Question, ...]]:
    """``--num-fewshot``: each question's examples from the train split of ``cfg.data`` (data/fewshot.py)."""
    pool = load_dataset(cfg.data, split="train", subjects=cfg.subjects, seed=cfg.seed, mapping=cfg.mapping)
    return choose_shots(questions, pool.questions, cfg.num_fewshot, cfg.seed)


def config_doc(cfg: Any, spec: ModelSpec, kind: str) -> dict:
    """A run's config.json: the config's fields, the command kind and the resolved model spec."""
    d = config_fields(cfg)
    d["kind"] = kind
    d["model_spec"] = spec.to_dict()
    return d


def run_meta(loaded: LoadedModel, template: str, **extra: Any) -> dict:
    """A run's meta: template, dtype, device, ``extra``, then what the backend records (a served model's endpoint)."""
    return {"template": template, "dtype": loaded.dtype, "device": device_label(loaded), **extra,
            **backend_of(loaded).meta(loaded)}


def run_eval(cfg: EvalConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True,
             loaded: LoadedModel | None = None) -> RunRecord:
    """``llmcal eval``: score a dataset, write predictions, metrics, reliability diagram, report."""
    _check(cfg)
    check_backend(cfg.backend)
    spec = _spec(cfg, loaded)
    questions = _load_questions(cfg, cfg.split)
    run = Run.start(out, config_doc(cfg, spec, "eval"), device=cfg.device, overwrite=overwrite, progress=progress)
    loaded = loaded or load_for(cfg, spec)
    if cfg.permutations != "none":
        return _run_debiased(cfg, run, spec, loaded, questions)
    template, encoded, cache = _prepared(cfg, loaded, questions)
    counted = confidence_cost.Counted(loaded)
    preds = run.score("predictions.jsonl", loaded, questions, template, cache=cache, encoded=encoded,
                      description=f"eval {cfg.data}")
    # the confidence source's parse counts and cost (None for a local model); the questions an earlier, killed
    # attempt scored are not on this process's clock and counters
    block = counted.block(cfg, preds, done_before=run.scored_before.get("predictions.jsonl", 0))
    res = run.result("none", preds, dataset=cfg.data, split=cfg.split, pred_file="predictions.jsonl",
                     png="reliability.png", title=f"{spec.name} on {cfg.data} ({cfg.split})")
    if block is not None:
        run.section("Confidence source", confidence_cost.section(block))
    return run.finish(model=spec.name, results=[res], confidence=block,
                      meta=run_meta(loaded, template, n_questions=len(preds)))


def _run_debiased(cfg: EvalConfig, run: Run, spec: ModelSpec, loaded: LoadedModel,
                  questions: list[Question]) -> RunRecord:
    """``eval --permutations cyclic|pride`` (llmcal.debias): two resumable scoring passes, then two results.

    ``predictions-none.jsonl``: every question as written (result ``none``); ``scores-permuted.jsonl``: the
    shifted copies (every question's for cyclic, the subset's for pride); ``predictions.jsonl``: the debiased
    predictions (result ``debiased``, the run's prediction), with each shift's distribution where scored.
    """
    from . import debias
    from .io import atomic_write_jsonl
    from .metrics.bootstrap import bootstrap_diff_ci
    from .metrics.core import accuracy, conf_ece
    from .predictions import stack_probs

    template, encoded, cache = _prepared(cfg, loaded, questions)
    plain = run.score("predictions-none.jsonl", loaded, questions, template, cache=cache, encoded=encoded,
                      description=f"eval {cfg.data}")
    subset = questions if cfg.permutations == "cyclic" else debias.pride_subset(questions, cfg.pride_fraction,
                                                                                 cfg.seed)
    shifted, origin = debias.permuted_questions(subset)
    _, enc_shifted, cache = _prepared(cfg, loaded, shifted, origin)
    permuted = run.score("scores-permuted.jsonl", loaded, shifted, template, cache=cache, encoded=enc_shifted,
                         description=f"shifted options ({cfg.permutations})") if shifted else []
    deb = debias.debias_predictions(plain, permuted, origin, cfg.permutations, n_bootstrap=cfg.n_bootstrap,
                                    seed=cfg.seed)
    run.on_main(lambda: atomic_write_jsonl(run.file("predictions.jsonl"), deb.records),
                what="writing the debiased predictions")
    passes = debias.forward_passes(questions, cfg.permutations, subset)
    p0, answers = stack_probs(plain)
    p1, _ = stack_probs(deb.predictions)
    kw = dict(n_resamples=cfg.n_bootstrap, seed=cfg.seed)
    d_acc = bootstrap_diff_ci(accuracy, p0, p1, answers, **kw)
    d_ece = bootstrap_diff_ci(lambda p, a: conf_ece(p, a, n_bins=cfg.n_bins), p0, p1, answers, **kw)
    res_none = run.result("none", plain, dataset=cfg.data, split=cfg.split, pred_file="predictions-none.jsonl",
                          png="reliability-none.png", title=f"{spec.name} on {cfg.data} ({cfg.split}), options as given")
    res_deb = run.result("debiased", deb.predictions, dataset=cfg.data, split=cfg.split, method=cfg.permutations,
                         pred_file="predictions.jsonl", png="reliability.png",
                         title=f"{spec.name} on {cfg.data} ({cfg.split}), debiased ({cfg.permutations})")
    change = {"accuracy": res_deb.metrics["accuracy"] - res_none.metrics["accuracy"], "accuracy_ci": list(d_acc),
              "conf_ece": res_deb.metrics["conf_ece"] - res_none.metrics["conf_ece"], "conf_ece_ci": list(d_ece)}
    cost = ("K forward passes per question" if cfg.permutations == "cyclic" else
            "one forward pass per question, K on the subset")
    summary = {"mode": cfg.permutations, "n_questions": len(questions), "forward_passes": passes,
               "forward_passes_plain": len(questions), "cost": cost, "n_subset": len(deb.subset_ids),
               "subset_ids": deb.subset_ids, "seed": cfg.seed, "letter_prior": deb.priors,
               "prior_used": deb.prior_used, "change": change}
    if cfg.permutations == "pride":
        summary["pride_fraction"] = cfg.pride_fraction
    res_deb.extra.update({"debias": cfg.permutations, "forward_passes": passes, **change})
    run.section("Option-order debiasing", debias.debias_section(summary, res_none.metrics, res_deb.metrics))
    return run.finish(model=spec.name, results=[res_none, res_deb],
                      meta=run_meta(loaded, template, n_questions=len(questions), debias=summary))


def run_calibrate_ts(cfg: EvalConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True,
                     loaded: LoadedModel | None = None) -> RunRecord:
    """``llmcal calibrate --method ts``: fit a temperature on a held-out slice, report the rest before/after."""
    from .data.splits import split_heldout
    from .posthoc import TemperatureScaler, temperature_scale_predictions
    from .predictions import write_predictions

    _check(cfg)
    if cfg.permutations != "none":
        raise LlmcalError(f"--permutations {cfg.permutations} applies to llmcal eval, not to calibrate --method ts")
    if cfg.confidence != "logprobs":
        raise LlmcalError(f"--confidence {cfg.confidence} applies to llmcal eval; fit post-hoc calibrators on its run "
                          f"with llmcal calibrate --from RUN")
    check_backend(cfg.backend)
    spec = _spec(cfg, loaded)
    questions = _load_questions(cfg, cfg.split)
    test, calib = split_heldout(questions, cfg.calib_fraction, cfg.seed)
    if len(calib) < 2 or not test:
        raise LlmcalError(f"{cfg.data}: {len(questions)} questions leave {len(calib)} for calibration and "
                          f"{len(test)} for testing; use more questions (--limit) or change --calib-fraction")
    run = Run.start(out, config_doc(cfg, spec, "calibrate"), device=cfg.device, overwrite=overwrite,
                    progress=progress)
    loaded = loaded or load_for(cfg, spec)
    both = list(calib) + list(test)
    template, encoded, cache = _prepared(cfg, loaded, both)
    # One scoring pass over both parts (one file, resumable, cached), then split the predictions.
    allp = run.score("scores.jsonl", loaded, both, template, cache=cache, encoded=encoded,
                     description=f"score {cfg.data}")
    pc, pt = allp[:len(calib)], allp[len(calib):]
    ts = TemperatureScaler().fit([p.logits for p in pc], [p.answer for p in pc])
    # A served model's letter coverage belongs to the question, not to the temperature: carry it over.
    pt_ts = [dataclasses.replace(s, letter_mass=p.letter_mass, missing=p.missing)
             for s, p in zip(temperature_scale_predictions(pt, ts.temperature_), pt)]

    def write() -> None:
        write_predictions(run.file("predictions-calib.jsonl"), pc)
        write_predictions(run.file("predictions.jsonl"), pt)
        write_predictions(run.file("predictions-ts.jsonl"), pt_ts)

    run.on_main(write, what="writing the predictions")
    extra = {"temperature": ts.temperature_, "calib_n": len(pc), "calib_nll_before": ts.nll_before_,
             "calib_nll_after": ts.nll_after_}
    results = [
        run.result("none", pt, dataset=cfg.data, split="test", pred_file="predictions.jsonl", png="reliability.png",
                   title=f"{spec.name}: before (test)"),
        run.result("ts", pt_ts, dataset=cfg.data, split="test", pred_file="predictions-ts.jsonl",
                   title=f"{spec.name}: temperature scaling T={ts.temperature_:.2f} (test)", extra=extra),
    ]
    return run.finish(model=spec.name, results=results, meta=run_meta(loaded, template, **extra))


def device_label(loaded: LoadedModel) -> str:
    """The device for the run's metadata: the same string for every process count."""
    world = distributed.current_world()
    dev = loaded.device
    if world.distributed and dev.startswith("cuda:"):
        dev = "cuda"
    return dev if not world.distributed else f"{dev} x{world.world_size}"
