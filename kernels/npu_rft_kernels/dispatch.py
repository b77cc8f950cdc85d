"""Backend choice for the kernels: the one module in ``npu_rft_kernels`` that
asks which device a tensor lives on and whether triton or torch_npu's fused
op is present (torch_npu through ``torch_npu_api``, the one module that calls it).

Backends are listed in ``LOGPROB_BACKENDS`` (name -> :class:`Backend`):

* ``naive``  - materialised logits, the specification; never chosen by ``auto``.
* ``torch``  - the vocab-tiled PyTorch implementation; runs anywhere.
* ``triton`` - the tiled algorithm with fused Triton kernels; CUDA tensors, NPU
  tensors where triton-ascend is installed (never run on an NPU yet), or CPU
  tensors under ``TRITON_INTERPRET=1`` (tests).
* ``npu``    - Ascend: torch_npu's fused linear online max/sum where it fits,
  the tiled path otherwise.

``auto`` goes by the tensor's device: cpu -> torch; cuda -> triton if it is
installed, else torch; npu -> npu; anything else -> torch. It logs its choice
once per device type. A named backend that cannot run on the given tensor
raises ``BackendUnavailableError`` listing the ones that can.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Set

import torch

from npu_rft_kernels import chips, torch_npu_api

logger = logging.getLogger(__name__)


class BackendUnavailableError(RuntimeError):
    """A backend was requested by name but cannot run on these tensors."""


class UnknownBackendError(KeyError):
    """A backend name that is not registered; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it plain
        return str(self.args[0])


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # under npu_rft_kernels, imported when first used
    function: str
    unavailable: Callable[[torch.Tensor], Optional[str]]  # why it cannot run on this tensor, or None


def _runs_anywhere(tensor: torch.Tensor) -> Optional[str]:
    return None


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def triton_ascend_installed() -> bool:
    """triton-ascend (Triton for Ascend NPUs) is installed: it replaces community triton."""
    try:
        importlib.metadata.distribution("triton-ascend")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _triton_unavailable(tensor: torch.Tensor) -> Optional[str]:
    if not triton_installed():
        return "triton is not installed (pip install 'npu-rft[triton]'; on Ascend, triton-ascend)"
    if tensor.device.type == "cuda":
        return None
    if tensor.device.type == "npu":
        return None if triton_ascend_installed() else "NPU tensors need triton-ascend, and this triton is not it"
    if tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (f"triton needs CUDA tensors, NPU tensors with triton-ascend, or CPU tensors with TRITON_INTERPRET=1; "
            f"got {tensor.device.type}")


def _npu_unavailable(tensor: torch.Tensor) -> Optional[str]:
    if tensor.device.type != "npu":
        return f"the npu backend needs Ascend NPU tensors, got {tensor.device.type}"
    return None


LOGPROB_BACKENDS: Dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("naive", "logprob.naive", "naive_logprob", _runs_anywhere),
        Backend("torch", "logprob.torch_chunked", "torch_logprob", _runs_anywhere),
        Backend("triton", "logprob.triton", "triton_logprob", _triton_unavailable),
        Backend("npu", "logprob.npu", "npu_logprob", _npu_unavailable),
    )
}


def get_backend(name: str) -> Backend:
    """The registered backend ``name``; :class:`UnknownBackendError` lists the known ones."""
    try:
        return LOGPROB_BACKENDS[name]
    except KeyError:
        raise UnknownBackendError(
            f"unknown logprob backend {name!r}; known logprob backends: {', '.join(sorted(LOGPROB_BACKENDS))}"
        ) from None

_logged_auto: Set[str] = set()

TILE_BYTES_ENV = "NPU_RFT_KERNELS_TILE_BYTES"
# CPU: tiles of a few MiB keep the elementwise passes in cache, but each torch
# op is an OpenMP parallel region, and on a loaded machine every region can
# wait a scheduler time slice for a descheduled thread (the generic path's
# 32 MiB tiles were about 2x faster than 8 MiB ones there). The fast fp32
# path (logprob/shifted.py) has two elementwise ops per tile and allocates
# each tile afresh: 16 MiB tiles stay below glibc's 32 MiB mmap threshold,
# so they are reused instead of page-faulted in again (docs/kernels.md).
# Accelerators need big tiles to amortise kernel launches.
CPU_TILE_BYTES = 16 * 2**20
ACCELERATOR_TILE_BYTES = 256 * 2**20


def tile_budget(tensor: torch.Tensor, tile_bytes: Optional[int] = None) -> int:
    """The tiled backends' memory budget in bytes: ``tile_bytes`` if given, else
    $NPU_RFT_KERNELS_TILE_BYTES, else ``CPU_TILE_BYTES`` for CPU tensors and
    ``ACCELERATOR_TILE_BYTES`` otherwise. 0 asks for no logits tile at all:
    the ``triton`` backend's streaming kernels (the other backends refuse it)."""
    if tile_bytes is None:
        raw = os.environ.get(TILE_BYTES_ENV)
        if raw is None:
            return CPU_TILE_BYTES if tensor.device.type == "cpu" else ACCELERATOR_TILE_BYTES
        try:
            tile_bytes = int(raw)
        except ValueError:
            raise ValueError(f"{TILE_BYTES_ENV}={raw!r} is not an integer; set a byte count such as 33554432") from None
    if tile_bytes < 0:
        raise ValueError(f"tile_bytes={tile_bytes} must be positive, or 0 for the triton backend's streaming mode")
    return tile_bytes


def available_backends(tensor: torch.Tensor) -> List[str]:
    """Names of the backends that can run on ``tensor``'s device here."""
    return [n for n in sorted(LOGPROB_BACKENDS) if LOGPROB_BACKENDS[n].unavailable(tensor) is None]


def auto_backend(tensor: torch.Tensor) -> str:
    """The backend ``auto`` picks for ``tensor``'s device (see the module docstring)."""
    device = tensor.device.type
    if device == "cuda" and triton_installed():
        return "triton"
    if device == "npu":
        return "npu"
    return "torch"


def resolve_logprob(backend: str, tensor: torch.Tensor) -> Callable:
    """The log-prob implementation for ``backend`` (a name or ``auto``) on ``tensor``'s device."""
    if backend == "auto":
        name = auto_backend(tensor)
        if tensor.device.type not in _logged_auto:
            _logged_auto.add(tensor.device.type)
            logger.info("fused_logprob: backend 'auto' chose %r for %s tensors", name, tensor.device.type)
    else:
        name = backend
        why = get_backend(name).unavailable(tensor)
        if why is not None:
            raise BackendUnavailableError(
                f"logprob backend {name!r} cannot run here: {why}; available here: "
                f"{', '.join(available_backends(tensor))}; pass one of those or backend='auto'"
            )
    entry = get_backend(name)
    fn = getattr(importlib.import_module(f"npu_rft_kernels.{entry.module}"), entry.function)
    if name == "npu":
        fn = functools.partial(fn, online_max_sum=npu_online_max_sum(tensor))
    return fn


def npu_online_max_sum(tensor: torch.Tensor) -> Optional[Callable]:
    """``torch_npu_api.online_max_sum`` (torch_npu's
    ``npu_fused_linear_online_max_sum``, its max and sum-exp outputs) when this
    torch_npu has the op and the chip table (``chips``) says the chip runs it
    (Atlas A2/A3), else None. Unverified on hardware."""
    return None if npu_online_max_sum_problem(tensor) else torch_npu_api.online_max_sum


def npu_online_max_sum_problem(tensor: torch.Tensor) -> Optional[str]:
    """Why the fused op does not serve ``tensor``'s NPU, or None."""
    if not torch_npu_api.has_online_max_sum():
        return "this torch_npu has no npu_fused_linear_online_max_sum"
    name = torch_npu_api.npu.get_device_name(tensor.device.index or 0)
    if not chips.capability(name, "online_max_sum"):
        return f"the chip {name} does not run npu_fused_linear_online_max_sum (Atlas A2/A3 do)"
    return None
