"""Iterative (online) DPO: sample, grade, pair, and train DPO on the pairs, repeatedly.

One **iteration** is ``batches_per_iteration * epochs`` training steps of the
shared loop:

1. At the iteration's first step, draw ``batches_per_iteration`` prompt batches
   (``batch.prompts_per_step`` prompts each, over all ranks; each rank rolls
   out its own shard), sample K = ``rollout.num_samples`` completions per
   prompt with the current policy, and grade them (the reward is the weighted
   sum of the graders).
2. Build preference pairs from each prompt's K scores (``build_pairs``):
   ``best_vs_worst`` takes the first best and the first worst sample and skips
   prompts whose scores all tie; ``all_pairs`` takes every pair whose scores
   differ. ``min_margin`` drops pairs whose score gap is smaller.
3. Compute the reference log-probs of every pair once (see below), then train
   ``epochs`` epochs over the pairs: each step is one optimizer update on the
   pairs of one prompt batch; the batches' order is reshuffled every epoch
   (the same order on every rank, from the run seed).

The loss of a pair (chosen ``w``, rejected ``l``, summed completion
log-probs ``pi`` of the policy and ``ref`` of the reference) is a function of

    h = (pi(w) - ref(w)) - (pi(l) - ref(l))

as ``loss_type`` says (``npu_rft_kernels.dpo_loss``; ``eps`` is
``label_smoothing``):

    sigmoid  -(1 - eps) log s(beta h) - eps log s(-beta h)      (DPO; cDPO with eps)
    ipo      (h - 1 / (2 beta))^2                                (IPO)
    hinge    max(0, 1 - beta h)                                  (SLiC)
    robust   (-(1 - eps) log s(beta h) + eps log s(-beta h)) / (1 - 2 eps)   (rDPO)

averaged over all of the step's pairs (on every rank): the loop's normaliser
is the global number of pairs. With ``nll_weight`` > 0 each pair's loss also
holds ``nll_weight`` times the chosen answer's negative log-likelihood per
token (RPO): DPO alone can lower the chosen and the rejected answers
together, and with them the tokens they share (the answer's format).

**Reference.** ``iteration_start``: the policy as it was when the iteration
began. The reference is only ever evaluated on the iteration's own pairs, so
its log-probs are computed once, right after the pairs are built, by the
policy itself (``ctx.logprobs(reference=False)`` before the first update of
the iteration); this is exactly a frozen snapshot of the policy (with LoRA, of
its adapter weights), with no second copy of any weights. ``initial``: the
starting model, the loop's reference (with LoRA the adapter disabled), also
evaluated once per iteration. Either way the cached reference log-probs are
part of the checkpoint, with the pairs, so a run resumed inside an iteration
continues that iteration with the same pairs and the same reference.

**Engine log-probs.** With an engine that returns its sampling log-probs
(``rollout.engine: vllm``) the iteration's first step logs the
train-inference mismatch of its rollouts (``importance.py``), and under
``rollout.importance_correction`` every completion sum, the policy's and the
reference's alike, becomes the weighted sum ``sum_t w_t logp_t``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Literal, Optional, Sequence, Tuple

import torch

from npu_rft.algorithms.base import (
    ALGORITHMS,
    Algorithm,
    AlgorithmState,
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

PairRule = Literal["best_vs_worst", "all_pairs"]
TieBreak = Literal["first", "length"]
LossType = Literal["sigmoid", "ipo", "hinge", "robust"]
Reference = Literal["iteration_start", "initial"]

_BATCH_FIELDS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "loss_mask")


@dataclass
class DPOConfig:
    beta: float = 0.1  # strength of the implicit KL to the reference (DPO's beta)
    loss_type: LossType = "sigmoid"  # sigmoid (DPO), ipo, hinge (SLiC), robust (rDPO)
    label_smoothing: float = 0.0  # sigmoid (cDPO) and robust (rDPO) only: assumed label-noise rate
    pairing: PairRule = "best_vs_worst"  # one pair per prompt (best vs worst sample), or every pair whose scores differ
    min_margin: float = 0.0  # pairs whose score gap is below this are dropped (0 = any difference)
    # best_vs_worst among equal scores: the first sample, or by length (the shortest best, the longest worst)
    tie_break: TieBreak = "first"
    epochs: int = 2  # passes over an iteration's pairs
    batches_per_iteration: int = 4  # prompt batches rolled out per iteration = updates per epoch
    reference: Reference = "iteration_start"  # the policy at the start of each iteration, or the initial model
    nll_weight: float = 0.0  # RPO: + nll_weight x the chosen answer's per-token NLL in each pair's loss (0 = plain DPO)

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"dpo.beta={self.beta}: must be > 0 (typical 0.05-0.5)")
        if self.loss_type in ("ipo", "hinge") and self.label_smoothing != 0.0:
            raise ValueError(
                f"dpo.label_smoothing={self.label_smoothing} has no meaning for loss_type={self.loss_type}; "
                "set it to 0, or use loss_type sigmoid or robust"
            )
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(
                f"dpo.label_smoothing={self.label_smoothing}: must be in [0, 0.5) (at 0.5 a pair says nothing)"
            )
        if self.nll_weight < 0:
            raise ValueError(f"dpo.nll_weight={self.nll_weight}: must be >= 0 (0 = plain DPO; RPO uses about 1)")
        if self.min_margin < 0:
            raise ValueError(f"dpo.min_margin={self.min_margin}: must be >= 0 (0 keeps every pair whose scores differ)")
        if self.epochs < 1:
            raise ValueError(f"dpo.epochs={self.epochs}: must be >= 1")
        if self.batches_per_iteration < 1:
            raise ValueError(f"dpo.batches_per_iteration={self.batches_per_iteration}: must be >= 1")

    @property
    def steps_per_iteration(self) -> int:
        return self.batches_per_iteration * self.epochs


# --------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class Pair:
    """Sample ``chosen`` of prompt ``prompt`` is preferred to sample ``rejected``."""

    prompt: int
    chosen: int
    rejected: int
    gap: float  # score(chosen) - score(rejected) > 0


@dataclass(frozen=True)
class Pairing:
    pairs: List[Pair]
    tied_prompts: int  # prompts whose K scores all tie: no pair can be made
    below_margin: int  # candidate pairs dropped because their gap < min_margin


def best_vs_worst(scores: Sequence[Sequence[float]], min_margin: float = 0.0,
                  lengths: Optional[Sequence[Sequence[int]]] = None) -> Pairing:
    """One pair per prompt: its best sample against its worst.

    ``scores[p][k]`` is sample ``k`` of prompt ``p``. Among equal best (or
    worst) scores the first sample is taken; with ``lengths`` (laid out as
    ``scores``, e.g. completion tokens) the shortest of the equal best and the
    longest of the equal worst, then the first. A prompt whose scores all tie
    is skipped (``tied_prompts``); one whose best-worst gap is below
    ``min_margin`` is dropped (``below_margin``).
    """
    pairs: List[Pair] = []
    tied = below = 0
    for p, row in enumerate(scores):
        row = list(row)
        if not row:
            continue
        size = list(lengths[p]) if lengths is not None else [0] * len(row)
        best = max(range(len(row)), key=lambda k: (row[k], -size[k], -k))
        worst = min(range(len(row)), key=lambda k: (row[k], -size[k], k))
        gap = row[best] - row[worst]
        if gap == 0:
            tied += 1
        elif gap < min_margin:
            below += 1
        else:
            pairs.append(Pair(p, best, worst, gap))
    return Pairing(pairs, tied, below)


def all_pairs(scores: Sequence[Sequence[float]], min_margin: float = 0.0,
              lengths: Optional[Sequence[Sequence[int]]] = None) -> Pairing:
    """Every pair of samples of a prompt whose scores differ, the higher one chosen.

    Pairs come in prompt order, then by sample indices ``(i, j)``, ``i < j``.
    A prompt of K samples with distinct scores gives K (K - 1) / 2 pairs.
    ``tied_prompts`` counts prompts whose scores all tie; ``below_margin``
    the differing pairs dropped because their gap is below ``min_margin``.
    ``lengths`` changes nothing: no pair is made between equal scores.
    """
    pairs: List[Pair] = []
    tied = below = 0
    for p, row in enumerate(scores):
        row = list(row)
        if row and max(row) == min(row):
            tied += 1
            continue
        for i in range(len(row)):
            for j in range(i + 1, len(row)):
                if row[i] == row[j]:
                    continue
                chosen, rejected = (i, j) if row[i] > row[j] else (j, i)
                gap = row[chosen] - row[rejected]
                if gap < min_margin:
                    below += 1
                else:
                    pairs.append(Pair(p, chosen, rejected, gap))
    return Pairing(pairs, tied, below)


PAIR_RULES = {"best_vs_worst": best_vs_worst, "all_pairs": all_pairs}


def build_pairs(scores: Sequence[Sequence[float]], rule: str = "best_vs_worst", min_margin: float = 0.0,
                lengths: Optional[Sequence[Sequence[int]]] = None) -> Pairing:
    """Preference pairs from a table of scores ``[prompts][samples]`` by
    ``rule``; ``lengths`` (the same layout) break ties by length."""
    if rule not in PAIR_RULES:
        raise ValueError(f"pairing rule {rule!r} is unknown; choose one of {', '.join(PAIR_RULES)}")
    return PAIR_RULES[rule](scores, min_margin, lengths)


def pair_batch(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[Sequence[int]]],
    pairs: Sequence[Pair],
    pad_token_id: int,
    logprobs: Optional[Sequence[Sequence[Sequence[float]]]] = None,
) -> MicroBatch:
    """The pairs as one batch: rows ``0..n-1`` the chosen completions, rows
    ``n..2n-1`` the rejected ones, in pair order (``completions[p][k]`` is
    sample ``k`` of prompt ``p``). With the engine's ``logprobs`` (laid out as
    ``completions``) the batch holds them as ``data["engine_logp"]``."""
    rows = [(pr.prompt, pr.chosen) for pr in pairs] + [(pr.prompt, pr.rejected) for pr in pairs]
    batch = collate([prompts[p] for p, _ in rows], [completions[p][k] for p, k in rows], pad_token_id)
    if logprobs is not None:
        batch.data["engine_logp"] = pad_logprobs([logprobs[p][k] for p, k in rows], batch.completion_ids.shape[1])
    return batch


def split_pairs(batch: MicroBatch, pairs_per_micro_batch: int) -> List[MicroBatch]:
    """Micro-batches of at most ``pairs_per_micro_batch`` pairs, each again
    chosen rows then rejected rows (``batch`` laid out as ``pair_batch`` does)."""
    n = batch.rows // 2
    out = []
    for start in range(0, n, pairs_per_micro_batch):
        stop = min(start + pairs_per_micro_batch, n)
        out.append(batch.select(list(range(start, stop)) + list(range(n + start, n + stop))))
    return out


# --------------------------------------------------------------------------- algorithm


@ALGORITHMS.register("dpo")
class IterativeDPO(Algorithm):
    name = "dpo"
    config_class = DPOConfig

    def __init__(self, config: DPOConfig, train_config) -> None:
        super().__init__(config, train_config)
        self.require_groups("pairs samples of one prompt")
        if train_config.batch.micro_batch_size < 2:
            raise ValueError(
                f"batch.micro_batch_size={train_config.batch.micro_batch_size}: a DPO micro-batch holds a pair "
                "(a chosen and a rejected sequence); use an even number >= 2"
            )
        self.pairs_per_micro_batch = train_config.batch.micro_batch_size // 2
        self.backend = train_config.kernels.backend
        self.tile_bytes = train_config.kernels.tile_bytes
        self.seed = train_config.run.seed
        self.num_log_samples = train_config.run.num_log_samples
        # an engine with its own log-probs: measure (and optionally correct) the train-inference mismatch
        self.measure_mismatch = train_config.rollout.engine != "native"
        self.correction = train_config.rollout.importance_correction
        self.cap = train_config.rollout.importance_cap
        # The current iteration: its index, and per prompt batch the micro-batches
        # of this rank's pairs, each holding data["ref_logp"] (summed, per row).
        self.iteration = -1
        self.batches: List[List[MicroBatch]] = []
        self.log_rows: List[dict] = []  # a few of the iteration's pairs, for samples.jsonl

    @property
    def needs_reference(self) -> bool:
        return self.config.reference == "initial"

    def total_steps(self, num_examples: int, epochs: float) -> int:
        """Whole iterations that roll out ``epochs`` passes over the prompts."""
        rollout_batches = super().total_steps(num_examples, epochs)
        iterations = -(-rollout_batches // self.config.batches_per_iteration)
        return iterations * self.config.steps_per_iteration

    def position(self, step: int) -> Tuple[int, int, int]:
        """``(iteration, epoch, update)`` of a step: the update-th optimizer
        update of the epoch-th epoch of the iteration."""
        iteration, within = divmod(step, self.config.steps_per_iteration)
        epoch, update = divmod(within, self.config.batches_per_iteration)
        return iteration, epoch, update

    def batch_order(self, iteration: int, epoch: int) -> List[int]:
        """The order of the iteration's prompt batches in an epoch: a
        permutation seeded by (run seed, iteration, epoch), equal on every rank."""
        order = list(range(self.config.batches_per_iteration))
        random.Random(f"{self.seed}:{iteration}:{epoch}").shuffle(order)
        return order

    def make_batches(self, ctx: StepContext) -> StepPlan:
        iteration, epoch, update = self.position(ctx.step)
        metrics: Dict[str, float] = {}
        if epoch == 0 and update == 0:
            metrics = self._start_iteration(ctx, iteration)
        elif iteration != self.iteration:
            raise RuntimeError(
                f"step {ctx.step} is inside DPO iteration {iteration}, but the algorithm holds the pairs of "
                f"iteration {self.iteration}; resume from a checkpoint of this run, which holds the iteration's "
                "pairs and reference log-probs"
            )
        slot = self.batch_order(iteration, epoch)[update]
        # 1 on the step whose reference log-probs came from a fresh snapshot of the policy
        refreshed = epoch == 0 and update == 0 and self.config.reference == "iteration_start"
        metrics.update({"dpo/iteration": iteration, "dpo/epoch": epoch, "dpo/reference_refresh": int(refreshed)})
        # the iteration's sample pairs go with every step: the loop logs them at its own cadence
        return StepPlan(micro_batches=self.batches[slot], metrics=metrics, samples=list(self.log_rows))

    def _start_iteration(self, ctx: StepContext, iteration: int) -> Dict[str, float]:
        """Roll out, grade and pair every prompt batch of the iteration, then
        cache the reference log-probs of all pairs (one pass); returns the
        iteration's metrics, over all ranks."""
        from npu_rft.rollout import SamplingParams

        rollout, k = self.train_config.rollout, self.train_config.rollout.num_samples
        params = SamplingParams(
            max_new_tokens=rollout.max_new_tokens, num_samples=k, temperature=rollout.temperature, top_p=rollout.top_p
        )
        self.iteration, self.batches, self.log_rows = iteration, [], []
        stats, gaps, tied, below = RewardStats(), [], 0, 0
        for _ in range(self.config.batches_per_iteration):
            sampled = sample_and_grade(ctx, params)
            prompts = sampled.prompts
            with ctx.timed("advantage"):
                rewards = sampled.rewards(k)
                grouped = [sampled.samples.completion_ids[p * k:(p + 1) * k] for p in range(len(prompts))]
                lengths = [[len(c) for c in group] for group in grouped] if self.config.tie_break == "length" else None
                scores = rewards.tolist()  # host: CPU
                pairing = build_pairs(scores, self.config.pairing, self.config.min_margin, lengths)
                logprobs = None
                if self.measure_mismatch:
                    logprobs = [sampled.samples.logprobs[p * k:(p + 1) * k] for p in range(len(prompts))]
                batch = pair_batch(prompts, grouped, pairing.pairs, ctx.pad_token_id, logprobs)
                self.batches.append(split_pairs(batch, self.pairs_per_micro_batch))
            stats.add(sampled)
            gaps += [pr.gap for pr in pairing.pairs]
            tied, below = tied + pairing.tied_prompts, below + pairing.below_margin
            room = self.num_log_samples - len(self.log_rows)
            self.log_rows += _log_rows(sampled.examples, sampled.texts, rewards, pairing.pairs, room)
        parts = self._cache_reference_logprobs(ctx)  # timed as "reference" by ctx.logprobs
        mismatch = mismatch_metrics(gathered(ctx, parts)) if self.measure_mismatch else {}
        columns = stats.gather(ctx, gap=gaps, pairs=[len(gaps)], tied=[tied], below=[below])
        return {**reward_metrics(columns), "dpo/pairs": sum(columns["pairs"]), "dpo/tied_prompts": sum(columns["tied"]),
                "dpo/below_margin": sum(columns["below"]), "dpo/score_gap": mean(columns["gap"]), **mismatch}

    def _cache_reference_logprobs(self, ctx: StepContext) -> List[Dict[str, float]]:
        """``data["ref_logp"]`` [rows]: each row's summed completion log-prob
        under the reference, for every micro-batch of the iteration (one pass).

        With the engine's log-probs, the policy's own log-probs (the reference
        pass itself under ``iteration_start``) give this rank's mismatch sums,
        which are returned, and under a correction ``data["is_weight"]``, the
        per-token weights of both the policy's and the reference's sums."""
        flat = [mb for batches in self.batches for mb in batches]
        reference = self.config.reference == "initial"
        # every rank calls ctx.logprobs, with or without pairs: under fsdp2 it gathers the model (a collective)
        refs = ctx.logprobs(flat, reference=reference)
        olds = ctx.logprobs(flat) if self.measure_mismatch and reference else refs
        if not flat:
            return []
        device = ctx.device
        parts = measure_micro_batches(flat, olds, self.correction, self.cap) if self.measure_mismatch else []
        sums = [(logp.float() * mb.loss_mask.to(logp.device) * mb.data.get("is_weight", 1.0)).sum(dim=1)
                for mb, logp in zip(flat, refs)]
        values = device.to_host(torch.cat(sums))  # one read for the whole iteration
        start = 0
        for mb in flat:
            mb.data["ref_logp"] = torch.tensor(values[start:start + mb.rows], dtype=torch.float32)
            start += mb.rows
        return parts

    def normalizer(self, batch: MicroBatch) -> float:
        """The number of pairs (half the rows)."""
        return batch.rows // 2

    def loss(self, hidden: torch.Tensor, weight: torch.Tensor, batch: MicroBatch, normalizer: float) -> LossOutput:
        """This micro-batch's pairs' summed DPO loss divided by the step's global
        pair count; metrics are shares of the step's means in the same way."""
        from npu_rft_kernels import fused_linear_dpo_loss

        cfg, n = self.config, batch.rows // 2
        targets = batch.completion_ids.masked_fill(~batch.loss_mask, -100)
        ref = batch.data["ref_logp"].to(hidden.device)
        weights = batch.data.get("is_weight")
        mean_loss, kernel_metrics = fused_linear_dpo_loss(
            hidden[:n],
            hidden[n:],
            weight,
            targets[:n],
            targets[n:],
            ref[:n],
            ref[n:],
            beta=cfg.beta,
            loss_type=cfg.loss_type,
            label_smoothing=cfg.label_smoothing,
            backend=self.backend,
            tile_bytes=self.tile_bytes,
            weights_chosen=None if weights is None else weights[:n],
            weights_rejected=None if weights is None else weights[n:],
            nll_weight=cfg.nll_weight,
        )
        share = n / normalizer
        loss = mean_loss * share
        # rewards/chosen -> dpo/reward_chosen, nll/chosen -> dpo/nll_chosen
        metrics = {"dpo/" + key.replace("rewards/", "reward_").replace("/", "_"): value * share
                   for key, value in kernel_metrics.items()}
        return LossOutput(loss, metrics)

    # ----------------------------------------------------------------------- state

    def state_dict(self) -> AlgorithmState:
        """The current iteration: its index and, per prompt batch, the pair
        micro-batches with their cached reference log-probs."""
        tensors: Dict[str, torch.Tensor] = {}
        for b, batches in enumerate(self.batches):
            for m, mb in enumerate(batches):
                for name in _BATCH_FIELDS:
                    tensors[f"batch{b}.mb{m}.{name}"] = getattr(mb, name).contiguous().cpu()  # host: checkpoint
                for name in ("ref_logp", "is_weight"):
                    if name in mb.data:
                        tensors[f"batch{b}.mb{m}.{name}"] = mb.data[name].contiguous().cpu()  # host: checkpoint
        meta = {
            "iteration": self.iteration,
            "micro_batches": [len(batches) for batches in self.batches],
            "log_rows": self.log_rows,
        }
        return AlgorithmState(tensors, meta)

    def load_state_dict(self, state: AlgorithmState) -> None:
        try:
            iteration, counts = int(state.meta["iteration"]), list(state.meta["micro_batches"])
            batches = [
                [
                    MicroBatch(
                        *(state.tensors[f"batch{b}.mb{m}.{name}"] for name in _BATCH_FIELDS),
                        data={name: state.tensors[f"batch{b}.mb{m}.{name}"] for name in ("ref_logp", "is_weight")
                              if name == "ref_logp" or f"batch{b}.mb{m}.{name}" in state.tensors},
                    )
                    for m in range(count)
                ]
                for b, count in enumerate(counts)
            ]
        except KeyError as exc:
            raise ValueError(
                f"DPO checkpoint state lacks {exc}; it was not written by the dpo algorithm of this version: "
                "resume with the algorithm that wrote it, or start a new run"
            ) from None
        if counts and len(counts) != self.config.batches_per_iteration:
            raise ValueError(
                f"the checkpoint's DPO iteration has {len(counts)} prompt batches but "
                f"dpo.batches_per_iteration={self.config.batches_per_iteration}; resume with the config of the run"
            )
        self.iteration, self.batches, self.log_rows = iteration, batches, list(state.meta.get("log_rows", []))


def _log_rows(examples, texts: Sequence[str], rewards: torch.Tensor, pairs: Sequence[Pair], limit: int) -> List[dict]:
    """Up to ``limit`` pairs for samples.jsonl (``texts`` prompt-major, K per prompt)."""
    k = rewards.shape[1]
    rows = []
    for pr in list(pairs)[: max(limit, 0)]:
        example = examples[pr.prompt]
        rows.append({
            "id": example.id,
            "prompt": example.context,
            "target": example.target,
            "chosen": texts[pr.prompt * k + pr.chosen],
            "rejected": texts[pr.prompt * k + pr.rejected],
            "chosen_reward": float(rewards[pr.prompt, pr.chosen]),  # host: grader rewards, CPU
            "rejected_reward": float(rewards[pr.prompt, pr.rejected]),  # host: CPU
        })
    return rows
