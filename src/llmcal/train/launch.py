"""Training on every core: ``run_finetune`` in N data-parallel processes that llmcal starts itself.

On a CPU, one PyTorch process does not use two cores well: a LoRA step of a
1.5B model is a long chain of small matmuls whose second thread mostly waits.
Two processes of one thread each, data-parallel over gloo, keep both busy (the
speedup is measured by ``bench/bench_train.py --processes 2``).  The processes
are started with torch's own launcher (``torch.distributed.launcher.api
.elastic_launch``, what ``torchrun`` runs), so every rank joins the group
exactly as under torchrun on one machine.

``--batch-size`` stays the number of questions per optimiser step: each of N
processes takes ``batch_size / N`` of them.  accelerate hands rank r the
batches r, r + N, ... of the same seeded sampler, and DDP averages their
gradients, so the optimiser sees the batches and the mean loss that one process
with the whole batch would see (tested: the same losses within bf16 noise).
What a user launches with ``torchrun`` is left alone: there ``--batch-size`` is
per process, as before.
"""
from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from ..errors import LlmcalError

log = logging.getLogger(__name__)

# Set in the processes llmcal starts: their number, so training_args splits --batch-size between them.
LAUNCHED_ENV = "LLMCAL_LAUNCHED_PROCESSES"


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def under_launcher() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def resolve_processes(processes: int | str, batch_size: int, device: str) -> int:
    """How many processes ``run_finetune`` starts: ``auto`` is 2 on a CPU with 2+ cores and an even batch."""
    if under_launcher():
        return 1  # the user's launcher already decided
    if processes != "auto":
        return int(processes)
    import torch

    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if on_cpu and cpu_cores() >= 2 and batch_size % 2 == 0:
        return 2
    return 1


def per_process_batch(batch_size: int) -> int:
    """``--batch-size`` for this process: the whole batch, or its share in a group llmcal started."""
    n = int(os.environ.get(LAUNCHED_ENV, "1") or 1)
    return batch_size // n if n > 1 else batch_size


def _worker(cfg, out: str, overwrite: bool, progress: bool) -> str | None:
    """One rank: the ordinary ``run_finetune``; an LlmcalError comes back as its message (every rank fails
    with the failing rank's message: ``distributed.collective``)."""
    from .run import run_finetune

    rank = int(os.environ.get("RANK", "0"))
    try:
        run_finetune(cfg, out, overwrite=overwrite, progress=progress and rank == 0)
    except LlmcalError as e:
        return str(e)
    return None


def _prepare_weights(cfg) -> None:
    """Convert a GGUF model's cache once, here, before the processes start: each would otherwise convert it
    at the same moment (twice the work and twice the conversion's memory)."""
    from ..models import dtype_name, resolve_device, resolve_dtype, resolve_model, tokenizer_dir, weights_dir
    from .model import base_spec, resolve_train_dtype

    spec = base_spec(resolve_model(cfg.model, gguf_file=cfg.gguf_file, base=cfg.base))
    if spec.kind != "gguf":
        return
    device = resolve_device(cfg.device)
    tokenizer_dir(spec)
    weights_dir(spec, dtype_name(resolve_dtype(resolve_train_dtype(cfg, device), device)))


def launch_finetune(cfg, out: str | Path, *, processes: int, overwrite: bool, progress: bool):
    """Run ``run_finetune(cfg, out)`` in ``processes`` processes on this machine; the finished run's record."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from ..runs import load_run

    _prepare_weights(cfg)
    threads = max(1, cpu_cores() // processes)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                          monitor_interval=0.2, start_method="spawn")
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", LAUNCHED_ENV, "TOKENIZERS_PARALLELISM")}
    os.environ.update({"OMP_NUM_THREADS": str(threads), LAUNCHED_ENV: str(processes),
                       "TOKENIZERS_PARALLELISM": "false"})  # the children inherit the environment
    log.info("training in %d processes of %d threads each", processes, threads)
    try:
        results = elastic_launch(config, _worker)(cfg, str(out), overwrite, progress)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        raise LlmcalError(f"training process {rank} of {processes} failed (exit code {failure.exitcode}): "
                          f"{failure.message or 'see its output above'}") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    errors = [m for m in results.values() if m]
    if errors:
        raise LlmcalError(errors[0])
    return load_run(out)
