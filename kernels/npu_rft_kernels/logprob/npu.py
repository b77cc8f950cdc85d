"""The ``npu`` log-prob backend (Ascend). UNVERIFIED ON HARDWARE: its logic is
tested on CPU against a stand-in that implements the documented math of
``torch_npu.npu_fused_linear_online_max_sum``; nobody has run it on a 910 yet.

``npu_fused_linear_online_max_sum(input, weight, target, vocab_start_index,
vocab_end_index, return_logits=False)`` computes ``input @ weight^T`` with
each row's max and sum of ``exp(logit - max)`` (fp32) without returning the
logits. Per torch_npu's documentation it takes bf16/fp16 only, runs on Atlas
A2/A3 (not the 910A) with CANN >= 9.0, and knows no temperature or entropy.
``dispatch`` passes ``torch_npu_api.online_max_sum`` in as ``online_max_sum``
when this device has the op: ``online_max_sum(h, w, target, vocab_start_index,
vocab_end_index) -> (logits_max, sum_exp_logits)``, the op's first two outputs.

Where it fits - bf16/fp16 and no entropy: the no-grad old/reference passes,
and the loss with a trainable head (full fine-tuning) or a frozen one (LoRA) -
the forward statistics come from the fused op, one call per vocabulary tile
(so its workspace stays bounded), merged like an online softmax; the
temperature is folded into the hidden states first. The backward is the
``torch`` backend's recompute backward, for the hidden states, the head, or
both. GRPO asks the loss for no entropy on an NPU (``Device.hardware``
computes it on a sample, without gradient), so the common LoRA GRPO step
reaches the op. Everywhere else (fp32, entropy, no fused op) it runs the
``torch`` backend's tiled path on the NPU. The first call on each path logs
which one ran and why. We read only the max and sum-exp
outputs: the target logit is the fp32 dot product ``h . W_t``, as in the
other backends, which also sidesteps whether ``vocab_end_index`` is
inclusive.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Set, Tuple

import torch

from npu_rft_kernels.logprob.torch_chunked import (
    TorchTileOps,
    plan_tiles,
    scatter_tokens,
    tile_budget,
    tiled_backward,
    torch_logprob,
    valid_tokens,
)

logger = logging.getLogger(__name__)

# The fused op's workspace per element is not documented; budget one fp32 logit.
_FUSED_BYTES_PER_ELEM = 4


def fused_log_softmax_normaliser(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, online_max_sum: Callable, tile_bytes: Optional[int]
) -> torch.Tensor:
    """``lse = log sum_v exp(h . W_v)`` per row, from ``online_max_sum`` per tile."""
    n, vocab = h.shape[0], weight.shape[0]
    m = torch.full((n,), float("-inf"), dtype=torch.float32, device=h.device)
    s = torch.zeros(n, dtype=torch.float32, device=h.device)
    rows, cols = plan_tiles(n, vocab, tile_budget(tile_bytes), _FUSED_BYTES_PER_ELEM)
    for v0 in range(0, vocab, cols):
        w = weight[v0 : v0 + cols]
        for r0 in range(0, n, rows):
            r = slice(r0, r0 + rows)
            tile_max, tile_sum = online_max_sum(h[r], w, targets[r], v0, v0 + w.shape[0] - 1)
            m_new = torch.maximum(m[r], tile_max)
            s[r] = s[r] * (m[r] - m_new).exp() + tile_sum * (tile_max - m_new).exp()
            m[r] = m_new
    return m + s.log()


def _target_logit(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (h.float() * weight[targets].float()).sum(dim=1)


class _FusedStatsLogprob(torch.autograd.Function):
    """Forward statistics from the fused op; the tiled recompute backward."""

    @staticmethod
    def forward(ctx, h, weight, targets, online_max_sum, tile_bytes):
        lse = fused_log_softmax_normaliser(h, weight, targets, online_max_sum, tile_bytes)
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.tile_bytes = tile_bytes
        return _target_logit(h, weight, targets) - lse

    @staticmethod
    def backward(ctx, g):
        h, weight, targets, lse = ctx.saved_tensors
        dh, dw = tiled_backward(
            h,
            weight,
            targets,
            lse,
            None,
            g,
            None,
            need_h=ctx.needs_input_grad[0],
            need_w=ctx.needs_input_grad[1],
            ops_cls=TorchTileOps,
            tile_bytes=ctx.tile_bytes,
        )
        return dh, dw, None, None, None


def npu_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    entropy_grad: bool = True,
    tile_bytes: Optional[int] = None,
    online_max_sum: Optional[Callable] = None,
):
    """The ``npu`` backend of ``fused_logprob`` (see the module docstring)."""
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    why_not = _why_not_fused(hidden, tile_bytes, online_max_sum, return_entropy)
    _log_path_once(why_not, grad, weight.requires_grad)
    if why_not is not None:
        return torch_logprob(
            hidden,
            weight,
            targets,
            temperature=temperature,
            ignore_index=ignore_index,
            return_entropy=return_entropy,
            entropy_grad=entropy_grad,
            tile_bytes=tile_bytes,
        )
    h, t, index = valid_tokens(hidden, targets, temperature, ignore_index)
    if grad:
        logp = _FusedStatsLogprob.apply(h, weight, t, online_max_sum, tile_bytes)
    else:
        with torch.no_grad():
            logp = _target_logit(h, weight, t) - fused_log_softmax_normaliser(h, weight, t, online_max_sum, tile_bytes)
    return scatter_tokens(logp, index, targets.shape)


def _why_not_fused(hidden: torch.Tensor, tile_bytes: Optional[int], online_max_sum: Optional[Callable],
                   return_entropy: bool) -> Optional[str]:
    if online_max_sum is None:
        return "this torch_npu or chip has no npu_fused_linear_online_max_sum"
    if tile_bytes == 0:  # the streaming mode, which run_tiled refuses with an explanation
        return "kernels.tile_bytes is 0 (the triton backend's streaming mode)"
    if hidden.dtype not in (torch.bfloat16, torch.float16):
        return f"the op takes bf16/fp16, the hidden states are {str(hidden.dtype).replace('torch.', '')}"
    if return_entropy:
        return "an entropy was asked for, which the op does not give"
    return None


_LOGGED: Set[Tuple[Optional[str], str]] = set()


def _log_path_once(why_not: Optional[str], grad: bool, head_trainable: bool) -> None:
    """One log line per (path, reason, kind of pass): which fused paths a run used."""
    kind = "no-grad pass" if not grad else ("loss, trainable head" if head_trainable else "loss, frozen head")
    if (why_not, kind) in _LOGGED:
        return
    _LOGGED.add((why_not, kind))
    if why_not is None:
        logger.info("npu log-prob backend, %s: torch_npu's fused online max-sum op", kind)
    else:
        logger.info("npu log-prob backend, %s: the tiled torch path, because %s", kind, why_not)
