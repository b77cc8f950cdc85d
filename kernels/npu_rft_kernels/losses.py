"""GRPO and DPO losses, on log-probs and straight from hidden states.

The ``fused_linear_*`` versions compute the log-probs with ``fused_logprob``
(no [tokens, vocab] logits) and then apply the plain loss, so each formula is
written once.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from npu_rft_kernels.logprob import fused_logprob

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
# Log-ratios are clamped to this range before exp(): beyond it the ratio
# (e^20 ~ 5e8) is meaningless and exp() would overflow to inf, and inf * 0 in
# the backward of a clipped token would give NaN gradients.
LOG_RATIO_CLAMP = 20.0


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: Optional[torch.Tensor] = None,
    token_weights: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    aggregation: str = "token_mean",
    normalizer: Optional[float] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Clipped-surrogate policy loss with an optional k3 KL penalty.

    Per token (``logp``, ``old_logp``, ``ref_logp``, ``mask``: [B, T];
    ``advantages`` A: [B], broadcast over T):

        r    = exp(clamp(logp - old_logp, -20, 20))
        l_pg = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)
        d    = clamp(ref_logp - logp, -20, 20)
        kl   = exp(d) - d - 1                      (k3; skipped if ref_logp is None)
        l    = w l_pg + beta kl

    where ``w`` is ``token_weights`` [B, T] (constants: the train-inference
    importance weights, ``npu_rft.algorithms.importance``), 1 when None.

    Aggregation over the masked tokens (m = mask), with ``normalizer`` the
    global count (across micro-batches and ranks) when given, else the local
    one shown in brackets:

        token_mean               sum l m / normalizer       [number of tokens, sum m]
        seq_mean_token_mean      sum_b (sum_t l m / max(sum_t m, 1)) / normalizer
                                                            [number of sequences, B]
        seq_mean_token_sum_norm  sum l m / normalizer       [B * T: sequences times the
                                 (Dr. GRPO; pass num_seqs * max_new_tokens)  padded length]

    Metrics (0-dim tensors, over the masked tokens): ``clip/low_frac`` the
    fraction with r < 1 - eps_low and A < 0, ``clip/high_frac`` the fraction
    with r > 1 + eps_high and A > 0 (the tokens whose gradient the clip
    removes) and, when ``ref_logp`` is given, ``kl/mean`` the mean k3 KL.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"grpo_loss: unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"grpo_loss: need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    if normalizer is not None and not normalizer > 0:
        raise ValueError(f"grpo_loss: normalizer={normalizer} must be > 0 (or None for the local count)")
    if logp.shape != old_logp.shape or logp.shape != mask.shape or logp.dim() != 2:
        raise ValueError(
            f"grpo_loss: logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask "
            f"{tuple(mask.shape)} must all be [B, T]"
        )
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"grpo_loss: advantages {tuple(advantages.shape)} must be [B] = {tuple(logp.shape[:1])}")
    m = mask.to(torch.float32)
    adv = advantages.to(torch.float32).unsqueeze(1)
    log_ratio = (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    if token_weights is not None:
        if token_weights.shape != logp.shape:
            raise ValueError(f"grpo_loss: token_weights {tuple(token_weights.shape)} must match logp {tuple(logp.shape)}")
        per_token = per_token * token_weights.detach().to(per_token.dtype)
    metrics: Dict[str, torch.Tensor] = {}
    if ref_logp is not None:
        if ref_logp.shape != logp.shape:
            raise ValueError(f"grpo_loss: ref_logp {tuple(ref_logp.shape)} must match logp {tuple(logp.shape)}")
        d = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        kl = d.exp() - d - 1.0
        per_token = per_token + beta * kl
        metrics["kl/mean"] = _masked_mean(kl.detach(), m)
    with torch.no_grad():
        low = ((ratio < 1.0 - eps_low) & (adv < 0)).float()
        high = ((ratio > 1.0 + eps_high) & (adv > 0)).float()
        metrics["clip/low_frac"] = _masked_mean(low, m)
        metrics["clip/high_frac"] = _masked_mean(high, m)

    if aggregation == "seq_mean_token_mean":
        per_seq = (per_token * m).sum(1) / m.sum(1).clamp(min=1.0)
        denom = normalizer if normalizer is not None else float(logp.shape[0])
        loss = per_seq.sum() / denom
    else:
        if normalizer is not None:
            denom = normalizer
        elif aggregation == "token_mean":
            denom = m.sum().clamp(min=1.0)
        else:
            denom = float(logp.numel())
        loss = (per_token * m).sum() / denom
    return loss, metrics


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """A 0-dim tensor on ``x``'s device: metrics are never read back here, so a
    loss call does not wait for the device; the caller reads them once a step."""
    return ((x * m).sum() / m.sum().clamp(min=1.0)).detach()


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logp: Optional[torch.Tensor],
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: Optional[torch.Tensor] = None,
    token_weights: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    backend: str = "auto",
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    aggregation: str = "token_mean",
    normalizer: Optional[float] = None,
    tile_bytes: Optional[int] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``grpo_loss`` with ``logp = fused_logprob(hidden, weight, targets)``.

    ``hidden`` [B, T, H], ``targets`` [B, T] already aligned with ``hidden``
    (the caller shifts: ``targets[:, i]`` is the token that follows position
    i). Tokens with ``mask == 0`` are set to ``ignore_index`` so their
    log-probs are not computed.

    ``old_logp=None`` means the current log-probs, detached
    (``old_logp = logp.detach()``): the case of one policy update per batch of
    rollouts (``num_iterations=1``), which needs no separate old-log-prob
    pass. Then ``r = exp(logp - logp.detach())`` is 1 in value (never
    clipped), but its gradient ``r dlogp = dlogp`` flows, so the policy term
    is ``-A`` per token with gradient ``-A dlogp`` (the REINFORCE gradient
    with advantages ``A``).

    With ``return_entropy`` the metrics also hold
    ``entropy/mean``, the masked mean entropy of the tempered distribution
    (a metric only: it is not part of the loss, and is computed without
    gradient, which saves the frozen-head forward one GEMM).
    """
    if mask.shape != targets.shape:
        raise ValueError(f"fused_linear_grpo_loss: mask {tuple(mask.shape)} must match targets {tuple(targets.shape)}")
    targets = targets.masked_fill(mask == 0, ignore_index)
    out = fused_logprob(
        hidden,
        weight,
        targets,
        temperature=temperature,
        ignore_index=ignore_index,
        return_entropy=return_entropy,
        entropy_grad=False,  # a metric only
        backend=backend,
        tile_bytes=tile_bytes,
    )
    logp, entropy = out if return_entropy else (out, None)
    loss, metrics = grpo_loss(
        logp,
        logp.detach() if old_logp is None else old_logp,
        advantages,
        mask,
        ref_logp=ref_logp,
        token_weights=token_weights,
        beta=beta,
        eps_low=eps_low,
        eps_high=eps_high,
        aggregation=aggregation,
        normalizer=normalizer,
    )
    if entropy is not None:
        metrics["entropy/mean"] = _masked_mean(entropy.detach(), mask.to(torch.float32))
    return loss, metrics


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    nll_chosen: Optional[torch.Tensor] = None,
    nll_weight: float = 0.0,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Direct preference optimisation loss, averaged over the batch.

    Inputs are summed completion log-probs [B]. With
    ``h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)``
    and ``eps = label_smoothing``:

        sigmoid  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
        ipo      (h - 1 / (2 beta))^2
        hinge    max(0, 1 - beta h)
        robust   (-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps)

    ``label_smoothing`` applies to sigmoid (in [0, 1]) and robust (in
    [0, 0.5)) only.

    ``nll_weight`` > 0 adds ``nll_weight * nll_chosen`` to every pair's loss
    (RPO): ``nll_chosen`` [B] is the chosen answer's negative log-likelihood
    per token, so that the tokens the chosen and rejected answers share are
    not pushed down together. Metric ``nll/chosen`` is its batch mean.

    Metrics (0-dim tensors on the inputs' device, batch means):
    ``rewards/chosen`` = beta (policy_chosen - ref_chosen),
    ``rewards/rejected`` = beta (policy_rejected - ref_rejected),
    ``rewards/accuracy`` = fraction with chosen reward > rejected reward,
    ``rewards/margin`` = chosen reward - rejected reward.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}; choose one of {', '.join(DPO_LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"dpo_loss: beta={beta} must be > 0")
    if loss_type in ("ipo", "hinge") and label_smoothing != 0.0:
        raise ValueError(f"dpo_loss: label_smoothing applies to sigmoid and robust, not {loss_type}; set it to 0")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: robust needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"dpo_loss: label_smoothing={label_smoothing} must be in [0, 1]")
    shapes = {t.shape for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or policy_chosen.dim() != 1:
        raise ValueError(f"dpo_loss: the four inputs must all be [B]; got shapes {sorted(tuple(s) for s in shapes)}")
    if nll_weight < 0:
        raise ValueError(f"dpo_loss: nll_weight={nll_weight} must be >= 0")
    if nll_weight > 0 and (nll_chosen is None or nll_chosen.shape != policy_chosen.shape):
        got = None if nll_chosen is None else tuple(nll_chosen.shape)
        raise ValueError(f"dpo_loss: nll_weight > 0 needs nll_chosen of shape {tuple(policy_chosen.shape)}; got {got}")
    chosen = (policy_chosen - ref_chosen).float()
    rejected = (policy_rejected - ref_rejected).float()
    h = chosen - rejected
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * h)
    else:
        losses = (-(1.0 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1.0 - 2.0 * eps)
    if nll_weight > 0:
        losses = losses + nll_weight * nll_chosen.float()
    with torch.no_grad():
        r_chosen, r_rejected = beta * chosen, beta * rejected
        metrics = {
            "rewards/chosen": r_chosen.mean().detach(),
            "rewards/rejected": r_rejected.mean().detach(),
            "rewards/accuracy": (r_chosen > r_rejected).float().mean().detach(),
            "rewards/margin": (r_chosen - r_rejected).mean().detach(),
        }
        if nll_chosen is not None:
            metrics["nll/chosen"] = nll_chosen.float().mean().detach()
    return losses.mean(), metrics


def fused_linear_dpo_loss(
    hidden_chosen: torch.Tensor,
    hidden_rejected: torch.Tensor,
    weight: torch.Tensor,
    targets_chosen: torch.Tensor,
    targets_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    tile_bytes: Optional[int] = None,
    weights_chosen: Optional[torch.Tensor] = None,
    weights_rejected: Optional[torch.Tensor] = None,
    nll_weight: float = 0.0,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``dpo_loss`` from hidden states [B, T, H] and targets [B, T] (aligned;
    ``ignore_index`` on prompt and padding); the policy sums are
    ``fused_logprob(...).sum(-1)``, computed for chosen and rejected in one
    call. ``ref_chosen``/``ref_rejected`` are precomputed sums [B].

    ``weights_chosen``/``weights_rejected`` [B, T] (both or neither): constant
    per-token weights of the sums, ``sum_t w_t logp_t`` (the train-inference
    importance weights); the reference sums must be weighted alike.

    ``nll_weight`` > 0 adds the chosen answers' per-token negative
    log-likelihood (unweighted, over their target tokens) to each pair's
    loss, from the same fused log-probs (``dpo_loss``)."""
    if hidden_chosen.dim() != 3 or hidden_rejected.dim() != 3:
        raise ValueError(
            f"fused_linear_dpo_loss: hidden states must be [B, T, H]; got {tuple(hidden_chosen.shape)} "
            f"and {tuple(hidden_rejected.shape)}"
        )
    size = hidden_chosen.shape[-1]
    hidden = torch.cat([hidden_chosen.reshape(-1, size), hidden_rejected.reshape(-1, size)])
    targets = torch.cat([targets_chosen.reshape(-1), targets_rejected.reshape(-1)])
    logp = fused_logprob(
        hidden, weight, targets, temperature=temperature, ignore_index=ignore_index, backend=backend,
        tile_bytes=tile_bytes,
    )
    n_chosen = targets_chosen.numel()
    nll_chosen = None
    if nll_weight > 0:
        tokens = (targets_chosen != ignore_index).sum(-1).clamp(min=1)
        nll_chosen = -logp[:n_chosen].view(targets_chosen.shape).sum(-1) / tokens
    if (weights_chosen is None) != (weights_rejected is None):
        raise ValueError("fused_linear_dpo_loss: pass both weights_chosen and weights_rejected, or neither")
    if weights_chosen is not None:
        if weights_chosen.shape != targets_chosen.shape or weights_rejected.shape != targets_rejected.shape:
            raise ValueError(f"fused_linear_dpo_loss: weights {tuple(weights_chosen.shape)}, "
                             f"{tuple(weights_rejected.shape)} must match the targets {tuple(targets_chosen.shape)}, "
                             f"{tuple(targets_rejected.shape)}")
        logp = logp * torch.cat([weights_chosen.reshape(-1), weights_rejected.reshape(-1)]).detach().to(logp.dtype)
    policy_chosen = logp[:n_chosen].view(targets_chosen.shape).sum(-1)
    policy_rejected = logp[n_chosen:].view(targets_rejected.shape).sum(-1)
    return dpo_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        nll_chosen=nll_chosen,
        nll_weight=nll_weight,
    )
