"""Scoring backends: ``hf`` (transformers + llmcal's scoring engine, the default), ``vllm`` and ``openai``.

A backend loads a model into a ``LoadedModel``; ``llmcal.pipeline.score_loaded``
scores with it.  The transformers backend is ``models.load_model`` plus
``scoring.score``.  The vLLM backend (``backends.vllm``) puts its engine in
``LoadedModel.extra["engine"]``; it is imported only when asked for, so
everything else works without vLLM installed.  The openai backend
(``backends.openai``) scores a model served behind an OpenAI-compatible
endpoint; its engine also encodes the questions (``engine.encode``), since
there is no local tokenizer.
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from ..distributed import World
from ..errors import LlmcalError
from ..models import LoadedModel, ModelSpec, load_model, resolve_device

if TYPE_CHECKING:
    from .openai import ApiSettings

log = logging.getLogger(__name__)

BACKENDS = ("hf", "vllm", "openai")


def check_backend(name: str) -> None:
    """Fail early (before a run directory is touched) for an unknown or unavailable backend."""
    if name not in BACKENDS:
        raise LlmcalError(f"unknown --backend {name!r}; choose {', '.join(BACKENDS[:-1])} or {BACKENDS[-1]}")
    if name == "openai":
        import importlib.util

        if importlib.util.find_spec("httpx") is None:
            raise LlmcalError("--backend openai needs the httpx package: pip install httpx")
    if name == "vllm":
        from .vllm import require_vllm

        require_vllm()


def load_for_backend(spec: ModelSpec, *, backend: str = "hf", dtype: str = "auto", device: str = "auto",
                     world: World | None = None, api: "ApiSettings | None" = None) -> LoadedModel:
    """Load ``spec`` for scoring in this process (one of ``world``'s ranks); ``api``: the endpoint of ``openai``."""
    check_backend(backend)
    world = world or World()
    if backend == "openai":
        if world.distributed:
            raise LlmcalError("--backend openai runs as one process (--concurrency sets the requests in flight); "
                              "start it without torchrun/accelerate launch")
        if api is None:
            raise LlmcalError("--backend openai needs --base-url (the endpoint, e.g. http://127.0.0.1:8000/v1)")
        from .openai import load_openai

        return load_openai(api)
    if backend == "vllm":
        if world.distributed:
            raise LlmcalError("--backend vllm runs as one process (vLLM shards a model over GPUs itself); "
                              "start it without torchrun/accelerate launch")
        from .vllm import load_vllm

        return load_vllm(spec, dtype=dtype, device=device)
    dev = resolve_device(device)
    if world.distributed:
        if dev == "cuda":
            dev = f"cuda:{world.local_rank}"
        elif dev == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
            _share_cpu_threads()
    return load_model(spec, dtype=dtype, device=dev)


def _share_cpu_threads() -> None:
    """Split the machine's cores between the processes on it (launchers that do not set OMP_NUM_THREADS)."""
    import torch

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    n = max(1, (os.cpu_count() or 1) // max(1, local))
    log.info("%d processes on this machine: %d torch threads each", local, n)
    torch.set_num_threads(n)
