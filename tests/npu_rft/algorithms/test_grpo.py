"""GRPO: advantages, normalisers, the loss's value and its gradient-accumulation
invariance, and how make_batches turns rollouts into micro-batches."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from npu_rft.algorithms.base import Grades, Prompt, collate
from npu_rft.algorithms.grpo import GRPO, group_advantages
from npu_rft.config import TrainConfig
from npu_rft.config_base import from_dict
from npu_rft.data.schema import Example
from npu_rft.device import get_device
from npu_rft.rollout import Samples

AGGREGATIONS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]


def make_grpo(**grpo) -> GRPO:
    cfg = from_dict(TrainConfig, {
        "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}, "graders": [{"name": "exact_match"}],
        "rollout": {"num_samples": 4, "max_new_tokens": 5}, "grpo": grpo,
        "batch": {"prompts_per_step": 2, "micro_batch_size": 3}, "run": {"num_log_samples": 2},
    })
    return GRPO(cfg.grpo, cfg)


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.1, 0.1, 0.1, 0.1]])
    # group 0: mean 0.5, Bessel std sqrt(4 * 0.25 / 3) = 0.57735
    adv = group_advantages(rewards, "group")
    assert torch.allclose(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 / (math.sqrt(1 / 3) + 1e-6))
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # exactly 0, although 0.1 is not exact in binary
    assert torch.allclose(group_advantages(rewards, "batch", batch_std=0.5)[0], torch.tensor([1.0, -1, -1, 1]), atol=1e-5)
    assert group_advantages(rewards, "none")[0].tolist() == [0.5, -0.5, -0.5, 0.5]
    with pytest.raises(ValueError, match="needs batch_std"):
        group_advantages(rewards, "batch")


@pytest.mark.parametrize("aggregation, expected", [("token_mean", 3.0), ("seq_mean_token_mean", 2.0),
                                                   ("seq_mean_token_sum_norm", 10.0)])
def test_normalizer_counts_tokens_or_sequences(aggregation, expected):
    batch = collate([[1], [1], [1]], [[4, 5], [6], [7, 8]], 0, loss_rows=[True, True, False])
    assert make_grpo(aggregation=aggregation).normalizer(batch) == expected  # 5 = max_new_tokens


def test_loss_value_by_hand():
    # Uniform policy (zero hidden states): every token has logp = -log V; with
    # pi_old = pi the ratio is 1, so the token_mean loss is -mean(A) over tokens
    # and the k3 KL against an identical reference is 0.
    grpo = make_grpo(beta=0.5)
    batch = collate([[1], [1]], [[2, 3, 4], [5]], 0)
    batch.data["advantages"] = torch.tensor([2.0, -1.0])
    batch.data["ref_logp"] = torch.full((2, 3), -math.log(11.0)) * batch.completion_mask
    hidden = torch.zeros(2, 3, 8, requires_grad=True)
    weight = torch.randn(11, 8)
    loss, metrics = grpo.loss(hidden, weight, batch, normalizer=4.0)
    assert loss.item() == pytest.approx(-(3 * 2.0 - 1.0) / 4.0)
    assert metrics["kl/mean"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["entropy/mean"] == pytest.approx(math.log(11.0), rel=1e-5)


def _batch(seed: int, with_old: bool, with_ref: bool):
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 2, 4, 1, 3, 5, 2]
    batch = collate([[1, 2]] * len(lengths), [torch.randint(0, 13, (n,), generator=g).tolist() for n in lengths], 0,
                    loss_rows=[True, True, False, True, True, True, True])
    batch.data["advantages"] = torch.randn(len(lengths), generator=g)
    if with_old:
        batch.data["old_logp"] = -torch.rand(batch.completion_ids.shape, generator=g) * 3
    if with_ref:
        batch.data["ref_logp"] = -torch.rand(batch.completion_ids.shape, generator=g) * 3
    hidden = torch.randn(len(lengths), 5, 6, generator=g)
    weight = torch.randn(13, 6, generator=g)
    return batch, hidden, weight


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("with_old, with_ref", [(False, False), (True, True)])
def test_gradient_accumulation_equals_one_big_batch(aggregation, with_old, with_ref):
    grpo = make_grpo(aggregation=aggregation, beta=0.1 if with_ref else 0.0)
    batch, hidden, weight = _batch(0, with_old, with_ref)

    def grads(micro_batch_size):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        parts = [batch.select(slice(i, i + micro_batch_size)) for i in range(0, batch.rows, micro_batch_size)]
        normalizer = sum(grpo.normalizer(mb) for mb in parts)
        total = 0.0
        for i, mb in enumerate(parts):
            rows = slice(i * micro_batch_size, (i + 1) * micro_batch_size)
            loss, _ = grpo.loss(h[rows, : mb.completion_ids.shape[1]], w, mb, normalizer)
            loss.backward()
            total += loss.item()
        return total, h.grad, w.grad

    loss_big, h_big, w_big = grads(batch.rows)
    for size in (1, 3):
        loss_small, h_small, w_small = grads(size)
        assert loss_small == pytest.approx(loss_big, rel=1e-5, abs=1e-7)
        assert torch.allclose(h_small, h_big, atol=1e-6) and torch.allclose(w_small, w_big, atol=1e-6)


class FakeContext:
    """Fixed rollouts and rewards in place of the trainer's services."""

    def __init__(self, samples: Samples, rewards, truncated=None):
        self.step, self.rank, self.world_size = 0, 0, 1
        self.device = get_device("cpu")
        self.tokenizer, self.pad_token_id = None, 0
        self.samples, self.rewards = samples, rewards
        self.logprob_calls = []
        self.examples = [Example(context=f"q{i}", target="a", location=f"t:{i}") for i in range(2)]

    def timed(self, stage):
        return contextlib.nullcontext()

    def next_prompts(self):
        return [Prompt(ex, ids) for ex, ids in zip(self.examples, [[1, 2, 3], [4]])]

    def rollout(self, prompt_ids, params):
        assert params.num_samples == 4 and params.max_new_tokens == 5
        return self.samples

    def grade(self, examples, completions):
        r = torch.tensor(self.rewards, dtype=torch.float32)
        return Grades(r, {"exact_match": r.tolist()}, {"exact_match": [False, True] * 4})

    def decode(self, ids):
        return " ".join(map(str, ids))

    def logprobs(self, batches, *, reference=False, temperature=1.0):
        self.logprob_calls.append(reference)
        return [torch.full(mb.completion_ids.shape, -1.0) for mb in batches]

    def all_gather(self, obj):
        return [obj]


def _samples():
    return Samples(
        prompt_index=[0, 0, 0, 0, 1, 1, 1, 1],
        completion_ids=[[5, 6], [7], [8, 9, 9], [5], [6, 6], [7, 7, 7, 7, 7], [8], [9]],
        truncated=[False, False, False, False, False, True, False, False],
    )


def test_make_batches_filters_tied_groups_and_masks_truncated():
    grpo = make_grpo(filter_zero_std_groups=True, mask_truncated=True, beta=0.0)
    ctx = FakeContext(_samples(), [1, 0, 0, 1, 0.5, 0.5, 0.5, 0.5])
    plan = grpo.make_batches(ctx)
    rows = [mb.rows for mb in plan.micro_batches]
    assert rows == [3, 1]  # group 1 (all 0.5) left the batch; 4 rows in micro-batches of 3
    first = plan.micro_batches[0]
    assert first.prompt_ids.tolist() == [[1, 2, 3]] * 3
    assert first.completion_ids.tolist() == [[5, 6, 0], [7, 0, 0], [8, 9, 9]]
    assert torch.allclose(first.data["advantages"], torch.tensor([1.0, -1.0, -1.0]) * 0.5 / (math.sqrt(1 / 3) + 1e-6))
    assert ctx.logprob_calls == []  # beta = 0 and num_iterations = 1: no extra passes
    assert plan.num_updates == 1
    assert plan.metrics["advantage/zero_std_frac"] == 0.5
    assert plan.metrics["reward/mean"] == pytest.approx(0.5)
    assert plan.metrics["grader/exact_match/format_failure"] == 0.5
    assert plan.metrics["completion/truncated_frac"] == 0.125
    assert [s["completion"] for s in plan.samples] == ["5 6", "7"]


def test_make_batches_keeps_tied_groups_with_zero_advantage_and_masks_truncated_rows():
    grpo = make_grpo(mask_truncated=True, beta=0.04, num_iterations=2)
    ctx = FakeContext(_samples(), [1, 0, 0, 1, 0.5, 0.5, 0.5, 0.5])
    plan = grpo.make_batches(ctx)
    assert sum(mb.rows for mb in plan.micro_batches) == 8
    truncated_row = plan.micro_batches[1].select([2])  # global row 5 = the truncated sample
    assert truncated_row.completion_mask.sum() == 5 and truncated_row.loss_mask.sum() == 0
    assert plan.micro_batches[1].data["advantages"].tolist()[1:] == [0.0, 0.0]
    assert ctx.logprob_calls == [True, False]  # reference, then old log-probs
    assert plan.num_updates == 2
    assert all("ref_logp" in mb.data and "old_logp" in mb.data for mb in plan.micro_batches)


def test_grpo_rejects_settings_without_signal():
    cfg = from_dict(TrainConfig, {"model": {"name_or_path": "m"}, "data": {"train": "t"},
                                  "graders": [{"name": "exact_match"}], "rollout": {"num_samples": 1}})
    with pytest.raises(ValueError, match="num_samples=1"):
        GRPO(cfg.grpo, cfg)


def test_npu_hardware_takes_the_entropy_from_a_no_grad_sample_and_the_loss_asks_for_none(monkeypatch):
    from npu_rft.hardware import NpuHardware

    batch, hidden, weight = _batch(3, with_old=False, with_ref=False)
    normalizer = batch.loss_tokens
    plain = make_grpo()
    h1 = hidden.clone().requires_grad_()
    loss_plain, metrics_plain = plain.loss(h1, weight, batch, normalizer)

    calls = []
    import npu_rft_kernels

    real = npu_rft_kernels.fused_linear_grpo_loss
    monkeypatch.setattr(npu_rft_kernels, "fused_linear_grpo_loss",
                        lambda *a, **k: (calls.append(k["return_entropy"]), real(*a, **k))[1])
    sampled = make_grpo()
    sampled.use_hardware(NpuHardware())
    sampled.entropy_sample_tokens = 10  # 2 rows of 5 tokens
    h2 = hidden.clone().requires_grad_()
    loss_sampled, metrics_sampled = sampled.loss(h2, weight, batch, normalizer)
    assert calls == [False]  # the loss call can reach torch_npu's fused op, which gives no entropy
    assert loss_sampled.item() == loss_plain.item()
    loss_sampled.backward()
    loss_plain.backward()
    assert torch.equal(h1.grad, h2.grad)
    # the entropy of the first two rows' loss tokens, by hand, times this micro-batch's share (1)
    logits = hidden[:2] @ weight.T
    p = torch.softmax(logits, -1)
    ent = -(p * torch.log_softmax(logits, -1)).sum(-1)
    m = batch.loss_mask[:2].float()
    assert float(metrics_sampled["entropy/mean"]) == pytest.approx(float((ent * m).sum() / m.sum()), rel=1e-5)
    assert float(metrics_plain["entropy/mean"]) != pytest.approx(float(metrics_sampled["entropy/mean"]), rel=1e-3)


# --------------------------------------------------------------------------- engine log-probs


def make_engine_grpo(correction: str, cap: float = 2.0) -> GRPO:
    cfg = from_dict(TrainConfig, {
        "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}, "graders": [{"name": "exact_match"}],
        "rollout": {"num_samples": 4, "max_new_tokens": 5, "engine": "vllm", "importance_correction": correction,
                    "importance_cap": cap},
        "grpo": {"beta": 0.0}, "batch": {"prompts_per_step": 2, "micro_batch_size": 8},
    })
    return GRPO(cfg.grpo, cfg)


def test_make_batches_logs_the_mismatch_and_weights_tokens_under_tis():
    # FakeContext's trainer log-probs are -1; the engine's give ratios exp(-1 - e) of 2 (first
    # token of sample 0) and 1/4 (its second token); every other token agrees (ratio 1).
    samples = _samples()
    samples.logprobs = [[-1.0] * len(c) for c in samples.completion_ids]
    samples.logprobs[0] = [-1.0 - math.log(2.0), -1.0 + math.log(4.0)]
    ctx = FakeContext(samples, [1, 0, 0, 1, 0, 1, 1, 0])
    plan = make_engine_grpo("tis", cap=1.5).make_batches(ctx)
    assert ctx.logprob_calls == [False]  # one old-log-prob pass, for the mismatch
    tokens = sum(len(c) for c in samples.completion_ids)  # 16
    assert plan.metrics["mismatch/abs_max"] == pytest.approx(math.log(4.0))
    assert plan.metrics["mismatch/abs_mean"] == pytest.approx(3 * math.log(2.0) / tokens)
    assert plan.metrics["mismatch/kl"] == pytest.approx(((1 - math.log(2.0)) + (math.log(4.0) - 0.75)) / tokens)
    weights = plan.micro_batches[0].data["is_weight"]
    assert weights[0, :2].tolist() == pytest.approx([1.5, 0.25])  # min(2, 1.5), min(1/4, 1.5)
    assert weights[1, 0].item() == pytest.approx(1.0)
    assert plan.metrics["mismatch/weight_mean"] == pytest.approx((1.5 + 0.25 + 14) / tokens)


def test_make_batches_under_mis_masks_tokens_outside_the_band():
    samples = _samples()
    samples.logprobs = [[-1.0] * len(c) for c in samples.completion_ids]
    samples.logprobs[0] = [-1.0 - math.log(2.0), -1.0 + math.log(4.0)]
    plan = make_engine_grpo("mis", cap=3.0).make_batches(FakeContext(samples, [1, 0, 0, 1, 0, 1, 1, 0]))
    assert plan.micro_batches[0].data["is_weight"][0, :2].tolist() == [1.0, 0.0]  # 1/4 < 1/3


def test_loss_weights_each_tokens_policy_term():
    # ratio 1 (pi_old = pi): the per-token policy term is -A; weighted, the token_mean loss
    # is -(sum_t w_t A) / normaliser.
    grpo = make_grpo(beta=0.0)
    batch = collate([[1], [1]], [[2, 3, 4], [5]], 0)
    batch.data["advantages"] = torch.tensor([2.0, -1.0])
    batch.data["is_weight"] = torch.tensor([[1.5, 0.0, 1.0], [0.5, 9.0, 9.0]])  # padding's weight is masked
    loss, _ = grpo.loss(torch.zeros(2, 3, 8), torch.randn(11, 8), batch, normalizer=4.0)
    assert loss.item() == pytest.approx(-(2.0 * (1.5 + 0.0 + 1.0) - 1.0 * 0.5) / 4.0)


def test_importance_correction_needs_an_engine_with_logprobs():
    with pytest.raises(ValueError, match="needs the engine's log-probs, which the native engine does not return"):
        from_dict(TrainConfig, {"model": {"name_or_path": "m"}, "data": {"train": "t"},
                                "graders": [{"name": "exact_match"}], "rollout": {"importance_correction": "tis"}})
