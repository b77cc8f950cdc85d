"""What npu-rft does differently on a CPU, reached only through
``npu_rft.hardware.CpuHardware`` (generic modules import nothing from here).

* **Packed decode GEMMs.** On CPU in fp32, the decode loop's head and the
  decoder's linears run oneDNN's linear with their weights packed once per
  rollout: with the few rows of a decode step it ran 25-40% faster than
  ``F.linear`` (MLP projections) and 3x faster than ``(W @ h^T)^T`` (a head of
  8,000 x 256), see docs/performance.md. The packed copies live for the
  rollout, so they share a budget of ``PACK_MAX_BYTES`` (64 MiB): the head
  first, then the decoder's linears in order while the budget lasts, so a
  bigger model packs only part of its decoder instead of doubling its weights'
  memory during sampling. A head over the budget keeps ``(W @ h^T)^T``, and
  then nothing is packed: its GEMM dominates each decode step, and at
  V = 151,936 packing the decoder beside it saved 2% of the rollout (1.96
  against 2.01 s) for 13 MB more peak RSS.
* **Bounded oneDNN caches** (``bound_onednn_caches``).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from npu_rft.hardware import head_logits

# The packed weight copies of a rollout (head and decoder together) live that
# long; they stay within this many bytes.
PACK_MAX_BYTES = 64 * 2**20


@contextlib.contextmanager
def packed_linears(module: nn.Module, budget_bytes: int = PACK_MAX_BYTES) -> Iterator[int]:
    """A no-grad context in which the ``nn.Linear`` modules of ``module`` on CPU in
    fp32 run oneDNN's linear with their weight packed once on entry (see the
    module docstring), in module order while their weights fit in
    ``budget_bytes``; elsewhere, or without oneDNN, nothing changes. It yields
    how many were packed; the modules' own ``forward`` is back on exit."""
    from npu_rft_kernels.logprob.shifted import onednn_linear, onednn_pack

    patched = []
    try:
        for m in module.modules():
            if type(m) is not nn.Linear or m.weight.nbytes > budget_bytes:
                continue
            packed = onednn_pack(m.weight, 8)
            if packed is None:
                continue
            budget_bytes -= m.weight.nbytes
            bias = None if m.bias is None else m.bias.detach()
            patched.append((m, m.__dict__.get("forward")))
            m.forward = functools.partial(onednn_linear, packed=packed, bias=bias)
        yield len(patched)
    finally:
        for m, previous in patched:
            if previous is None:
                del m.forward
            else:
                m.forward = previous


def head_product(weight: torch.Tensor, budget_bytes: int = PACK_MAX_BYTES) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """``hidden [rows, H] -> fp32 logits [rows, V]``, and the bytes it packed:
    oneDNN's linear with ``weight`` packed now, for a CPU fp32 head of at most
    ``budget_bytes``; else ``head_logits`` (0 bytes)."""
    from npu_rft_kernels.logprob.shifted import onednn_linear, onednn_pack

    packed = onednn_pack(weight, 8) if weight.nbytes <= budget_bytes else None
    if packed is None:
        return functools.partial(head_logits, weight=weight), 0
    return functools.partial(onednn_linear, packed=packed), weight.nbytes


@contextlib.contextmanager
def packed_decode(weight: torch.Tensor, decoder: nn.Module,
                  budget_bytes: Optional[int] = None) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """The decode loop's head product for one rollout: the head packed within
    ``budget_bytes``, then the decoder's linears within what is left; a head
    over the budget packs nothing (module docstring). Everything packed is
    freed on exit. ``budget_bytes`` defaults to ``PACK_MAX_BYTES``."""
    budget_bytes = PACK_MAX_BYTES if budget_bytes is None else budget_bytes
    head, head_bytes = head_product(weight, budget_bytes)
    with contextlib.ExitStack() as stack:
        if head_bytes:
            stack.enter_context(packed_linears(decoder, budget_bytes - head_bytes))
        yield head


# oneDNN (CPU GEMMs, the sampler's packed linears, attention) caches a compiled
# primitive per input shape, in two caches of 1024 entries each by default.
# RFT's shapes change every step (prompt and completion lengths), so in a long
# CPU run both fill up: at V=8,000 the GRPO benchmark's heap grew by 2.8 MiB a
# step and its peak RSS by 52 MiB over 40 steps; with 64 entries it stayed flat, at
# the same step time (docs/performance.md).
ONEDNN_CACHE_CAPACITY = 64
_ONEDNN_CACHE_ENVS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_onednn_caches(capacity: int = ONEDNN_CACHE_CAPACITY) -> None:
    """Cap oneDNN's primitive cache and ideep's LRU cache at ``capacity``
    entries, unless the environment already sets them. Both are read when
    oneDNN first uses them, so this must run before the first CPU GEMM that
    goes through oneDNN; ``get_device`` calls it for the CPU."""
    for env in _ONEDNN_CACHE_ENVS:
        os.environ.setdefault(env, str(capacity))
