"""The fused log-prob op: ``fused_logprob`` and its backends (naive, torch, triton, npu)."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from npu_rft_kernels.dispatch import resolve_logprob, tile_budget

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    entropy_grad: bool = True,
    backend: str = "auto",
    tile_bytes: Optional[int] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Log-probability of ``targets`` under the LM head, without the [N, V] logits.

    With ``z = hidden @ weight.T / temperature`` ([..., V], never materialised
    except by the ``naive`` backend):

        logp[i]    = z[i, t_i] - logsumexp_v z[i, v]
        entropy[i] = logsumexp_v z[i, v] - sum_v softmax(z[i])_v z[i, v]

    Args:
        hidden: [..., H] fp32/bf16/fp16.
        weight: the LM head [V, H], same dtype and device as ``hidden``.
        targets: integer [...] (``hidden.shape[:-1]``), in [0, V) or ``ignore_index``.
        temperature: divides the logits; > 0.
        ignore_index: targets with this value give logp = entropy = 0 and no gradient.
        return_entropy: also return the entropy of the tempered distribution.
        entropy_grad: with ``return_entropy``, whether the entropy is
            differentiable. Pass False when it is only logged (GRPO's
            ``entropy/mean``): the frozen-head forward then skips the GEMM
            that the entropy's gradient needs.
        backend: ``auto``, ``naive``, ``torch``, ``triton`` or ``npu`` (see ``dispatch``).
        tile_bytes: tile memory budget of the tiled backends in bytes (default:
            ``$NPU_RFT_KERNELS_TILE_BYTES``, else 16 MiB on CPU and 256 MiB on
            accelerators; see ``dispatch.tile_budget``).

    Returns fp32 ``logp`` [...] or ``(logp, entropy)``, differentiable in
    ``hidden`` and ``weight`` wherever they require grad.
    """
    _check_inputs(hidden, weight, targets, temperature, ignore_index)
    fn = resolve_logprob(backend, hidden)
    return fn(
        hidden,
        weight,
        targets,
        temperature=temperature,
        ignore_index=ignore_index,
        return_entropy=return_entropy,
        entropy_grad=entropy_grad,
        tile_bytes=tile_budget(hidden, tile_bytes),
    )


def _check_inputs(hidden, weight, targets, temperature, ignore_index) -> None:
    if hidden.dtype not in _FLOAT_DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(
            f"fused_logprob: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one of "
            f"fp32/bf16/fp16; cast them to the same dtype"
        )
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"fused_logprob: weight must be [V, H] with H = hidden.shape[-1]; got weight "
            f"{tuple(weight.shape)} and hidden {tuple(hidden.shape)}"
        )
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"fused_logprob: targets {tuple(targets.shape)} must have hidden's leading shape "
            f"{tuple(hidden.shape[:-1])}; shift/align the targets before the call"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"fused_logprob: targets must be an integer tensor, got {targets.dtype}")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError(
            f"fused_logprob: hidden ({hidden.device}), weight ({weight.device}) and targets "
            f"({targets.device}) must be on one device"
        )
    if not temperature > 0:
        raise ValueError(f"fused_logprob: temperature={temperature} must be > 0")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
    if bool(bad.any()):  # one device sync
        raise ValueError(
            f"fused_logprob: target {targets[bad][0].item()} is outside [0, {weight.shape[0]}) and is not "
            f"ignore_index={ignore_index}; mask it with ignore_index"
        )
