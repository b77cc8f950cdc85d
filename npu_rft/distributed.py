"""Process-group set-up for torchrun, and the few collectives the trainer needs.

Launch with ``torchrun --nproc-per-node N -m npu_rft train ...``: torchrun sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
With ``WORLD_SIZE`` unset or 1 everything here is a single-process no-op, so the
same code runs with and without torchrun. The backend comes from the
:class:`~npu_rft.device.Device` (hccl, nccl or gloo).
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, List, Optional, Union

import torch
import torch.distributed as dist

from npu_rft.device import Device

logger = logging.getLogger(__name__)

# The device of the process group created by init_distributed: collectives put
# float inputs there (hccl and nccl reduce device tensors only).
_group_device: Optional[Device] = None


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    is_main: bool          # rank == 0: logging, checkpoints
    owns_group: bool = False  # init_distributed made the process group: its caller destroys it (destroy)


def _env_int(name: str, default: Optional[int] = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise RuntimeError(
                f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but {name} is not set; "
                f"fix: launch with torchrun, which sets RANK, LOCAL_RANK and WORLD_SIZE"
            )
        return default
    return int(value)


def init_distributed(device: Device, timeout_minutes: float = 30.0,
                     single_process_group: bool = False) -> DistInfo:
    """Join the torchrun process group when ``WORLD_SIZE > 1``; otherwise do
    nothing, or with ``single_process_group`` (FSDP2 needs a group even alone)
    make a group of this one process.

    Makes ``device`` the current device first (hccl/nccl bind a process to one
    device), then ``init_process_group(device.dist_backend, init_method="env://")``.
    A group that already exists (the caller's) is used as it is: ``owns_group``
    is True only for a group made here, which the caller destroys when done
    (``destroy``); a pre-existing one is left to whoever made it.
    """
    global _group_device
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        if single_process_group and not dist.is_initialized():
            device.set_current()
            dist.init_process_group(backend=device.dist_backend, store=dist.HashStore(), rank=0, world_size=1)
            _group_device = device
            return DistInfo(rank=0, world_size=1, local_rank=0, is_main=True, owns_group=True)
        return DistInfo(rank=0, world_size=1, local_rank=0, is_main=True)
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if device.index != local_rank and device.count > 1:
        logger.warning("rank %d uses %s index %d but LOCAL_RANK=%d", rank, device.type, device.index, local_rank)
    owns_group = not dist.is_initialized()
    if owns_group:
        device.set_current()
        dist.init_process_group(
            backend=device.dist_backend,
            init_method="env://",
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
        logger.info("process group: backend=%s world_size=%d", device.dist_backend, world_size)
    _group_device = device
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, is_main=rank == 0, owns_group=owns_group)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


# What HCCL's all-reduce, reduce and reduce-scatter accept (ProcessGroupHCCL's
# checkSupportedDataType): float64 only from Ascend950 on, no bool, no unsigned.
# Every reduction here uses one of these, so the same code runs on gloo, NCCL
# and HCCL; tests run the multi-process suite under a guard that refuses the rest.
HCCL_REDUCE_DTYPES = frozenset({
    torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32, torch.bfloat16,
})


def check_reducible(tensor: torch.Tensor, op: str = "all_reduce") -> None:
    """Raise if ``tensor``'s dtype is one HCCL cannot reduce (see ``HCCL_REDUCE_DTYPES``)."""
    if tensor.dtype not in HCCL_REDUCE_DTYPES:
        raise TypeError(
            f"{op} of a {tensor.dtype} tensor: HCCL reduces only "
            f"{', '.join(sorted(str(d).replace('torch.', '') for d in HCCL_REDUCE_DTYPES))}; "
            f"fix: reduce counts as int64 and sums as float32"
        )


def _group_torch_device() -> torch.device:
    return _group_device.torch_device if _group_device is not None else torch.device("cpu")


def all_reduce_sum(value: Union[torch.Tensor, float]) -> Union[torch.Tensor, float]:
    """The sum of ``value`` over all ranks.

    A tensor (of a dtype HCCL reduces) is reduced in place and returned. A float
    is summed as float32 on the group's device and comes back as a float; use
    :func:`all_reduce_count` for counts, which float32 rounds above 2**24.
    Without a process group, ``value`` comes back unchanged.
    """
    if isinstance(value, torch.Tensor):
        check_reducible(value)
        if _active():
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value
    if not _active():
        return value
    tensor = torch.tensor(float(value), dtype=torch.float32, device=_group_torch_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item())


def all_reduce_count(value: int) -> int:
    """The sum of an integer count over all ranks, exact (int64)."""
    if int(value) != value:
        raise ValueError(f"all_reduce_count takes an integer count, got {value!r}")
    if not _active():
        return int(value)
    tensor = torch.tensor(int(value), dtype=torch.int64, device=_group_torch_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return int(tensor.item())


def all_gather_object(obj: Any) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects); ``[obj]`` without a process group."""
    if not _active():
        return [obj]
    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if _active():
        dist.barrier()


def destroy() -> None:
    """Destroy the process group (at the end of a run whose ``init_distributed`` made it: ``owns_group``)."""
    global _group_device
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _group_device = None
