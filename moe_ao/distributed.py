"""torch.distributed for moe_ao: which rank does which unit, and gathering what they computed.

moe_ao never starts processes itself: ``torchrun --nproc-per-node N moe-ao ...`` (or any
launcher that sets ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR``) does, and
:func:`init_from_env` joins the group (gloo on CPU, nccl on CUDA) with a timeout, so a
rank that dies makes the others fail with an error naming the collective instead of
waiting forever. Without a process group every function here is the single-process
identity: ``world() == (0, 1)``, :func:`mine` keeps everything, :func:`gather_dict`
returns its argument.

Work is split by unit, round-robin over a list every rank builds in the same order, and
each rank computes its units exactly as a single process would; the results are
gathered as Python objects (tensors included) and merged in unit order, so a
distributed run gives bit-identical results to a single process. GPTQ can also split
its calibration batches (``GPTQConfig(split_calibration=True)``): statistics are then
summed over ranks with :func:`sum_over_ranks`, which gives every rank the same bits and
is reproducible, but is not the single process's summation order (see
``moe_ao.quant.gptq_driver``).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 600.0


class DistributedError(RuntimeError):
    """A collective failed or timed out (typically: another rank died)."""


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(timeout_s: float | None = None) -> bool:
    """Joins the process group a launcher describes in the environment (``WORLD_SIZE`` > 1).

    Args:
        timeout_s: seconds any collective may wait for the other ranks (default
            ``MOE_AO_DIST_TIMEOUT`` or 600).

    Returns:
        True when this process is now (or already was) one rank of several.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if dist.is_initialized():
        return True
    timeout = timeout_s if timeout_s is not None else float(os.environ.get("MOE_AO_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    logger.info("rank %d of %d (%s, timeout %.0f s)", dist.get_rank(), dist.get_world_size(), backend, timeout)
    return True


def is_writer() -> bool:
    """True on the rank that writes files (rank 0, or the only process)."""
    return world()[0] == 0


def mine(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: every world-size-th one, starting at its rank."""
    rank, size = world()
    return list(items[rank::size])


def gather_dict(part: dict[str, Any], what: str) -> dict[str, Any]:
    """The union of every rank's ``part`` (disjoint keys), on every rank.

    Args:
        part: this rank's results (tensors are moved to CPU for the exchange).
        what: what is gathered, for the error message.

    Raises:
        DistributedError: a collective failed or timed out (another rank died or
            stopped), naming ``what``.
    """
    if world()[1] == 1:
        return part
    out: dict[str, Any] = {}
    for p in gather_objects(part, what):
        out.update(p)
    return out


def sum_over_ranks(t: torch.Tensor, what: str) -> torch.Tensor:
    """The sum of every rank's ``t`` (same shape and dtype on each), on every rank.

    One ``all_reduce``: no rank holds more than its own copy. The collective reduces each
    element once and hands that value to every rank, so all ranks get the same bits, and a
    rerun with the same world size and backend gets them again; the order of the additions
    is the backend's, not one process's sequential order.

    Raises:
        DistributedError: the collective failed or timed out, naming ``what``.
    """
    rank, size = world()
    if size == 1:
        return t
    out = t.contiguous().clone()
    try:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    except (RuntimeError, dist.DistBackendError) as e:
        raise DistributedError(f"rank {rank}: summing {what} over {size} ranks failed ({e}); another rank"
                               f" probably died or timed out") from e
    return out


def gather_objects(obj: T, what: str) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` without a process group).

    Raises:
        DistributedError: the collective failed or timed out, naming ``what``.
    """
    rank, size = world()
    if size == 1:
        return [obj]
    parts: list[Any] = [None] * size
    try:
        dist.all_gather_object(parts, _to_cpu(obj))  # tensors go to CPU for the exchange
    except (RuntimeError, dist.DistBackendError) as e:  # gloo/nccl report a dead peer or a timeout this way
        raise DistributedError(f"rank {rank}: gathering {what} from {size} ranks failed ({e}); another rank"
                               f" probably died or timed out") from e
    return parts


def broadcast_object(obj: T, what: str) -> T:
    """Rank 0's ``obj`` on every rank (``obj`` itself without a process group).

    Raises:
        DistributedError: the broadcast failed or timed out, naming ``what``.
    """
    rank, size = world()
    if size == 1:
        return obj
    box = [obj if rank == 0 else None]
    try:
        dist.broadcast_object_list(box, src=0)
    except (RuntimeError, dist.DistBackendError) as e:
        raise DistributedError(f"rank {rank}: receiving {what} from rank 0 failed ({e})") from e
    return box[0]


def barrier(what: str) -> None:
    """Waits for every rank; raises DistributedError naming ``what`` when one never comes."""
    rank, size = world()
    if size == 1:
        return
    try:
        dist.barrier()
    except (RuntimeError, dist.DistBackendError) as e:
        raise DistributedError(f"rank {rank}: waiting for {size} ranks at {what} failed ({e})") from e


def _to_cpu(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.cpu()
    if isinstance(v, dict):
        return {k: _to_cpu(x) for k, x in v.items()}
    if type(v) in (list, tuple):  # the calibration hidden states and their layer kwargs
        return type(v)(_to_cpu(x) for x in v)
    if hasattr(v, "__dataclass_fields__"):
        return type(v)(**{k: _to_cpu(getattr(v, k)) for k in v.__dataclass_fields__})
    return v
