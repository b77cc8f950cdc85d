"""The train-inference mismatch: the engine's sampling log-probs against the trainer's.

An engine other than our own decode loop (vLLM) samples with other kernels and
often another precision, so the log-prob it gives a sampled token,
``e_t = log pi_engine(o_t)``, differs from the trainer's recomputed
``p_t = log pi_old(o_t)`` (the policy that sampled, as the trainer computes it).
With ``d_t = p_t - e_t`` over the completion tokens of a step:

    mismatch/abs_mean   mean |d_t|
    mismatch/abs_max    max |d_t|
    mismatch/kl         mean (exp(d_t) - d_t - 1): the k3 estimate of KL(pi_engine || pi_old)
                        from the engine's own samples (>= 0; 0 when the two agree)
    mismatch/weight_mean   under a correction, the mean weight w_t below

The correction (``rollout.importance_correction``, cap ``C > 1``) turns the
ratio ``rho_t = exp(d_t)`` into a per-token weight of the policy-gradient term:

    tis   w_t = min(rho_t, C)                   truncated importance sampling
    mis   w_t = 1 if 1/C <= rho_t <= C else 0   masked importance sampling

The weights are constants (no gradient flows through them). docs/algorithms.md
gives the formulas and how to read the metrics.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

# As the losses do: beyond +-20 the ratio means nothing and exp() would overflow.
LOG_RATIO_CLAMP = 20.0
CORRECTIONS = ("none", "tis", "mis")


def pad_logprobs(rows: Sequence[Sequence[float]], width: int) -> torch.Tensor:
    """``[len(rows), width]`` fp32, each row's log-probs left-aligned, 0 after them
    (the layout of ``collate``'s completions)."""
    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, row in enumerate(rows):
        if len(row) > width:
            raise ValueError(f"row {i} has {len(row)} engine log-probs but the batch holds {width} completion tokens")
        if row:
            out[i, :len(row)] = torch.as_tensor(list(row), dtype=torch.float32)
    return out


def mismatch_sums(engine_logp: torch.Tensor, trainer_logp: torch.Tensor, mask: torch.Tensor,
                  weights: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Additive pieces of the metrics over ``mask``'s tokens (combine parts with ``mismatch_metrics``):
    ``tokens``, ``abs_sum`` (sum |d|), ``abs_max`` (max |d|), ``kl_sum`` (sum of the k3 terms) and,
    with the correction's ``weights``, ``weight_sum``."""
    m = mask.to(torch.bool).to(trainer_logp.device)
    d = (trainer_logp.float() - engine_logp.float().to(trainer_logp.device)) * m
    d = d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # 0 off the mask, which adds 0 to every sum below
    w = (weights.float() * m).sum() if weights is not None else d.new_zeros(())
    abs_max = d.abs().max() if d.numel() else d.new_zeros(())
    stacked = torch.stack([m.sum().float(), d.abs().sum(), abs_max, (d.exp() - d - 1.0).sum(), w])
    tokens, abs_sum, abs_max, kl_sum, weight_sum = stacked.tolist()  # host: one read per micro-batch and step
    sums = {"tokens": int(tokens), "abs_sum": abs_sum, "abs_max": abs_max, "kl_sum": kl_sum}
    if weights is not None:
        sums["weight_sum"] = weight_sum
    return sums


def mismatch_metrics(parts: List[Dict[str, float]]) -> Dict[str, float]:
    """``mismatch/abs_mean``, ``mismatch/abs_max`` and ``mismatch/kl`` over the
    tokens of all parts (micro-batches, ranks) and, under a correction,
    ``mismatch/weight_mean``: the mean weight (``mis``: the share of tokens kept)."""
    tokens = max(1, sum(p["tokens"] for p in parts))
    metrics = {
        "mismatch/abs_mean": sum(p["abs_sum"] for p in parts) / tokens,
        "mismatch/abs_max": max((p["abs_max"] for p in parts), default=0.0),
        "mismatch/kl": sum(p["kl_sum"] for p in parts) / tokens,
    }
    if any("weight_sum" in p for p in parts):
        metrics["mismatch/weight_mean"] = sum(p.get("weight_sum", 0.0) for p in parts) / tokens
    return metrics


def importance_weights(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mode: str, cap: float) -> torch.Tensor:
    """Per-token weights ``[B, T]`` from ``rho = exp(trainer_logp - engine_logp)``
    (``mode``: tis or mis; see the module docstring). Padding gets whatever its
    zeros give; the loss masks it."""
    if mode not in ("tis", "mis"):
        raise ValueError(f"importance correction {mode!r}: must be tis or mis (none needs no weights)")
    if not cap > 1.0:
        raise ValueError(f"importance cap {cap}: must be > 1")
    log_ratio = (trainer_logp.float() - engine_logp.float().to(trainer_logp.device)).clamp(-LOG_RATIO_CLAMP,
                                                                                           LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    if mode == "tis":
        return ratio.clamp(max=cap)
    return ((ratio >= 1.0 / cap) & (ratio <= cap)).to(torch.float32)


def measure_micro_batches(batches: Sequence, trainer_logps: Sequence[torch.Tensor], correction: str,
                          cap: float) -> List[Dict[str, float]]:
    """Each micro-batch's ``mismatch_sums`` over its completion tokens, from its
    ``data["engine_logp"]`` and the trainer's log-probs; under a correction (tis,
    mis) also its weights, stored as ``data["is_weight"]``."""
    parts = []
    for mb, trainer_logp in zip(batches, trainer_logps):
        weights = None
        if correction != "none":
            weights = mb.data["is_weight"] = importance_weights(trainer_logp, mb.data["engine_logp"], correction, cap)
        parts.append(mismatch_sums(mb.data["engine_logp"], trainer_logp, mb.completion_mask, weights))
    return parts
