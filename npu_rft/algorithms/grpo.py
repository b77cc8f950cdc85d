"""GRPO: group-relative policy optimisation.

For each prompt ``q`` the policy samples K completions ``o_1..o_K``; each gets a
reward ``r_i`` (the weighted graders). The advantage of every token of ``o_i`` is

    A_i = (r_i - mean_j r_j) / (std + 1e-6)

where ``std`` is the group's (``advantage_scale: group``, Bessel-corrected), the
whole batch's (``batch``), or ``A_i = r_i - mean_j r_j`` (``none``, Dr.GRPO).
A group whose rewards are all equal carries no signal: its advantages are
exactly 0, and with ``filter_zero_std_groups`` its rows leave the batch (and
the loss normaliser) altogether.

The loss per token ``t`` of ``o_i``, with ``rho = pi(o_t) / pi_old(o_t)``::

    l_t = -min(rho * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i) + beta * k3_t
    k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1

aggregated over the batch as ``aggregation`` says (``npu_rft_kernels.grpo_loss``):

- ``token_mean``: sum_t l_t / (number of tokens in the batch)      (DAPO)
- ``seq_mean_token_mean``: sum_i mean_t l_t / (number of sequences) (GRPO)
- ``seq_mean_token_sum_norm``: sum_i sum_t l_t / (sequences * max_new_tokens) (Dr.GRPO)

The normaliser is counted over the whole step (all micro-batches and ranks), so
gradient accumulation gives the one-big-batch update. With
``num_iterations = 1`` the old policy is the current one, so ``pi_old`` is the
current log-prob detached (no extra pass); with more, the old log-probs are
computed once before the first update and reused by every inner update.

With an engine that returns its sampling log-probs (``rollout.engine: vllm``)
the old log-probs are always computed (one no-grad pass), to log the
train-inference mismatch and, with ``rollout.importance_correction``, to
weight each token's policy term ``w_t l_pg`` (``importance.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Literal, Optional, Sequence

import torch

from npu_rft.algorithms.base import (
    ALGORITHMS,
    Algorithm,
    LossOutput,
    MicroBatch,
    StepContext,
    RewardStats,
    StepPlan,
    collate,
    gathered,
    mean,
    reward_metrics,
    sample_and_grade,
)
from npu_rft.algorithms.importance import measure_micro_batches, mismatch_metrics, pad_logprobs

Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
STD_EPS = 1e-6


@dataclass
class GRPOConfig:
    beta: float = 0.04  # KL (k3) coefficient; 0 skips the reference model entirely
    eps_low: float = 0.2  # ratio clipped below at 1 - eps_low
    eps_high: float = 0.28  # ... and above at 1 + eps_high (DAPO's clip-higher)
    aggregation: Aggregation = "token_mean"  # loss normaliser: tokens (DAPO), sequences (GRPO), sequences x max_new_tokens (Dr.GRPO)
    num_iterations: int = 1  # optimizer updates per batch of rollouts
    advantage_scale: Literal["group", "batch", "none"] = "group"  # divide centred rewards by the group std, the batch std, or nothing
    filter_zero_std_groups: bool = False  # drop groups whose rewards are all equal
    mask_truncated: bool = False  # completions cut by max_new_tokens do not count in the loss

    def __post_init__(self) -> None:
        if self.beta < 0:
            raise ValueError(f"grpo.beta={self.beta}: must be >= 0 (0 = no KL term, no reference pass)")
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise ValueError(f"grpo.eps_low={self.eps_low}, eps_high={self.eps_high}: need 0 <= eps_low < 1, eps_high >= 0")
        if self.num_iterations < 1:
            raise ValueError(f"grpo.num_iterations={self.num_iterations}: must be >= 1")


def group_advantages(rewards: torch.Tensor, scale: str, batch_std: Optional[float] = None) -> torch.Tensor:
    """Advantages ``[G, K]`` from rewards ``[G, K]`` (see the module docstring).

    ``batch_std`` is the std over the whole step's rewards (all ranks), needed
    for ``scale="batch"``. Groups with equal rewards get exactly 0.
    """
    rewards = rewards.double()
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = centered / (rewards.std(dim=1, keepdim=True) + STD_EPS)
    elif scale == "batch":
        if batch_std is None:
            raise ValueError("group_advantages(scale='batch') needs batch_std, the std over all of the step's rewards")
        adv = centered / (batch_std + STD_EPS)
    elif scale == "none":
        adv = centered
    else:
        raise ValueError(f"advantage scale {scale!r}: must be group, batch or none")
    tied = rewards.amax(dim=1) == rewards.amin(dim=1)
    adv[tied] = 0.0
    return adv.float()


@ALGORITHMS.register("grpo")
class GRPO(Algorithm):
    name = "grpo"
    config_class = GRPOConfig

    def __init__(self, config: GRPOConfig, train_config) -> None:
        super().__init__(config, train_config)
        self.require_groups("compares samples within a group")
        rollout = train_config.rollout
        self.temperature = rollout.temperature
        self.max_new_tokens = rollout.max_new_tokens
        self.backend = train_config.kernels.backend
        self.tile_bytes = train_config.kernels.tile_bytes
        self.micro_batch_size = train_config.batch.micro_batch_size
        self.num_log_samples = train_config.run.num_log_samples
        # an engine with its own log-probs: measure (and optionally correct) the train-inference mismatch
        self.measure_mismatch = rollout.engine != "native"
        self.correction, self.cap = rollout.importance_correction, rollout.importance_cap

    @property
    def needs_reference(self) -> bool:
        return self.config.beta > 0

    def make_batches(self, ctx: StepContext) -> StepPlan:
        from npu_rft.rollout import SamplingParams

        cfg, k = self.config, self.train_config.rollout.num_samples
        params = SamplingParams(
            max_new_tokens=self.max_new_tokens,
            num_samples=k,
            temperature=self.temperature,
            top_p=self.train_config.rollout.top_p,
        )
        sampled = sample_and_grade(ctx, params)
        examples, prompts, samples, texts = sampled.examples, sampled.prompts, sampled.samples, sampled.texts

        with ctx.timed("advantage"):
            rewards = sampled.rewards(k)
            tied = rewards.amax(dim=1) == rewards.amin(dim=1)
            reward_stats = RewardStats()
            reward_stats.add(sampled)
            stats = reward_stats.gather(ctx, tied=tied.tolist())  # host: CPU
            all_rewards = torch.tensor(stats["reward"], dtype=torch.float64)
            batch_std = float(all_rewards.std()) if all_rewards.numel() > 1 else 0.0  # host: grader rewards, CPU
            advantages = group_advantages(rewards, cfg.advantage_scale, batch_std).flatten()
            keep = ~tied.repeat_interleave(k) if cfg.filter_zero_std_groups else torch.ones(len(advantages), dtype=torch.bool)
            rows = keep.nonzero().flatten().tolist()  # host: CPU
            batch = collate(
                [prompts[samples.prompt_index[i]] for i in rows],
                [samples.completion_ids[i] for i in rows],
                ctx.pad_token_id,
                loss_rows=[not (cfg.mask_truncated and samples.truncated[i]) for i in rows],
            )
            batch.data["advantages"] = advantages[rows]
            if self.measure_mismatch:
                batch.data["engine_logp"] = pad_logprobs([samples.logprobs[i] for i in rows],
                                                         batch.completion_ids.shape[1])
            micro_batches = [mb.to(ctx.device.torch_device) for mb in batch.split(self.micro_batch_size)] if rows else []
        # every rank calls ctx.logprobs, with or without rows: under fsdp2 it gathers the model (a collective)
        if self.needs_reference:
            refs = ctx.logprobs(micro_batches, reference=True, temperature=self.temperature)
            for mb, ref in zip(micro_batches, refs):
                mb.data["ref_logp"] = ref
        olds = []
        if cfg.num_iterations > 1 or self.measure_mismatch:  # on every rank, as above
            olds = ctx.logprobs(micro_batches, temperature=self.temperature)
        if cfg.num_iterations > 1:
            for mb, old in zip(micro_batches, olds):
                mb.data["old_logp"] = old
        mismatch = self._mismatch(ctx, micro_batches, olds) if self.measure_mismatch else {}

        return StepPlan(
            micro_batches=micro_batches,
            num_updates=cfg.num_iterations,
            metrics={**reward_metrics(stats), "advantage/zero_std_frac": mean(stats["tied"]), **mismatch},
            samples=self._log_samples(examples, samples, texts, sampled.grades.rewards),
        )

    def _mismatch(self, ctx: StepContext, micro_batches: List[MicroBatch], olds: List[torch.Tensor]) -> dict:
        """The step's ``mismatch/*`` metrics (over all ranks), and under a correction
        each micro-batch's ``is_weight`` (``npu_rft.algorithms.importance``)."""
        parts = measure_micro_batches(micro_batches, olds, self.correction, self.cap)
        return mismatch_metrics(gathered(ctx, parts))

    def _log_samples(self, examples, samples, texts: Sequence[str], rewards: torch.Tensor) -> List[dict]:
        rows = []
        for i in range(min(self.num_log_samples, len(texts))):
            example = examples[samples.prompt_index[i]]
            rows.append({
                "id": example.id,
                "prompt": example.context,
                "target": example.target,
                "completion": texts[i],
                "reward": float(rewards[i]),  # host: grader rewards, CPU
                "truncated": samples.truncated[i],
            })
        return rows

    def normalizer(self, batch: MicroBatch) -> float:
        if self.config.aggregation == "token_mean":
            return batch.loss_tokens
        sequences = batch.loss_sequences
        if self.config.aggregation == "seq_mean_token_mean":
            return sequences
        return sequences * self.max_new_tokens

    def loss(self, hidden: torch.Tensor, weight: torch.Tensor, batch: MicroBatch, normalizer: float) -> LossOutput:
        """``fused_linear_grpo_loss``; without stored old log-probs the current
        ones, detached, serve as ``pi_old`` (``num_iterations = 1``: ratio 1, gradient A)."""
        from npu_rft_kernels import fused_linear_grpo_loss

        cfg = self.config
        sampled_entropy = self.entropy_sample_tokens is not None
        loss, kernel_metrics = fused_linear_grpo_loss(
            hidden,
            weight,
            batch.completion_ids,
            batch.data.get("old_logp"),
            batch.data["advantages"],
            batch.loss_mask,
            ref_logp=batch.data.get("ref_logp"),
            token_weights=batch.data.get("is_weight"),
            temperature=self.temperature,
            return_entropy=not sampled_entropy,
            backend=self.backend,
            tile_bytes=self.tile_bytes,
            beta=cfg.beta,
            eps_low=cfg.eps_low,
            eps_high=cfg.eps_high,
            aggregation=cfg.aggregation,
            normalizer=normalizer,
        )
        if sampled_entropy:
            kernel_metrics["entropy/mean"] = self._sampled_entropy(hidden, weight, batch)
        # Kernel metrics are means over this micro-batch's tokens: weight them by its share.
        share = self.normalizer(batch) / normalizer
        return LossOutput(loss, {name: value * share for name, value in kernel_metrics.items()})

    @torch.no_grad()
    def _sampled_entropy(self, hidden: torch.Tensor, weight: torch.Tensor, batch: MicroBatch) -> torch.Tensor:
        """The mean entropy over the loss tokens of the micro-batch's first rows
        (about ``entropy_sample_tokens`` tokens; a fixed slice, so no host read)."""
        from npu_rft_kernels import fused_logprob

        rows = max(1, self.entropy_sample_tokens // max(1, hidden.shape[1]))
        mask = batch.loss_mask[:rows]
        targets = batch.completion_ids[:rows].masked_fill(~mask, -100)
        _, entropy = fused_logprob(hidden[:rows].detach(), weight, targets, temperature=self.temperature,
                                   return_entropy=True, entropy_grad=False, backend=self.backend,
                                   tile_bytes=self.tile_bytes)
        m = mask.to(torch.float32)
        return (entropy * m).sum() / m.sum().clamp(min=1.0)
