"""The transformers backend (``--backend hf``, the default): ``models.load_model`` plus llmcal's scoring engine.

The weights are loaded on first use (``load_model(..., lazy=True)``): the tokenizer, device and dtype
are known at once, so a run whose scores all come from the scoring cache never loads the model.
Under a launcher each process takes its own GPU, or its share of the CPU cores.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterable, Sequence

from ..distributed import World
from ..models import LoadedModel, ModelSpec, load_model, resolve_device
from .base import Backend, register_backend

log = logging.getLogger(__name__)


@register_backend("hf")
class HfBackend(Backend):
    """transformers models on this machine, scored by ``llmcal.scoring.score``."""

    def open(self, spec: ModelSpec, *, dtype: str, device: str, world: World, api: Any) -> LoadedModel:
        dev = resolve_device(device)
        if world.distributed:
            if dev == "cuda":
                dev = f"cuda:{world.local_rank}"
            elif dev == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
                _share_cpu_threads()
        return load_model(spec, dtype=dtype, device=dev, lazy=True)

    def score(self, loaded: LoadedModel, encoded: Sequence[Any], *, options: Any, done: Iterable[str] = (),
              on_batch: Callable | None = None) -> list:
        from ..scoring import score

        return score(loaded.model, loaded.tokenizer, encoded, options=options, done=done, on_batch=on_batch)


def _share_cpu_threads() -> None:
    """Split the machine's cores between the processes on it (launchers that do not set OMP_NUM_THREADS)."""
    import torch

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    n = max(1, (os.cpu_count() or 1) // max(1, local))
    log.info("%d processes on this machine: %d torch threads each", local, n)
    torch.set_num_threads(n)
