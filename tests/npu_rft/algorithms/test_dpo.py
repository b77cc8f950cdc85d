"""Iterative DPO: pair rules on hand-made score tables, the loss wiring, the
iteration schedule and its checkpointed state (with a fake loop context)."""
from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace
from typing import List

import pytest
import torch

from npu_rft.device import get_device

from npu_rft.algorithms.base import Grades, Prompt
from npu_rft.algorithms.dpo import (
    DPOConfig,
    IterativeDPO,
    Pair,
    all_pairs,
    best_vs_worst,
    build_pairs,
    pair_batch,
    split_pairs,
)
from npu_rft.config_base import ConfigError, from_dict
from npu_rft.data.schema import Example

# --------------------------------------------------------------------------- pair rules


def test_best_vs_worst_takes_first_best_and_first_worst():
    pairing = best_vs_worst([[0.2, 0.9, 0.9, 0.1, 0.1]])
    assert pairing.pairs == [Pair(prompt=0, chosen=1, rejected=3, gap=pytest.approx(0.8))]
    assert (pairing.tied_prompts, pairing.below_margin) == (0, 0)


def test_best_vs_worst_skips_ties_and_small_margins():
    scores = [
        [0.5, 0.5, 0.5],  # all tie: skipped
        [0.3, 0.35, 0.3],  # gap 0.05 < 0.1: dropped
        [1.0, 0.0, 0.5],  # gap 1.0: kept
        [0.0, 0.0, 0.25],  # gap 0.25: kept; worst is the first 0.0
    ]
    pairing = best_vs_worst(scores, min_margin=0.1)
    assert pairing.pairs == [Pair(2, 0, 1, 1.0), Pair(3, 2, 0, 0.25)]
    assert pairing.tied_prompts == 1
    assert pairing.below_margin == 1


def test_best_vs_worst_breaks_ties_by_length():
    scores = [[0.2, 0.9, 0.9, 0.1, 0.1, 0.9], [1.0, 0.0, 0.0]]
    lengths = [[5, 28, 17, 12, 28, 17], [9, 9, 9]]
    pairing = best_vs_worst(scores, lengths=lengths)
    # the shortest of the best (17: samples 2 and 5, the first taken), the longest of the worst (28: sample 4);
    # equal lengths fall back to the first
    assert pairing.pairs == [Pair(0, 2, 4, pytest.approx(0.8)), Pair(1, 0, 1, 1.0)]
    # without lengths, and for all_pairs (no pair between equal scores), nothing changes
    assert best_vs_worst(scores).pairs[0] == Pair(0, 1, 3, pytest.approx(0.8))
    assert all_pairs(scores, lengths=lengths).pairs == all_pairs(scores).pairs
    assert build_pairs(scores, lengths=lengths).pairs == pairing.pairs


def test_best_vs_worst_margin_is_inclusive():
    assert best_vs_worst([[0.75, 0.25]], min_margin=0.5).pairs == [Pair(0, 0, 1, 0.5)]


def test_all_pairs_counts():
    # K distinct scores: K (K - 1) / 2 pairs.
    assert len(all_pairs([[0.1, 0.4, 0.2, 0.9]]).pairs) == 6
    assert len(all_pairs([[float(k) for k in range(8)]]).pairs) == 28
    # 1.0 > 0.5 = 0.5 > 0.0: the tied pair (2, 3) is the only one missing.
    pairing = all_pairs([[1.0, 0.0, 0.5, 0.5]])
    assert [(p.chosen, p.rejected, p.gap) for p in pairing.pairs] == [
        (0, 1, 1.0), (0, 2, 0.5), (0, 3, 0.5), (2, 1, 0.5), (3, 1, 0.5)
    ]
    assert (pairing.tied_prompts, pairing.below_margin) == (0, 0)


def test_all_pairs_ties_and_margin():
    scores = [[0.7, 0.7], [1.0, 0.0, 0.5, 0.5]]
    pairing = all_pairs(scores, min_margin=0.6)
    assert pairing.pairs == [Pair(1, 0, 1, 1.0)]
    assert pairing.tied_prompts == 1
    assert pairing.below_margin == 4  # the four pairs with gap 0.5


def test_build_pairs_dispatch_and_unknown_rule():
    table = [[0.0, 1.0, 0.5]]
    assert build_pairs(table).pairs == best_vs_worst(table).pairs
    assert len(build_pairs(table, "all_pairs").pairs) == 3
    with pytest.raises(ValueError, match="best_vs_worst, all_pairs"):
        build_pairs(table, "random")


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"beta": 0.0}, "dpo.beta"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "no meaning for loss_type=ipo"),
        ({"label_smoothing": 0.5}, r"\[0, 0.5\)"),
        ({"min_margin": -0.1}, "dpo.min_margin"),
        ({"epochs": 0}, "dpo.epochs"),
        ({"batches_per_iteration": 0}, "dpo.batches_per_iteration"),
        ({"nll_weight": -0.5}, "dpo.nll_weight"),
    ],
)
def test_config_rejects_bad_values(fields, message):
    with pytest.raises(ValueError, match=message):
        DPOConfig(**fields)


def test_config_from_yaml_dict_lists_valid_keys():
    cfg = from_dict(DPOConfig, {"loss_type": "robust", "label_smoothing": 0.1, "pairing": "all_pairs"})
    assert (cfg.loss_type, cfg.pairing, cfg.steps_per_iteration) == ("robust", "all_pairs", 8)
    with pytest.raises(ConfigError, match="valid keys: .*batches_per_iteration"):
        from_dict(DPOConfig, {"epoch": 2})
    with pytest.raises(ConfigError, match="'kto' is not one of"):
        from_dict(DPOConfig, {"loss_type": "kto"})


# --------------------------------------------------------------------------- batches


def test_pair_batch_layout_and_split():
    prompts = [[5, 6], [7]]
    completions = [[[1], [2, 2]], [[3, 3, 3], [4]]]
    pairs = [Pair(0, 1, 0, 1.0), Pair(1, 0, 1, 0.5)]
    batch = pair_batch(prompts, completions, pairs, pad_token_id=0)
    assert batch.completion_ids.tolist() == [[2, 2, 0], [3, 3, 3], [1, 0, 0], [4, 0, 0]]
    assert batch.prompt_ids.tolist() == [[5, 6], [0, 7], [5, 6], [0, 7]]
    first, second = split_pairs(batch, 1)
    # each micro-batch: the chosen row, then its rejected row, padding trimmed
    assert first.completion_ids.tolist() == [[2, 2], [1, 0]]
    assert second.prompt_ids.tolist() == [[7], [7]]
    assert second.completion_ids.tolist() == [[3, 3, 3], [4, 0, 0]]
    assert split_pairs(pair_batch(prompts, completions, [], 0), 2) == []


# --------------------------------------------------------------------------- loss


def _train_config(num_samples=4, micro_batch_size=4):
    return SimpleNamespace(
        rollout=SimpleNamespace(num_samples=num_samples, max_new_tokens=8, temperature=1.0, top_p=1.0, engine="native",
                                importance_correction="none", importance_cap=2.0),
        batch=SimpleNamespace(prompts_per_step=2, micro_batch_size=micro_batch_size),
        kernels=SimpleNamespace(backend="auto", tile_bytes=None),
        run=SimpleNamespace(seed=0, num_log_samples=2),
    )


def test_loss_hand_value_and_share_of_global_normaliser():
    # hidden = 0: every token has log-prob -log V. Chosen has 2 tokens, rejected 3.
    vocab, size = 11, 4
    algo = IterativeDPO(DPOConfig(beta=0.1), _train_config())
    batch = pair_batch([[1]], [[[2, 3], [4, 5, 6]]], [Pair(0, 0, 1, 1.0)], pad_token_id=0)
    log_v = math.log(vocab)
    # h = (pi_w - ref_w) - (pi_l - ref_l) = 0 - (-3 log V - (-3 log V + 2)) = 2
    batch.data["ref_logp"] = torch.tensor([-2 * log_v, -3 * log_v + 2.0])
    hidden = torch.zeros(2, 3, size)
    weight = torch.randn(vocab, size, requires_grad=True)
    assert algo.normalizer(batch) == 1.0
    out = algo.loss(hidden, weight, batch, normalizer=4.0)  # 3 more pairs elsewhere in the step
    expected = math.log1p(math.exp(-0.1 * 2)) / 4  # -log sigmoid(beta h), a quarter of the step
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-6)
    assert out.metrics["dpo/reward_margin"] == pytest.approx(0.2 / 4, rel=1e-5)
    assert out.metrics["dpo/reward_accuracy"] == pytest.approx(1 / 4)
    out.loss.backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()


def test_nll_weight_adds_the_chosen_per_token_nll_to_each_pair():
    # hidden = 0: every token has log-prob -log V, so the chosen answer's NLL per token is log V
    vocab, size = 11, 4
    batch = pair_batch([[1]], [[[2, 3], [4, 5, 6]]], [Pair(0, 0, 1, 1.0)], pad_token_id=0)
    log_v = math.log(vocab)
    batch.data["ref_logp"] = torch.tensor([-2 * log_v, -3 * log_v + 2.0])  # h = 2, as above
    hidden, weight = torch.zeros(2, 3, size), torch.randn(vocab, size)
    plain = IterativeDPO(DPOConfig(beta=0.1), _train_config()).loss(hidden, weight, batch, normalizer=4.0)
    out = IterativeDPO(DPOConfig(beta=0.1, nll_weight=0.5), _train_config()).loss(hidden, weight, batch, normalizer=4.0)
    assert float(out.loss) == pytest.approx(float(plain.loss) + 0.5 * log_v / 4, rel=1e-6)
    assert out.metrics["dpo/nll_chosen"] == pytest.approx(log_v / 4, rel=1e-5)
    assert "dpo/nll_chosen" not in plain.metrics and "dpo/reward_margin" in out.metrics


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_loss_matches_dpo_loss_on_summed_logprobs(loss_type):
    from npu_rft_kernels import dpo_loss

    torch.manual_seed(0)
    vocab, size = 13, 6
    smoothing = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
    algo = IterativeDPO(DPOConfig(beta=0.5, loss_type=loss_type, label_smoothing=smoothing), _train_config())
    completions = [[[2, 3], [4, 5, 6]], [[7], [8, 9]]]
    pairs = [Pair(0, 0, 1, 1.0), Pair(1, 1, 0, 0.5)]
    batch = pair_batch([[1], [1, 2]], completions, pairs, pad_token_id=0)
    batch.data["ref_logp"] = torch.randn(4)
    hidden = torch.randn(4, batch.completion_ids.shape[1], size)
    weight = torch.randn(vocab, size) * 0.5
    logp = torch.log_softmax(hidden @ weight.T, dim=-1).gather(-1, batch.completion_ids[..., None])[..., 0]
    seq = (logp * batch.loss_mask).sum(1)
    ref = batch.data["ref_logp"]
    expected, _ = dpo_loss(seq[:2], seq[2:], ref[:2], ref[2:], beta=0.5, loss_type=loss_type,
                           label_smoothing=smoothing)
    out = algo.loss(hidden, weight, batch, normalizer=2.0)
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-5)


def test_micro_batch_must_hold_a_pair():
    with pytest.raises(ValueError, match="micro_batch_size=1"):
        IterativeDPO(DPOConfig(), _train_config(micro_batch_size=1))


# --------------------------------------------------------------------------- iterations


class FakeContext:
    """The loop's services with fixed rollouts: prompt p's sample k is the
    completion [10 + k] * (k + 1) and scores ``score(p, k)``; the policy's
    log-prob of every token is ``-0.5 * (calls to logprobs so far + 1)``."""

    def __init__(self, prompts_per_batch: int, k: int, score):
        self.step, self.rank, self.world_size, self.pad_token_id = 0, 0, 1, 0
        self.device, self.tokenizer = get_device("cpu"), None
        self.prompts_per_batch, self.k, self.score = prompts_per_batch, k, score
        self.drawn = 0
        self.calls = {"rollout": 0, "grade": 0, "logprobs": 0, "reference": 0}
        self.open_stages: List[str] = []
        self.stages_at_logprobs: List[List[str]] = []

    @contextlib.contextmanager
    def timed(self, stage):
        self.open_stages.append(stage)
        try:
            yield
        finally:
            self.open_stages.pop()

    def next_prompts(self) -> List[Prompt]:
        out = [Example(context=f"q{self.drawn + i}", target="t", meta={"id": self.drawn + i})
               for i in range(self.prompts_per_batch)]
        self.drawn += self.prompts_per_batch
        return [Prompt(e, [1, 2 + int(e.meta["id"])]) for e in out]

    def rollout(self, prompt_ids, params):
        self.calls["rollout"] += 1
        assert params.num_samples == self.k
        index = [p for p in range(len(prompt_ids)) for _ in range(self.k)]
        ids = [[10 + k] * (k + 1) for _ in prompt_ids for k in range(self.k)]
        return SimpleNamespace(prompt_index=index, completion_ids=ids, truncated=[False] * len(ids))

    def decode(self, ids):
        return f"{ids[0]}x{len(ids)}"

    def grade(self, examples, completions):
        self.calls["grade"] += 1
        rewards = [self.score(int(e.meta["id"]), int(c.split("x")[0]) - 10) for e, c in zip(examples, completions)]
        return Grades(torch.tensor(rewards), {"g": rewards}, {"g": [False] * len(rewards)})

    def logprobs(self, batches, *, reference=False):
        self.stages_at_logprobs.append(list(self.open_stages))
        self.calls["logprobs"] += 1
        self.calls["reference"] += int(reference)
        value = -0.5 * self.calls["logprobs"]
        return [torch.full(mb.completion_ids.shape, value) * mb.completion_mask for mb in batches]

    def all_gather(self, obj):
        return [obj]


def _score(prompt: int, sample: int) -> float:
    # prompt 1 ties; otherwise sample (prompt % 3) is best and the others score 0.
    if prompt % 4 == 1:
        return 0.5
    return 1.0 if sample == prompt % 3 else 0.0


def _algo(k=4, **dpo):
    return IterativeDPO(DPOConfig(**{"epochs": 2, "batches_per_iteration": 2, **dpo}), _train_config(num_samples=k))


def test_iteration_rolls_out_once_and_caches_reference_once():
    algo, ctx = _algo(), FakeContext(prompts_per_batch=2, k=4, score=_score)
    plans = []
    for step in range(4):  # one iteration: 2 batches x 2 epochs
        ctx.step = step
        plans.append(algo.make_batches(ctx))
    assert ctx.calls == {"rollout": 2, "grade": 2, "logprobs": 1, "reference": 0}
    assert ctx.stages_at_logprobs == [[]]  # timed once, by the loop's logprobs, not also as "advantage"
    first = plans[0].metrics
    # prompts 0, 2, 3 pair up; prompt 1 ties
    assert (first["dpo/pairs"], first["dpo/tied_prompts"], first["dpo/score_gap"]) == (3.0, 1.0, 1.0)
    assert first["reward/mean"] == pytest.approx((3 * 1.0 + 4 * 0.5) / 16)  # one 1.0 in each paired prompt
    assert [p.metrics["dpo/epoch"] for p in plans] == [0.0, 0.0, 1.0, 1.0]
    # the reference is a fresh snapshot of the policy at the iteration's first step only
    assert [p.metrics["dpo/reference_refresh"] for p in plans] == [1.0, 0.0, 0.0, 0.0]
    # two sample pairs (run.num_log_samples), logged with any step of the iteration
    assert plans[0].samples == plans[3].samples
    assert [(r["id"], r["chosen"], r["rejected"]) for r in plans[0].samples] == [("0", "10x1", "11x2"),
                                                                                ("2", "12x3", "10x1")]
    # each epoch covers both prompt batches once
    assert sorted(id(p.micro_batches) for p in plans[:2]) == sorted(id(p.micro_batches) for p in plans[2:])
    # batch of prompts 0, 1: one pair, prompt 0's sample 0 (len 1) over sample 1 (len 2)
    mbs = algo.batches[0]
    assert len(mbs) == 1 and mbs[0].completion_ids.tolist() == [[10, 0], [11, 11]]
    # reference: the policy at the iteration start, summed over each completion
    assert mbs[0].data["ref_logp"].tolist() == [-0.5, -1.0]
    ctx.step = 4
    algo.make_batches(ctx)  # the next iteration rolls out again, with a fresh reference
    assert ctx.calls == {"rollout": 4, "grade": 4, "logprobs": 2, "reference": 0}
    # prompt 4: sample 1 (2 tokens) over sample 0 (1 token), at -0.5 * 2 per token now
    assert algo.batches[0][0].data["ref_logp"].tolist() == [-2.0, -1.0]


def test_length_tie_break_rejects_the_longest_of_the_worst():
    # prompt 0: sample 0 scores 1, samples 1-3 (lengths 2-4) score 0: the rejected one is now sample 3
    algo, ctx = _algo(tie_break="length"), FakeContext(prompts_per_batch=2, k=4, score=_score)
    algo.make_batches(ctx)
    assert algo.batches[0][0].completion_ids.tolist() == [[10, 0, 0, 0], [13, 13, 13, 13]]
    assert _algo().config.tie_break == "first"


def test_initial_reference_uses_the_loops_reference():
    algo, ctx = _algo(reference="initial"), FakeContext(2, 4, _score)
    assert algo.needs_reference and not _algo().needs_reference
    plan = algo.make_batches(ctx)
    assert ctx.calls["reference"] == 1
    assert plan.metrics["dpo/reference_refresh"] == 0.0  # the initial model: never refreshed


def test_all_pairs_micro_batches_hold_chosen_then_rejected():
    algo, ctx = _algo(k=3, pairing="all_pairs", batches_per_iteration=1), FakeContext(1, 3, lambda p, k: float(k))
    plan = algo.make_batches(ctx)
    # scores 0 < 1 < 2: pairs (1, 0), (2, 0), (2, 1); 2 pairs per micro-batch of 4 rows
    assert [mb.rows for mb in plan.micro_batches] == [4, 2]
    assert plan.micro_batches[0].completion_ids[:, 0].tolist() == [11, 12, 10, 10]
    assert plan.micro_batches[1].completion_ids[:, 0].tolist() == [12, 11]
    assert plan.metrics["dpo/pairs"] == 3.0


def test_resume_inside_an_iteration_continues_it():
    algo, ctx = _algo(), FakeContext(2, 4, _score)
    for step in range(2):
        ctx.step = step
        algo.make_batches(ctx)
    state = algo.state_dict()
    resumed, fresh_ctx = _algo(), FakeContext(2, 4, _score)
    with pytest.raises(RuntimeError, match="inside DPO iteration 0"):
        fresh_ctx.step = 2
        resumed.make_batches(fresh_ctx)
    resumed.load_state_dict(type(state)(dict(state.tensors), dict(state.meta)))
    for step in (2, 3):
        ctx.step = fresh_ctx.step = step
        want, got = algo.make_batches(ctx), resumed.make_batches(fresh_ctx)
        assert len(want.micro_batches) == len(got.micro_batches)
        for a, b in zip(want.micro_batches, got.micro_batches):
            for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "loss_mask"):
                assert torch.equal(getattr(a, name), getattr(b, name))
            assert torch.equal(a.data["ref_logp"], b.data["ref_logp"])
        assert got.samples == want.samples  # the iteration's sample pairs, for samples.jsonl
    assert fresh_ctx.calls == {"rollout": 0, "grade": 0, "logprobs": 0, "reference": 0}


def test_state_of_another_layout_is_rejected():
    algo, ctx = _algo(), FakeContext(2, 4, _score)
    algo.make_batches(ctx)
    with pytest.raises(ValueError, match="batches_per_iteration=3"):
        _algo(batches_per_iteration=3).load_state_dict(algo.state_dict())


def test_total_steps_are_whole_iterations():
    algo = _algo()  # 2 prompts per step, 2 batches per iteration, 2 epochs
    assert algo.total_steps(num_examples=8, epochs=1) == 8  # 4 batches = 2 iterations of 4 steps
    assert algo.total_steps(num_examples=10, epochs=1) == 12  # 5 batches -> 3 iterations
    assert algo.position(5) == (1, 0, 1)


# --------------------------------------------------------------------------- the loop


def test_tiny_model_iterative_dpo_raises_the_reward(tiny_model_dir, tmp_path):
    """3 iterations (2 prompt batches x 2 epochs each) of full fine-tuning on a
    learnable reward (the fraction of digits in the completion): the mean
    reward of each iteration's rollouts rises, and the loss is a saw-tooth
    that restarts at log 2 at every iteration (the reference is reset)."""
    import json

    from helpers import example_rows, tiny_train_config, write_jsonl

    from npu_rft.config import TrainConfig
    from npu_rft.trainer import fit

    train = write_jsonl(tmp_path / "train.jsonl", example_rows(32))
    cfg = tiny_train_config(tiny_model_dir, train, tmp_path / "run", overrides={
        "model": {"name_or_path": str(tiny_model_dir), "finetune": "full"},
        "rollout": {"num_samples": 8, "max_new_tokens": 6},
        "algorithm": "dpo",
        "dpo": {"beta": 0.1, "epochs": 2, "batches_per_iteration": 2},
        "optim": {"lr": 3e-2},
        "schedule": {"steps": 12},
        "batch": {"prompts_per_step": 4, "micro_batch_size": 8},
        "run": {"output_dir": str(tmp_path / "run"), "device": "cpu", "progress_bar": False, "tensorboard": False,
                "log_samples_every": 0},
    })
    del cfg["grpo"]
    fit(from_dict(TrainConfig, cfg))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    starts = [r for r in records if "reward/mean" in r]
    assert [r["step"] for r in starts] == [1, 5, 9]
    rewards = [r["reward/mean"] for r in starts]
    assert rewards[0] < rewards[1] < rewards[2] and rewards[2] > 0.2, rewards
    for r in starts:  # policy = reference at an iteration's first update
        assert r["loss"] == pytest.approx(math.log(2), abs=1e-4)
        assert r["dpo/reward_margin"] == pytest.approx(0.0, abs=1e-4)
    for step in (4, 8, 12):  # and its pairs are fitted by the iteration's end
        assert records[step - 1]["loss"] < math.log(2) - 0.01


def test_engine_logprobs_give_the_mismatch_and_weight_both_sums_under_tis():
    # trainer log-probs -1 everywhere; the engine's make the chosen row's ratios 2 and 1/4
    # (tis cap 1.5: weights 1.5 and 1/4), every other token agrees (weight 1)
    config = _train_config()
    config.rollout = SimpleNamespace(num_samples=4, max_new_tokens=8, temperature=1.0, top_p=1.0, engine="vllm",
                                     importance_correction="tis", importance_cap=1.5)
    algo = IterativeDPO(DPOConfig(beta=0.1), config)
    engine = [[[-1.0 - math.log(2.0), -1.0 + math.log(4.0)], [-1.0, -1.0, -1.0]]]
    batch = pair_batch([[1]], [[[2, 3], [4, 5, 6]]], [Pair(0, 0, 1, 1.0)], pad_token_id=0, logprobs=engine)
    algo.batches = [[batch]]

    class Ctx:
        device = get_device("cpu")

        def logprobs(self, batches, *, reference=False, temperature=1.0):
            return [torch.full(mb.completion_ids.shape, -1.0) for mb in batches]

    parts = algo._cache_reference_logprobs(Ctx())
    assert batch.data["is_weight"][0, :2].tolist() == pytest.approx([1.5, 0.25])
    # reference sums weighted alike: chosen -(1.5 + 0.25), rejected -3
    assert batch.data["ref_logp"].tolist() == pytest.approx([-1.75, -3.0])
    assert parts[0]["tokens"] == 5 and parts[0]["abs_max"] == pytest.approx(math.log(4.0))
