"""Per-device-type choices, in one object each: ``Device.hardware``.

Generic modules (rollout, model, trainer, algorithms) never test the device
type; they ask the device's hardware object instead:

* ``decode_sync_every``: how often the decode loop reads its finished flags on
  the host. ``None`` (CPU): every token, dropping finished rows from the batch
  at once, which saves their compute, and a host read costs nothing there. On
  NPU and CUDA every host read stalls the device queue, so lengths and
  finished flags stay on the device and the loop checks for completion every
  32 tokens: at most ``max_new_tokens / 32`` reads plus a constant per rollout.
* ``decode_head(weight, decoder)``: a context that yields the decode step's
  head product (``hidden [rows, H] -> fp32 logits [rows, V]``). CPU in fp32:
  oneDNN's linear with weights packed once per rollout (``npu_rft.cpu``);
  accelerators: ``(W @ h^T)^T`` (``head_logits``).
* ``setup_process()``: what a process does once it has chosen the device (CPU:
  bound oneDNN's caches; NPU, right after ``set_device``: operators from CANN's
  precompiled binaries, ``torch_npu.npu.set_compile_mode(jit_compile=False)``,
  instead of compiling each operator for every new shape, which RFT's changing
  shapes would do every step).
* ``apply_fused_ops(model, device, names)``: ``model.npu_fused_ops``; only the
  NPU has them (``npu_rft.ascend.fused_ops``), elsewhere a log line says why not.
* ``ddp_device_ids(device)``: what DDP takes as ``device_ids``.
* ``entropy_sample_tokens``: where GRPO's logged entropy comes from. ``None``:
  from the loss's own log-prob pass (CPU, CUDA: the tiled kernels give it for
  little extra). NPU: torch_npu's fused log-prob op gives no entropy, so the
  loss asks for none (and so reaches the op) and the entropy is computed
  without gradient on the first rows of each micro-batch, about this many
  tokens.
* ``engine_sleep``: whether a rollout engine may free its memory between
  rollouts (vLLM's sleep mode needs an accelerator's memory allocator; vLLM on
  CPU refuses it).

The CPU-specific code lives in ``npu_rft.cpu``, imported only from here.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Callable, ContextManager, List, Optional, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Completion checks of the decode loop on accelerators, in tokens.
ACCELERATOR_DECODE_SYNC_EVERY = 32


def head_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Logits ``hidden @ weight^T`` as a contiguous fp32 ``[rows, V]`` tensor,
    computed as ``(weight @ hidden^T)^T``: BLAS runs this skinny form about
    twice as fast for a few rows (docs/performance.md); the transpose back is one copy."""
    return torch.mm(weight, hidden.t()).t().contiguous().float()


class Hardware:
    """Accelerator defaults (CUDA, NPU); ``CpuHardware`` overrides what the CPU does differently."""

    type = "accelerator"
    decode_sync_every: Optional[int] = ACCELERATOR_DECODE_SYNC_EVERY
    entropy_sample_tokens: Optional[int] = None
    engine_sleep = True
    pin_memory = True  # host buffers of FSDP2's CPU offload are pinned (page-locked) for faster copies

    def decode_head(self, weight: torch.Tensor, decoder: nn.Module) -> ContextManager[Callable[[torch.Tensor], torch.Tensor]]:
        return contextlib.nullcontext(functools.partial(head_logits, weight=weight))

    def setup_process(self) -> None:
        """Once per process, after the device is chosen."""

    def apply_fused_ops(self, model: nn.Module, device: Any, names: Sequence[str]) -> None:
        if names:
            logger.info("model.npu_fused_ops %s: not applied, the device is %s, not an Ascend NPU", list(names), self.type)

    def ddp_device_ids(self, device: Any) -> Optional[List[int]]:
        return [device.index]


class CudaHardware(Hardware):
    type = "cuda"


class NpuHardware(Hardware):
    type = "npu"
    entropy_sample_tokens = 1024

    def setup_process(self) -> None:
        from npu_rft_kernels import torch_npu_api

        torch_npu_api.npu.set_compile_mode(jit_compile=False)

    def apply_fused_ops(self, model: nn.Module, device: Any, names: Sequence[str]) -> None:
        from npu_rft.ascend.fused_ops import apply_configured

        apply_configured(model, device, names)


class CpuHardware(Hardware):
    type = "cpu"
    decode_sync_every = None  # every token: finished rows leave the batch at once
    engine_sleep = False
    pin_memory = False  # pinning needs an accelerator

    def decode_head(self, weight: torch.Tensor, decoder: nn.Module) -> ContextManager[Callable[[torch.Tensor], torch.Tensor]]:
        from npu_rft import cpu

        return cpu.packed_decode(weight, decoder)

    def setup_process(self) -> None:
        from npu_rft import cpu

        cpu.bound_onednn_caches()

    def ddp_device_ids(self, device: Any) -> Optional[List[int]]:
        return None


HARDWARE = {"cpu": CpuHardware(), "cuda": CudaHardware(), "npu": NpuHardware()}


def hardware_for(device_type: str) -> Hardware:
    """The :class:`Hardware` of a device type (``cpu``, ``cuda``, ``npu``)."""
    try:
        return HARDWARE[device_type]
    except KeyError:
        raise ValueError(f"no hardware profile for device type {device_type!r}; known: {', '.join(HARDWARE)}") from None
