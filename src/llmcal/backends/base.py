"""The model interface every scoring backend implements, and the registry that names them.

As in lm-evaluation-harness (``lm_eval.api.model.LM`` and ``@register_model``), a backend is a small
class registered under the name users type (``--backend NAME``); nothing outside ``llmcal.backends``
asks which backend it has: evaluation, the pipeline and the scoring cache call these methods.

A backend answers five questions:

- **can it run here?** ``check()``, called before any run directory is touched (a missing package);
- **are the options right for it?** ``check_config(cfg)`` (and ``options``, the config fields only it
  reads, which every other backend refuses) and the capability flags ``supports_fewshot``,
  ``supports_distributed`` and ``needs_base_url``;
- **what is the model?** ``spec(cfg)`` (a ``ModelSpec`` for the run's config.json) and ``load(...)``, which
  checks the flags and calls ``open(...)`` for a ``LoadedModel`` (``LoadedModel.backend`` is its name);
- **how are questions asked?** ``template(loaded, requested)`` and ``encode(loaded, questions, template,
  shots)``, whatever ``score`` takes (``prompts.EncodedQuestion`` for a local tokenizer);
- **what are the scores?** ``score(loaded, encoded, options=, done=, on_batch=)``: a ``Prediction`` per
  question not in ``done``, handed to ``on_batch`` as they finish (that is what makes a run resumable).

``cacheable`` says whether the scoring cache may store and serve its scores (the key is the weights on
disk, so not for a model behind an endpoint), ``meta(loaded)`` what a run records about the model.
"""
from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Sequence

from ..distributed import World
from ..errors import LlmcalError

if TYPE_CHECKING:
    from ..data.schema import Question
    from ..models import LoadedModel, ModelSpec
    from ..predictions import Prediction

_REGISTRY: dict[str, type["Backend"]] = {}
DEFAULT_BACKEND = "hf"  # a config without a backend field, and a model loaded by models.load_model directly


class Backend(abc.ABC):
    """One way of scoring multiple-choice questions (see the module docstring); subclasses are stateless."""

    name: ClassVar[str] = ""  # set by @register_backend
    supports_fewshot: ClassVar[bool] = True
    fewshot_note: ClassVar[str] = ""  # why not, appended to the refusal
    supports_distributed: ClassVar[bool] = True
    one_process_note: ClassVar[str] = ""  # why one process, in the refusal
    needs_base_url: ClassVar[bool] = False
    cacheable: ClassVar[bool] = True
    options: ClassVar[tuple[str, ...]] = ()  # EvalConfig fields only this backend reads

    # ---- before the run ---------------------------------------------------------------------
    @classmethod
    def check(cls) -> None:
        """Raise LlmcalError when this backend cannot run on this machine (say what to install)."""

    def check_config(self, cfg: Any) -> None:
        """Raise LlmcalError for options this backend cannot honour (``cfg``: an ``EvalConfig``)."""
        if getattr(cfg, "num_fewshot", 0) and not self.supports_fewshot:
            raise LlmcalError(f"--num-fewshot is not supported with --backend {self.name} yet{self.fewshot_note}")

    def spec(self, cfg: Any) -> "ModelSpec":
        """What ``cfg.model`` names, as the run records it."""
        from ..models import resolve_model

        return resolve_model(cfg.model, gguf_file=cfg.gguf_file, base=cfg.base)

    def settings(self, cfg: Any) -> Any:
        """The endpoint settings ``load(api=...)`` takes, from the config (None for a local model)."""
        return None

    # ---- the model ----------------------------------------------------------------------------
    def load(self, spec: "ModelSpec", *, dtype: str = "auto", device: str = "auto", world: World | None = None,
             api: Any = None) -> "LoadedModel":
        """``spec`` ready to score in this process (one of ``world``'s ranks); ``api``: ``settings(cfg)``."""
        self.check()
        world = world or World()
        if world.distributed and not self.supports_distributed:
            raise LlmcalError(f"--backend {self.name} runs as one process ({self.one_process_note}); "
                              f"start it without torchrun/accelerate launch")
        if self.needs_base_url and api is None:
            raise LlmcalError(f"--backend {self.name} needs --base-url (the endpoint, e.g. http://127.0.0.1:8000/v1)")
        return self.open(spec, dtype=dtype, device=device, world=world, api=api)

    @abc.abstractmethod
    def open(self, spec: "ModelSpec", *, dtype: str, device: str, world: World, api: Any) -> "LoadedModel":
        """Build the ``LoadedModel`` (``backend=self.name``); the flags are already checked."""

    # ---- asking and scoring -------------------------------------------------------------------
    def template(self, loaded: "LoadedModel", requested: str) -> str:
        """The prompt template the run uses for ``--template requested``."""
        from ..prompts import resolve_template

        return resolve_template(requested, loaded.tokenizer)

    def encode(self, loaded: "LoadedModel", questions: Sequence["Question"], template: str,
               shots: dict | None = None) -> list:
        """The questions as ``score`` takes them; ``shots``: each question's few-shot examples by id."""
        from ..prompts import encode_questions

        return encode_questions(questions, loaded.tokenizer, template, shots)

    @abc.abstractmethod
    def score(self, loaded: "LoadedModel", encoded: Sequence[Any], *, options: Any, done: Iterable[str] = (),
              on_batch: Callable[[list["Prediction"]], None] | None = None) -> list["Prediction"]:
        """Predictions for the questions not in ``done`` (``options``: a ``scoring.ScoreOptions``)."""

    def meta(self, loaded: "LoadedModel") -> dict:
        """What a run's metrics.json records about the model beyond template, dtype and device."""
        return {}


def register_backend(name: str) -> Callable[[type[Backend]], type[Backend]]:
    """Class decorator: ``@register_backend("hf")`` makes ``--backend hf`` this class."""

    def add(cls: type[Backend]) -> type[Backend]:
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise TypeError(f"@register_backend({name!r}): {cls!r} is not a Backend subclass")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"backend {name!r} is already registered ({_REGISTRY[name].__qualname__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def backend_names() -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(_REGISTRY)


def find_backend(name: str) -> Backend | None:
    cls = _REGISTRY.get(name)
    return cls() if cls is not None else None


def get_backend(name: str) -> Backend:
    """The backend registered as ``name``; a LlmcalError listing the registered names otherwise."""
    found = find_backend(name)
    if found is None:
        names = backend_names()
        choices = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else ", ".join(names)
        raise LlmcalError(f"unknown --backend {name!r}; choose {choices}")
    return found


def backend_of(loaded: "LoadedModel") -> Backend:
    """The backend that loaded ``loaded`` (``LoadedModel.backend``)."""
    return get_backend(getattr(loaded, "backend", DEFAULT_BACKEND))


def check_options(cfg: Any) -> None:
    """Every backend's own options in ``cfg`` (an ``EvalConfig``): refused unless ``cfg.backend`` reads them,
    then checked by that backend (``check_config``). Before any run directory is touched."""
    chosen = find_backend(cfg.backend)
    mine = chosen.options if chosen is not None else ()
    fields = type(cfg).__dataclass_fields__
    for name in backend_names():
        for f in _REGISTRY[name].options:
            if f not in mine and getattr(cfg, f) != fields[f].default:
                raise LlmcalError(f"--{f.replace('_', '-')} applies to --backend {name} (not {cfg.backend})")
    if chosen is not None:
        chosen.check_config(cfg)
