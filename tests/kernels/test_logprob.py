"""fused_logprob, every backend against an fp64 oracle (materialised log_softmax + gather).

Errors are relative in norm: |x - x_ref| / |x_ref|, over forward values and
gradients, with random upstream gradients on both log-prob and entropy.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from npu_rft_kernels import fused_logprob
from npu_rft_kernels.logprob.torch_chunked import MIN_TILE_COLS, TorchTileOps, plan_tiles

IGNORE = -100
BACKENDS = ["torch"]


def oracle(hidden, weight, targets, temperature):
    """fp64 log p(target) and entropy, 0 at ignored tokens."""
    z = (hidden.double() @ weight.double().t()) / temperature
    logprobs = torch.log_softmax(z, dim=-1)
    valid = targets != IGNORE
    logp = logprobs.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1) * valid
    entropy = -(logprobs.exp() * logprobs).sum(-1) * valid
    return logp, entropy


def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def make_inputs(n, h, v, dtype, seed=0, head_scale=0.5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * head_scale).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::2] = IGNORE  # half of the tokens ignored
    g_logp = torch.randn(n, generator=g)
    g_entropy = torch.randn(n, generator=g)
    return hidden, weight, targets, g_logp, g_entropy


def run(fn, hidden, weight, targets, g_logp, g_entropy, *, frozen, entropy, temperature):
    """Forward + backward of sum(g_logp * logp + g_entropy * entropy): values and grads."""
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(not frozen)
    out = fn(h, w, targets, temperature=temperature, ignore_index=IGNORE, return_entropy=entropy)
    logp, ent = out if entropy else (out, None)
    loss = (logp * g_logp.to(logp.dtype)).sum()
    if entropy:
        loss = loss + (ent * g_entropy.to(ent.dtype)).sum()
    loss.backward()
    return {"logp": logp, "entropy": ent, "dh": h.grad, "dw": None if frozen else w.grad}


def errors(result, reference):
    return {k: rel(v, reference[k]) for k, v in result.items() if v is not None}


def oracle_fn(h, w, t, *, temperature, ignore_index, return_entropy):
    logp, ent = oracle(h, w, t, temperature)
    return (logp, ent) if return_entropy else logp


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "entropy"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fp32_odd_shapes_match_fp64_oracle(backend, frozen, entropy, temperature):
    hidden, weight, targets, g_logp, g_entropy = make_inputs(47, 31, 123, torch.float32)
    # 100 elements of budget: 1-row blocks of 100 + 23 columns, neither dividing its dimension.
    tile_bytes = 100 * TorchTileOps.bytes_per_elem

    def fn(h, w, t, **kw):
        return fused_logprob(h, w, t, backend=backend, tile_bytes=tile_bytes, **kw)

    kw = dict(frozen=frozen, entropy=entropy, temperature=temperature)
    got = run(fn, hidden, weight, targets, g_logp, g_entropy, **kw)
    ref = run(oracle_fn, hidden.double(), weight.double(), targets, g_logp.double(), g_entropy.double(), **kw)
    assert all(e < 1e-5 for e in errors(got, ref).values()), errors(got, ref)
    assert (got["logp"][targets == IGNORE] == 0).all() and got["logp"].dtype == torch.float32
    if entropy:
        assert (got["entropy"][targets == IGNORE] == 0).all()
    assert (got["dh"][targets == IGNORE] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
def test_low_precision_no_worse_than_naive(backend, dtype, frozen):
    hidden, weight, targets, g_logp, g_entropy = make_inputs(64, 48, 300, dtype, seed=1)
    kw = dict(frozen=frozen, entropy=True, temperature=0.7)

    def fn(h, w, t, **k):
        return fused_logprob(h, w, t, backend=backend, tile_bytes=4096, **k)

    def naive(h, w, t, **k):
        return fused_logprob(h, w, t, backend="naive", **k)

    ref = run(oracle_fn, hidden.double(), weight.double(), targets, g_logp.double(), g_entropy.double(), **kw)
    got = errors(run(fn, hidden, weight, targets, g_logp, g_entropy, **kw), ref)
    base = errors(run(naive, hidden, weight, targets, g_logp, g_entropy, **kw), ref)
    assert all(got[k] <= base[k] + 1e-2 for k in got), (got, base)


@pytest.mark.parametrize("backend", BACKENDS)
def test_qwen_vocab_151936(backend):
    hidden, weight, targets, g_logp, g_entropy = make_inputs(6, 8, 151936, torch.float32, seed=2)
    kw = dict(frozen=False, entropy=True, temperature=1.0)

    def fn(h, w, t, **k):
        return fused_logprob(h, w, t, backend=backend, tile_bytes=2**20, **k)

    got = run(fn, hidden, weight, targets, g_logp, g_entropy, **kw)
    ref = run(oracle_fn, hidden.double(), weight.double(), targets, g_logp.double(), g_entropy.double(), **kw)
    assert all(e < 1e-5 for e in errors(got, ref).values()), errors(got, ref)


def test_batched_shape_no_grad_and_entropy_only_gradient():
    hidden, weight, targets, _, g_entropy = make_inputs(24, 16, 50, torch.float32, seed=3)
    h3, t3 = hidden.view(2, 12, 16), targets.view(2, 12)
    with torch.no_grad():
        logp, ent = fused_logprob(h3.requires_grad_(), weight, t3, return_entropy=True, backend="torch")
    ref_logp, ref_ent = oracle(hidden, weight, targets, 1.0)
    assert logp.shape == (2, 12) and logp.grad_fn is None
    assert rel(logp.view(-1), ref_logp) < 1e-5 and rel(ent.view(-1), ref_ent) < 1e-5
    # Only the entropy feeds the loss: its gradient alone must come out.
    h = hidden.clone().requires_grad_()
    _, ent = fused_logprob(h, weight, targets, return_entropy=True, backend="torch")
    (ent * g_entropy).sum().backward()
    hd = hidden.double().requires_grad_()
    (oracle(hd, weight.double(), targets, 1.0)[1] * g_entropy.double()).sum().backward()
    assert rel(h.grad, hd.grad) < 1e-5


def test_frozen_head_gets_no_gradient():
    hidden, weight, targets, _, _ = make_inputs(8, 8, 40, torch.float32)
    h = hidden.clone().requires_grad_()
    fused_logprob(h, weight, targets, backend="torch").sum().backward()
    assert weight.grad is None and h.grad is not None


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
def test_never_materialises_the_logits(frozen):
    n, h, v = 256, 8, 4000  # N x V = 1,024,000; V x H (dW) = 32,000
    hidden, weight, targets, g_logp, g_entropy = make_inputs(n, h, v, torch.float32)
    hidden.requires_grad_()
    weight.requires_grad_(not frozen)
    budget = 64 * 1024
    with _LargestTensor() as mode:
        logp, ent = fused_logprob(hidden, weight, targets, return_entropy=True, backend="torch", tile_bytes=budget)
        ((logp * g_logp).sum() + (ent * g_entropy).sum()).backward()
    assert mode.largest <= max(budget // 4, v * h, n * h)


def test_plan_tiles_respects_the_budget():
    assert plan_tiles(1024, 151936, 12 * 1024 * 2048, 12) == (1024, 2048)
    assert plan_tiles(10, 300, 10**9, 12) == (10, 300)  # everything fits in one tile
    rows, cols = plan_tiles(100_000, 151936, 12 * 2**20, 12)  # too many tokens: split them
    assert cols >= MIN_TILE_COLS and rows * cols <= 2**20
    assert plan_tiles(47, 123, 1200, 12) == (1, 100)


def test_bad_inputs_say_what_and_how():
    hidden, weight, targets, _, _ = make_inputs(4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="outside \\[0, 10\\)"):
        fused_logprob(hidden, weight, torch.tensor([0, 1, 10, IGNORE]))
    with pytest.raises(ValueError, match="leading shape"):
        fused_logprob(hidden, weight, targets[:3])
    with pytest.raises(TypeError, match="same dtype"):
        fused_logprob(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="temperature"):
        fused_logprob(hidden, weight, targets, temperature=0.0)
