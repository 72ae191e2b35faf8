"""Process groups for sharded evaluation and training: accelerate's state plus the collectives llmcal needs.

A launcher (``torchrun``, ``python -m torch.distributed.run`` or ``accelerate
launch``) starts one process per shard and tells each its place through the
environment: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``.  Without those variables everything here is a no-op for a
single process, so library code can call these helpers unconditionally.

Joining the group is accelerate's ``PartialState`` (the state the Trainer uses
too), so the backend is gloo on CPU and nccl on CUDA.  What accelerate does not
offer is written here: error propagation across ranks (``collective``,
``on_main``: one rank's failure fails every rank with its message instead of a
hang), and ``all_reduce_numpy``, which sums (or maxes) numpy arrays across
processes: the reduction that binned metrics' sufficient statistics and RCFT's
E-step counts need.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import numpy as np

from .errors import LlmcalError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """Where this process stands: rank among world_size processes, local_rank on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError as e:
        raise LlmcalError(f"environment variable {name}={v!r} is not an integer") from e


def world_from_env() -> World:
    """Rank, world size and local rank as the launcher set them (a single process when unset)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise LlmcalError(f"RANK={rank} and WORLD_SIZE={world} from the environment do not make sense")
    return World(rank=rank, world_size=world, local_rank=local)


def is_initialized() -> bool:
    import sys

    if "torch.distributed" not in sys.modules:  # nothing imported it, so no group is up (and importing torch
        return False                            # at interpreter exit, from the atexit hook, is slow and noisy)
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def current_world() -> World:
    """The running process group's rank and size if one is up, else what the environment says."""
    if is_initialized():
        import torch.distributed as dist

        return World(rank=dist.get_rank(), world_size=dist.get_world_size(),
                     local_rank=_env_int("LOCAL_RANK", dist.get_rank()))
    return world_from_env()


def init(device: str = "cpu", *, timeout_s: float = 1800.0) -> bool:
    """Join the process group the launcher prepared; True when this call created it.

    Does nothing (returns False) for a single process or when a group is already
    up (for example one that accelerate or a Trainer created).  The group is
    accelerate's ``PartialState``, the same state the Trainer uses: it reads the
    launcher's environment, picks the backend (gloo on CPU, nccl on CUDA), binds
    each rank to its GPU, and splits a machine's cores between its processes
    when ``OMP_NUM_THREADS`` is unset.
    """
    w = world_from_env()
    if not w.distributed or is_initialized():
        return False
    import torch.distributed as dist

    if not dist.is_available():
        raise LlmcalError("this torch build has no torch.distributed; run a single process")
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(var):
            raise LlmcalError(f"WORLD_SIZE={w.world_size} but {var} is not set; start the processes with "
                              f"torchrun or accelerate launch")
    from accelerate import PartialState

    cpu = not str(device).startswith("cuda")
    state = PartialState(cpu=cpu, timeout=datetime.timedelta(seconds=timeout_s))
    if not dist.is_initialized():  # a state left from an earlier group in this process: start afresh
        _reset_accelerate_state()
        state = PartialState(cpu=cpu, timeout=datetime.timedelta(seconds=timeout_s))
    log.info("joined process group: rank %d of %d (%s)", state.process_index, state.num_processes, state.backend)
    return True


def _reset_accelerate_state() -> None:
    # accelerate keeps its state in a process-wide singleton; after the group is destroyed it must be
    # forgotten, or the next PartialState() would report a group that no longer exists.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def shutdown() -> None:
    if is_initialized():
        import torch.distributed as dist

        dist.destroy_process_group()
        _reset_accelerate_state()


def _shutdown_at_exit() -> None:
    # A gloo group left alive at interpreter exit (Trainer/accelerate create one and
    # never destroy it) can abort the process ("terminate called without an active
    # exception") after all the work is done; leave the group before Python tears down.
    try:
        shutdown()
    except Exception:  # pragma: no cover - best effort at exit
        pass


atexit.register(_shutdown_at_exit)


@contextlib.contextmanager
def process_group(device: str = "cpu") -> Iterator[World]:
    """Join the launcher's process group for the block (and leave it if we created it)."""
    created = init(device)
    try:
        yield current_world()
    finally:
        if created:
            shutdown()


def barrier() -> None:
    if is_initialized():
        import torch.distributed as dist

        dist.barrier()


def _reduce_device() -> str:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        import torch

        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


def all_reduce_numpy(array: Any, op: str = "sum") -> np.ndarray:
    """Reduce a numpy array element-wise across processes (sum, max or min); a copy for one process.

    Integer arrays are reduced as int64 and floating ones as float64, so counts
    stay exact and sums do not lose precision.
    """
    a = np.asarray(array)
    if not is_initialized():
        return a.copy()
    import torch
    import torch.distributed as dist

    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise LlmcalError(f"all_reduce_numpy: unknown op {op!r}; choose sum, max or min")
    if a.dtype.kind in "biu":
        work = np.ascontiguousarray(a, dtype=np.int64)
    elif a.dtype.kind == "f":
        work = np.ascontiguousarray(a, dtype=np.float64)
    else:
        raise LlmcalError(f"all_reduce_numpy: cannot reduce an array of dtype {a.dtype}")
    t = torch.from_numpy(work.copy()).to(_reduce_device())
    dist.all_reduce(t, op=ops[op])
    out = t.cpu().numpy()
    return out.astype(a.dtype) if a.dtype.kind == "b" else out


def all_gather_objects(obj: Any) -> list:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` for one process."""
    if not is_initialized():
        return [obj]
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process."""
    if not is_initialized():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def collective(fn: Callable[[], T], what: str = "the step") -> T:
    """Run ``fn`` on every process; if any process fails, every process raises.

    Without this, one rank's error leaves the others waiting at the next
    collective until the launcher's timeout.  The failing rank re-raises its own
    exception; the others raise LlmcalError naming the rank and its message.
    """
    err: BaseException | None = None
    result: Any = None
    try:
        result = fn()
    except Exception as e:  # reported to the other ranks, then re-raised below
        err = e
    if not is_initialized():
        if err is not None:
            raise err
        return result
    msgs = all_gather_objects(None if err is None else f"{type(err).__name__}: {err}")
    if err is not None:
        raise err
    failed = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if failed:
        r, m = failed[0]
        raise LlmcalError(f"{what} failed on rank {r} of {len(msgs)}: {m}")
    return result


def on_main(fn: Callable[[], T], what: str = "the step") -> T | None:
    """Run ``fn`` on rank 0 only; the others wait, and raise LlmcalError if it failed there.

    Returns ``fn()``'s result on rank 0 and None elsewhere.
    """
    w = current_world()
    if not is_initialized():
        return fn()
    err: BaseException | None = None
    result = None
    if w.is_main:
        try:
            result = fn()
        except Exception as e:
            err = e
    msg = broadcast_object(None if err is None else f"{type(err).__name__}: {err}", src=0)
    if err is not None:
        raise err
    if msg is not None:
        raise LlmcalError(f"{what} failed on rank 0: {msg}" if not msg.startswith("LlmcalError: ")
                          else msg[len("LlmcalError: "):])
    return result
