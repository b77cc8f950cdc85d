"""What npu-rft does differently on a CPU, reached only through
``npu_rft.hardware.CpuHardware`` (generic modules import nothing from here).

* **Packed decode GEMMs.** On CPU in fp32, the decode loop's head and the
  decoder's linears run oneDNN's linear with their weights packed once per
  rollout: with the few rows of a decode step it ran 25-40% faster than
  ``F.linear`` (MLP projections of a 256-wide model), about 2x faster at the
  Qwen2.5-0.5B shape (8 rows, [896 -> 4864] 3.5 against 7.7 ms, [4864 -> 896]
  7.3 against 14.2 ms), and 3x faster than ``(W @ h^T)^T`` for a head of
  8,000 x 256, see docs/performance.md. The packed copies live for the
  rollout, in two budgets. The head within ``PACK_HEAD_MAX_BYTES`` (64 MiB); a
  bigger head keeps ``(W @ h^T)^T``: at V = 151,936 packing a 256-wide head
  took 109 ms and a second 155 MB copy for 14.4 against 18.8 ms per product.
  The decoder's linears, in module order, within ``PACK_DECODER_MAX_BYTES``
  (2 GiB: a whole Qwen2.5-0.5B decoder, 1.43 GB), when the head is packed or
  when they hold at least as many bytes as the head: then they take most of
  a decode step (at the 0.5B shape, 8 rows, one thread: 0.42 against 0.80 s
  of GEMMs per decode step, docs/performance.md). Beside a bigger unpacked
  head they stay plain: for the 256-wide model at V = 151,936 packing them
  saved 2% of the rollout for 13 MB more peak RSS.
* **Bounded oneDNN caches** (``bound_onednn_caches``).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Iterator

import torch
from torch import nn

from npu_rft.hardware import head_logits

# The packed weight copies of a rollout live that long; the decoder's and
# the head's stay within these many bytes.
PACK_DECODER_MAX_BYTES = 2 * 2**30
PACK_HEAD_MAX_BYTES = 64 * 2**20


@contextlib.contextmanager
def packed_linears(module: nn.Module, budget_bytes: int = PACK_DECODER_MAX_BYTES) -> Iterator[int]:
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


def head_product(weight: torch.Tensor, budget_bytes: int = PACK_HEAD_MAX_BYTES) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """``hidden [rows, H] -> fp32 logits [rows, V]``, and the bytes it packed:
    oneDNN's linear with ``weight`` packed now, for a CPU fp32 head of at most
    ``budget_bytes``; else ``head_logits`` (0 bytes)."""
    from npu_rft_kernels.logprob.shifted import onednn_linear, onednn_pack

    packed = onednn_pack(weight, 8) if weight.nbytes <= budget_bytes else None
    if packed is None:
        return functools.partial(head_logits, weight=weight), 0
    return functools.partial(onednn_linear, packed=packed), weight.nbytes


@contextlib.contextmanager
def packed_decode(weight: torch.Tensor, decoder: nn.Module) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """The decode loop's head product for one rollout: the head packed within
    ``PACK_HEAD_MAX_BYTES``; the decoder's linears packed within
    ``PACK_DECODER_MAX_BYTES`` when the head is packed or they hold at least
    as many bytes as the head (module docstring). Everything packed is freed on exit."""
    head, head_bytes = head_product(weight, PACK_HEAD_MAX_BYTES)
    decoder_bytes = sum(m.weight.nbytes for m in decoder.modules() if type(m) is nn.Linear)
    budget = PACK_DECODER_MAX_BYTES if head_bytes or decoder_bytes >= weight.nbytes else 0
    with packed_linears(decoder, budget):
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
