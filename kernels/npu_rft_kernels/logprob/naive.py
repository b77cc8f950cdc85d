"""The ``naive`` log-prob backend: the specification.

It materialises the full ``[N, V]`` logits, so it is exact and readable but
needs several ``N x V`` fp32 buffers; tests and the benchmark compare every
other backend against it. ``auto`` dispatch never picks it.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch


def naive_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    entropy_grad: bool = True,
    tile_bytes: Optional[int] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """``z = (hidden @ weight.T).float() / temperature``;
    ``logp = log_softmax(z)[target]`` and ``entropy = -sum_v p_v log p_v``,
    both fp32 and 0 where ``targets == ignore_index``; the entropy detached
    without ``entropy_grad``. ``tile_bytes`` is
    unused (no tiles); it keeps every backend's signature the same."""
    logits = (hidden @ weight.t()).float() / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    logp = logprobs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    if not entropy_grad:
        entropy = entropy.detach()
    return logp, torch.where(valid, entropy, torch.zeros_like(entropy))
