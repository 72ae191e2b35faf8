"""Scoring backends: ``hf`` (transformers + llmcal's scoring engine, the default), ``vllm`` and ``openai``.

Each is a ``Backend`` subclass registered by name (``backends.base``: the interface, and
docs/reference.md, "Backends"): ``backends.hf`` loads through ``models.load_model`` and scores with
``scoring.score``; ``backends.vllm`` builds a vLLM engine (vLLM itself is imported only when asked
for, so everything else works without it); ``backends.openai`` scores a model served behind an
OpenAI-compatible endpoint, and encodes the questions as requests, since there is no local tokenizer.

Every module in this package is imported here, so adding a backend is one file with a
``@register_backend("name")`` class; a class registered anywhere else (a user's module, a test)
works the same once its module is imported.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

from ..distributed import World
from ..models import LoadedModel, ModelSpec
from .base import (DEFAULT_BACKEND, Backend, backend_names, backend_of, check_options, find_backend, get_backend,
                   register_backend)

if TYPE_CHECKING:
    from .openai import ApiSettings

__all__ = ["DEFAULT_BACKEND", "Backend", "register_backend", "get_backend", "find_backend", "backend_names", "backend_of",
           "check_backend", "check_options", "load_for_backend"]

# The built-in ones first, in the order error messages list them; then any other module here.
for _name in ("hf", "vllm", "openai", *sorted(m.name for m in pkgutil.iter_modules(__path__))):
    if _name != "base":
        importlib.import_module(f"{__name__}.{_name}")


def check_backend(name: str) -> None:
    """Fail early (before a run directory is touched) for an unknown or unavailable backend."""
    get_backend(name).check()


def load_for_backend(spec: ModelSpec, *, backend: str = "hf", dtype: str = "auto", device: str = "auto",
                     world: World | None = None, api: "ApiSettings | Any" = None) -> LoadedModel:
    """Load ``spec`` for scoring in this process (one of ``world``'s ranks); ``api``: the endpoint of ``openai``."""
    return get_backend(backend).load(spec, dtype=dtype, device=device, world=world, api=api)
