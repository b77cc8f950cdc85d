"""GRPO and DPO losses: hand-derived values, aggregation, metrics, fused versions."""
from __future__ import annotations

import math

import pytest
import torch

from npu_rft_kernels import dpo_loss, fused_linear_dpo_loss, fused_linear_grpo_loss, fused_logprob, grpo_loss


def _two_tokens(advantage):
    # ratios 1.5 and 0.5 against old_logp = 0; eps_low 0.2, eps_high 0.28
    logp = torch.tensor([[math.log(1.5), math.log(0.5)]], requires_grad=True)
    return logp, torch.zeros(1, 2), torch.tensor([advantage]), torch.ones(1, 2)


def test_grpo_clipped_surrogate_positive_advantage():
    logp, old, adv, mask = _two_tokens(1.0)
    loss, metrics = grpo_loss(logp, old, adv, mask)
    # token 1: min(1.5, clip 1.28) = 1.28 (high clip); token 2: min(0.5, 0.8) = 0.5
    assert loss.item() == pytest.approx(-(1.28 + 0.5) / 2, abs=1e-6)
    assert metrics == {"clip/low_frac": 0.0, "clip/high_frac": 0.5}
    loss.backward()
    # clipped token: no gradient; unclipped: d(-r A / 2)/dlogp = -r A / 2 = -0.25
    assert logp.grad[0].tolist() == pytest.approx([0.0, -0.25], abs=1e-6)


def test_grpo_clipped_surrogate_negative_advantage():
    logp, old, adv, mask = _two_tokens(-1.0)
    loss, metrics = grpo_loss(logp, old, adv, mask)
    # token 1: -min(-1.5, -1.28) = 1.5; token 2: -min(-0.5, -0.8) = 0.8 (low clip)
    assert loss.item() == pytest.approx((1.5 + 0.8) / 2, abs=1e-6)
    assert metrics == {"clip/low_frac": 0.5, "clip/high_frac": 0.0}


def test_grpo_k3_kl():
    logp = torch.zeros(1, 1)
    ref = torch.full((1, 1), math.log(2.0))
    loss, metrics = grpo_loss(logp, logp, torch.zeros(1), torch.ones(1, 1), ref_logp=ref, beta=0.1)
    kl = 2.0 - math.log(2.0) - 1.0  # exp(d) - d - 1 with d = log 2
    assert metrics["kl/mean"] == pytest.approx(kl, abs=1e-6)
    assert loss.item() == pytest.approx(0.1 * kl, abs=1e-6)


def test_grpo_aggregations_and_global_normalizer():
    # ratio 1 everywhere, so the per-token loss is -A: row 0 gives -1, -1; row 1 gives -2.
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, 2.0])

    def agg(aggregation, normalizer=None):
        return grpo_loss(logp, logp, adv, mask, aggregation=aggregation, normalizer=normalizer)[0].item()

    assert agg("token_mean") == pytest.approx(-4 / 3)
    assert agg("token_mean", normalizer=10) == pytest.approx(-0.4)
    assert agg("seq_mean_token_mean") == pytest.approx((-1 + -2) / 2)
    assert agg("seq_mean_token_mean", normalizer=6) == pytest.approx(-3 / 6)
    assert agg("seq_mean_token_sum_norm") == pytest.approx(-4 / (2 * 3))  # local: B * T
    assert agg("seq_mean_token_sum_norm", normalizer=8) == pytest.approx(-0.5)


def test_grpo_micro_batches_with_global_normalizer_equal_one_batch():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(4, 5, generator=g).requires_grad_()
    old, adv = torch.randn(4, 5, generator=g), torch.randn(4, generator=g)
    mask = (torch.rand(4, 5, generator=g) > 0.3).float()
    whole, _ = grpo_loss(logp, old, adv, mask)
    (grad_whole,) = torch.autograd.grad(whole, logp)
    total = float(mask.sum())
    parts = [grpo_loss(logp[i : i + 2], old[i : i + 2], adv[i : i + 2], mask[i : i + 2], normalizer=total)[0] for i in (0, 2)]
    (grad_parts,) = torch.autograd.grad(sum(parts), logp)
    assert sum(parts).item() == pytest.approx(whole.item(), abs=1e-6)
    assert torch.allclose(grad_parts, grad_whole, atol=1e-7)


def test_grpo_extreme_ratio_has_finite_gradient():
    logp = torch.tensor([[100.0, -100.0]], requires_grad=True)
    loss, _ = grpo_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), ref_logp=torch.zeros(1, 2), beta=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()


def test_grpo_rejects_bad_options():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="token_mean"):
        grpo_loss(x, x, torch.zeros(1), x, aggregation="mean")
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(x, x, torch.zeros(2), x)


# DPO: policy_chosen -1, policy_rejected -2, refs -1.5, beta 0.1
# -> chosen reward 0.05, rejected -0.05, h = 1, beta h = 0.1
LOG_SIG_POS = math.log(1 / (1 + math.exp(-0.1)))  # log sigmoid(0.1)  = -0.644397
LOG_SIG_NEG = math.log(1 / (1 + math.exp(0.1)))  # log sigmoid(-0.1) = -0.744397


@pytest.mark.parametrize(
    "loss_type, smoothing, expected",
    [
        ("sigmoid", 0.0, -LOG_SIG_POS),  # 0.644397
        ("sigmoid", 0.1, -0.9 * LOG_SIG_POS - 0.1 * LOG_SIG_NEG),  # 0.654397
        ("ipo", 0.0, (1.0 - 1 / 0.2) ** 2),  # 16
        ("hinge", 0.0, 0.9),
        ("robust", 0.1, (-0.9 * LOG_SIG_POS + 0.1 * LOG_SIG_NEG) / 0.8),  # 0.631897
    ],
)
def test_dpo_loss_types(loss_type, smoothing, expected):
    t = torch.tensor
    loss, metrics = dpo_loss(
        t([-1.0]), t([-2.0]), t([-1.5]), t([-1.5]), beta=0.1, loss_type=loss_type, label_smoothing=smoothing
    )
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert metrics["rewards/chosen"] == pytest.approx(0.05)
    assert metrics["rewards/rejected"] == pytest.approx(-0.05)
    assert metrics["rewards/accuracy"] == 1.0
    assert metrics["rewards/margin"] == pytest.approx(0.1)


def test_dpo_rejects_bad_options():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge, robust"):
        dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="0.5"):
        dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)


def test_dpo_nll_term_adds_weighted_chosen_nll_per_pair():
    t = torch.tensor
    args = (t([-1.0, -3.0]), t([-2.0, -1.0]), t([-1.5, -2.0]), t([-1.5, -1.0]))
    plain, _ = dpo_loss(*args, beta=0.1)
    nll = t([0.4, 1.2])  # per-token NLL of each pair's chosen answer
    loss, metrics = dpo_loss(*args, beta=0.1, nll_chosen=nll, nll_weight=0.5)
    assert loss.item() == pytest.approx(plain.item() + 0.5 * 0.8, abs=1e-6)  # + 0.5 x mean(0.4, 1.2)
    assert metrics["nll/chosen"] == pytest.approx(0.8)
    # weight 0 leaves the loss alone, but still reports the NLL it was given
    loss0, metrics0 = dpo_loss(*args, beta=0.1, nll_chosen=nll, nll_weight=0.0)
    assert loss0.item() == pytest.approx(plain.item(), abs=1e-7) and metrics0["nll/chosen"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="nll_chosen of shape"):
        dpo_loss(*args, nll_weight=1.0)
    with pytest.raises(ValueError, match="nll_weight=-1"):
        dpo_loss(*args, nll_chosen=nll, nll_weight=-1)


def _lm(b, t, h, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, h, generator=g), torch.randn(v, h, generator=g) * 0.5, torch.randint(0, v, (b, t), generator=g)


def test_fused_linear_grpo_equals_grpo_on_naive_logprobs():
    hidden, weight, targets = _lm(3, 7, 16, 50)
    mask = torch.ones(3, 7)
    mask[:, :2] = 0  # prompt
    with torch.no_grad():
        base = fused_logprob(hidden, weight, targets, temperature=0.7, backend="naive")
    g = torch.Generator().manual_seed(1)
    old = base + 0.3 * torch.randn(3, 7, generator=g)  # ratios around 1, some clipped
    ref = base + 0.3 * torch.randn(3, 7, generator=g)
    adv = torch.tensor([1.0, -0.5, 0.2])
    opts = dict(ref_logp=ref, beta=0.05, aggregation="seq_mean_token_mean")
    h1 = hidden.clone().requires_grad_()
    loss, metrics = fused_linear_grpo_loss(
        h1, weight, targets, old, adv, mask, temperature=0.7, return_entropy=True, backend="torch", **opts
    )
    loss.backward()
    h2 = hidden.clone().requires_grad_()
    logp, ent = fused_logprob(h2, weight, targets, temperature=0.7, return_entropy=True, backend="naive")
    ref_loss, ref_metrics = grpo_loss(logp * mask, old, adv, mask, **opts)
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    assert torch.allclose(h1.grad, h2.grad, atol=1e-6)
    assert metrics["entropy/mean"] == pytest.approx(float((ent.detach() * mask).sum() / mask.sum()), abs=1e-5)
    assert float(metrics["kl/mean"]) == pytest.approx(float(ref_metrics["kl/mean"]), abs=1e-6)


def test_fused_linear_grpo_without_old_logp_is_reinforce():
    # old_logp=None: r = exp(logp - logp.detach()) = 1 (never clipped), so each
    # token's loss is -A, with gradient -A dlogp. Tokens: 2 in row 0 (A = 1),
    # 1 in row 1 (A = -0.5); token_mean: loss = -(2 * 1 + 1 * -0.5) / 3 = -0.5.
    hidden, weight, targets = _lm(2, 3, 16, 50)
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    adv = torch.tensor([1.0, -0.5])
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, metrics = fused_linear_grpo_loss(h1, w1, targets, None, adv, mask, temperature=0.7, backend="torch")
    assert loss.item() == pytest.approx(-0.5, abs=1e-6)
    assert metrics == {"clip/low_frac": 0.0, "clip/high_frac": 0.0}
    loss.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = fused_logprob(h2, w2, targets, temperature=0.7, backend="naive")
    (-(adv.unsqueeze(1) * mask * logp).sum() / 3).backward()
    assert torch.allclose(h1.grad, h2.grad, atol=1e-6)
    assert torch.allclose(w1.grad, w2.grad, atol=1e-6)
    assert h1.grad.abs().sum() > 0


def test_fused_linear_dpo_equals_dpo_on_naive_sums():
    hc, weight, tc = _lm(2, 5, 8, 30, seed=1)
    hr, _, tr = _lm(2, 6, 8, 30, seed=2)
    tc[:, :2] = -100
    tr[:, :3] = -100
    ref_c, ref_r = torch.tensor([-3.0, -4.0]), torch.tensor([-5.0, -2.0])
    w1 = weight.clone().requires_grad_()
    loss, metrics = fused_linear_dpo_loss(hc, hr, w1, tc, tr, ref_c, ref_r, loss_type="robust", label_smoothing=0.1, backend="torch")
    loss.backward()
    w2 = weight.clone().requires_grad_()
    pc = fused_logprob(hc, w2, tc, backend="naive").sum(-1)
    pr = fused_logprob(hr, w2, tr, backend="naive").sum(-1)
    ref_loss, ref_metrics = dpo_loss(pc, pr, ref_c, ref_r, loss_type="robust", label_smoothing=0.1)
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    assert torch.allclose(w1.grad, w2.grad, atol=1e-6)
    assert {k: float(v) for k, v in metrics.items()} == pytest.approx({k: float(v) for k, v in ref_metrics.items()}, abs=1e-6)


def test_fused_linear_dpo_nll_term_is_the_chosen_per_token_nll():
    # the chosen rows hold 3 and 1 target tokens; the NLL term averages each row over its own tokens
    hc, weight, tc = _lm(2, 5, 8, 30, seed=3)
    hr, _, tr = _lm(2, 4, 8, 30, seed=4)
    tc[0, :2] = -100
    tc[1, :4] = -100
    tr[:, :1] = -100
    ref_c, ref_r = torch.tensor([-3.0, -4.0]), torch.tensor([-5.0, -2.0])
    w1 = weight.clone().requires_grad_()
    loss, metrics = fused_linear_dpo_loss(hc, hr, w1, tc, tr, ref_c, ref_r, nll_weight=2.0, backend="torch")
    loss.backward()
    w2 = weight.clone().requires_grad_()
    lc = fused_logprob(hc, w2, tc, backend="naive")
    pr = fused_logprob(hr, w2, tr, backend="naive").sum(-1)
    nll = -lc.sum(-1) / torch.tensor([3.0, 1.0])
    plain, _ = dpo_loss(lc.sum(-1), pr, ref_c, ref_r)
    (plain + 2.0 * nll.mean()).backward()
    assert loss.item() == pytest.approx(float(plain + 2.0 * nll.mean()), abs=1e-6)
    assert float(metrics["nll/chosen"]) == pytest.approx(float(nll.mean()), abs=1e-6)
    assert torch.allclose(w1.grad, w2.grad, atol=1e-6)
    # the term raises the chosen answers: its own gradient is that of -sum(logp_chosen / tokens)
    w3 = weight.clone().requires_grad_()
    only, _ = fused_linear_dpo_loss(hc, hr, w3, tc, tr, ref_c, ref_r, nll_weight=1.0, backend="torch")
    w4 = weight.clone().requires_grad_()
    base, _ = fused_linear_dpo_loss(hc, hr, w4, tc, tr, ref_c, ref_r, backend="torch")
    only.backward()
    base.backward()
    w5 = weight.clone().requires_grad_()
    (-(fused_logprob(hc, w5, tc, backend="naive").sum(-1) / torch.tensor([3.0, 1.0])).mean()).backward()
    assert torch.allclose(w3.grad - w4.grad, w5.grad, atol=1e-6)


def test_fused_linear_dpo_weights_each_tokens_log_prob():
    # zero hidden states: every token's log-prob is -log V; the weighted sums are
    # -log V * (1 + 0.5) for chosen and -log V * (0 + 1 + 2) for rejected, so with zero
    # reference sums h = 1.5 log V and the sigmoid loss is -log s(beta h).
    vocab, beta = 7, 0.1
    hidden = torch.zeros(1, 3, 4)
    weight = torch.randn(vocab, 4)
    chosen_t, rejected_t = torch.tensor([[1, 2, -100]]), torch.tensor([[3, 4, 5]])
    zero = torch.zeros(1)
    loss, _ = fused_linear_dpo_loss(hidden, hidden, weight, chosen_t, rejected_t, zero, zero, beta=beta,
                                    weights_chosen=torch.tensor([[1.0, 0.5, 9.0]]),
                                    weights_rejected=torch.tensor([[0.0, 1.0, 2.0]]))
    h = 1.5 * math.log(vocab)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-beta * h))), rel=1e-5)
    with pytest.raises(ValueError, match="both weights_chosen and weights_rejected, or neither"):
        fused_linear_dpo_loss(hidden, hidden, weight, chosen_t, rejected_t, zero, zero,
                              weights_chosen=torch.ones(1, 3))


def test_grpo_loss_token_weights_must_match():
    logp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="token_weights \\(2, 2\\) must match"):
        grpo_loss(logp, logp, torch.zeros(2), torch.ones(2, 3, dtype=torch.bool), token_weights=torch.ones(2, 2))
