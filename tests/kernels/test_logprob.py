"""fused_logprob, every backend against an fp64 oracle (materialised log_softmax + gather).

Errors are relative in norm: |x - x_ref| / |x_ref|, over forward values and
gradients, with random upstream gradients on both log-prob and entropy.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import torch_npu_stand_in
from npu_rft_kernels import fused_logprob, torch_npu_api
from npu_rft_kernels.logprob.torch_chunked import MIN_TILE_COLS, TorchTileOps, plan_tiles

IGNORE = -100
HAS_TRITON = importlib.util.find_spec("triton") is not None
# Triton runs on a GPU when there is one, else in its interpreter on CPU
# (slow: these tests keep its shapes small). Set before the kernels are defined.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if HAS_TRITON and TRITON_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")


_STAND_IN_TORCH_NPU = torch_npu_stand_in.make_module()


def online_max_sum_stand_in(*args):
    """``torch_npu_api.online_max_sum`` (what dispatch passes the npu backend) over
    the STAND-IN torch_npu (tests/torch_npu_stand_in.py), NOT the real op: its
    documented math, bound by the wheel's schema, refusing fp32 as the real op
    does, so the npu backend's logic runs on CPU."""
    online_max_sum_stand_in.calls += 1
    before = sys.modules.get("torch_npu")
    sys.modules["torch_npu"] = _STAND_IN_TORCH_NPU
    try:
        return torch_npu_api.online_max_sum(*args)
    finally:
        if before is None:
            del sys.modules["torch_npu"]
        else:
            sys.modules["torch_npu"] = before


online_max_sum_stand_in.calls = 0


def stream_fn(hidden, weight, targets, tile_bytes=None, **kw):
    """The triton backend's streaming mode (it has no tile budget to honour)."""
    return fused_logprob(hidden, weight, targets, backend="triton", tile_bytes=0, **kw)


def backend_fn(name):
    """``(fn(hidden, weight, targets, **kw), device)`` for a backend under test."""
    if name == "triton-stream":
        return stream_fn, TRITON_DEVICE
    if name == "npu":
        from npu_rft_kernels.logprob.npu import npu_logprob

        return functools.partial(npu_logprob, online_max_sum=online_max_sum_stand_in), "cpu"
    device = TRITON_DEVICE if name == "triton" else "cpu"
    return functools.partial(fused_logprob, backend=name), device


def tile_ops(name):
    """The ``TileOps`` class a backend's tiled path uses."""
    if name == "triton":
        from npu_rft_kernels.logprob.triton import TritonTileOps

        return TritonTileOps
    return TorchTileOps


TRITON_MARKS = [pytest.mark.triton, pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")]
BACKENDS = ["torch", pytest.param("triton", marks=TRITON_MARKS), pytest.param("triton-stream", marks=TRITON_MARKS), "npu"]


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


def run(fn, hidden, weight, targets, g_logp, g_entropy, *, frozen, entropy, temperature, device="cpu", **kw):
    """Forward + backward of sum(g_logp * logp + g_entropy * entropy): values and grads (on CPU)."""
    h = hidden.detach().clone().to(device).requires_grad_(True)
    w = weight.detach().clone().to(device).requires_grad_(not frozen)
    out = fn(h, w, targets.to(device), temperature=temperature, ignore_index=IGNORE, return_entropy=entropy, **kw)
    logp, ent = out if entropy else (out, None)
    loss = (logp * g_logp.to(device, logp.dtype)).sum()
    if entropy:
        loss = loss + (ent * g_entropy.to(device, ent.dtype)).sum()
    loss.backward()
    result = {"logp": logp, "entropy": ent, "dh": h.grad, "dw": None if frozen else w.grad}
    return {k: None if v is None else v.detach().cpu() for k, v in result.items()}


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
    tile_bytes = 100 * tile_ops(backend).bytes_per_elem(torch.float32, entropy, frozen)
    fn, device = backend_fn(backend)
    kw = dict(frozen=frozen, entropy=entropy, temperature=temperature)
    got = run(fn, hidden, weight, targets, g_logp, g_entropy, device=device, tile_bytes=tile_bytes, **kw)
    ref = run(oracle_fn, hidden.double(), weight.double(), targets, g_logp.double(), g_entropy.double(), **kw)
    assert all(e < 1e-5 for e in errors(got, ref).values()), errors(got, ref)
    assert (got["logp"][targets == IGNORE] == 0).all() and got["logp"].dtype == torch.float32
    if entropy:
        assert (got["entropy"][targets == IGNORE] == 0).all()
    assert (got["dh"][targets == IGNORE] == 0).all()


# A low-precision backend's relative error may be at most this multiple of naive's.
LOW_PRECISION_SLACK = 2.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "entropy"])
def test_low_precision_no_worse_than_naive(backend, dtype, frozen, entropy):
    hidden, weight, targets, g_logp, g_entropy = make_inputs(64, 48, 300, dtype, seed=1)
    kw = dict(frozen=frozen, entropy=entropy, temperature=0.7)
    fn, device = backend_fn(backend)
    naive, _ = backend_fn("naive")
    ref = run(oracle_fn, hidden.double(), weight.double(), targets, g_logp.double(), g_entropy.double(), **kw)
    got = errors(run(fn, hidden, weight, targets, g_logp, g_entropy, device=device, tile_bytes=4096, **kw), ref)
    base = errors(run(naive, hidden, weight, targets, g_logp, g_entropy, **kw), ref)
    # Relative to naive's own error (1e-4 to 1e-2 here): on CPU every backend is
    # (triton in its interpreter) within 0.3x-1.3x of it; a backend twice as
    # inexact as naive fails.
    assert all(got[k] <= LOW_PRECISION_SLACK * base[k] for k in got), (got, base)


@pytest.mark.parametrize("backend", BACKENDS)
def test_qwen_vocab_151936(backend, monkeypatch):
    if backend == "triton-stream" and TRITON_DEVICE == "cpu":  # wide blocks: fewer interpreted steps
        from npu_rft_kernels.logprob import triton_stream

        wide = triton_stream.StreamBlocks(fwd_v=2048, dh_v=2048, dw_v=1024, dw_m=16)
        monkeypatch.setattr(triton_stream, "DEFAULT_BLOCKS", wide)
    hidden, weight, targets, g_logp, g_entropy = make_inputs(6, 8, 151936, torch.float32, seed=2)
    kw = dict(frozen=False, entropy=True, temperature=1.0)
    fn, device = backend_fn(backend)
    got = run(fn, hidden, weight, targets, g_logp, g_entropy, device=device, tile_bytes=2**20, **kw)
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


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "no-grad"])
def test_npu_backend_uses_the_fused_op_where_it_fits(frozen):
    """bf16, no entropy, trainable head or no gradient: the stand-in op computes the statistics."""
    hidden, weight, targets, g_logp, g_entropy = make_inputs(40, 16, 200, torch.bfloat16, seed=4)
    fn, _ = backend_fn("npu")
    online_max_sum_stand_in.calls = 0
    if frozen:
        with torch.no_grad():
            logp = fn(hidden, weight, targets, temperature=0.7, ignore_index=IGNORE, tile_bytes=4 * 40 * 64)
        assert rel(logp, oracle(hidden, weight, targets, 0.7)[0]) < 1e-2
    else:
        kw = dict(frozen=False, entropy=False, temperature=0.7)
        ref = run(oracle_fn, hidden.double(), weight.double(), targets, g_logp.double(), g_entropy.double(), **kw)
        got = run(fn, hidden, weight, targets, g_logp, g_entropy, tile_bytes=4 * 40 * 64, **kw)
        assert all(e < 1e-2 for e in errors(got, ref).values()), errors(got, ref)
    n_valid = int((targets != IGNORE).sum())  # 20: the fused op sees only valid tokens
    rows, cols = plan_tiles(n_valid, 200, 4 * 40 * 64, 4)
    assert online_max_sum_stand_in.calls == -(-n_valid // rows) * -(-200 // cols) > 1


def test_npu_backend_serves_the_lora_loss_and_logs_its_paths(caplog):
    """A frozen head (LoRA) with gradients for the hidden states reaches the fused op too;
    an entropy request does not, and the log says so once per path."""
    from npu_rft_kernels.logprob import npu as npu_module

    npu_module._LOGGED.clear()
    hidden, weight, targets, g_logp, _ = make_inputs(40, 16, 200, torch.bfloat16, seed=5)
    fn, _ = backend_fn("npu")
    online_max_sum_stand_in.calls = 0
    h = hidden.clone().requires_grad_()
    with caplog.at_level("INFO", logger="npu_rft_kernels.logprob.npu"):
        logp = fn(h, weight, targets, temperature=0.7, ignore_index=IGNORE, tile_bytes=4 * 40 * 64)
        (logp.float() * g_logp.float()).sum().backward()
        fn(hidden, weight, targets, temperature=0.7, ignore_index=IGNORE, return_entropy=True)
        fn(hidden, weight, targets, temperature=0.7, ignore_index=IGNORE, return_entropy=True)
    assert online_max_sum_stand_in.calls > 1 and weight.grad is None
    hd = hidden.double().requires_grad_()
    (oracle(hd, weight.double(), targets, 0.7)[0] * g_logp.double()).sum().backward()
    assert rel(h.grad.double(), hd.grad) < 2e-2
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["npu log-prob backend, loss, frozen head: torch_npu's fused online max-sum op",
                     "npu log-prob backend, no-grad pass: the tiled torch path, because an entropy was asked for, "
                     "which the op does not give"]


def test_frozen_head_gets_no_gradient():
    hidden, weight, targets, _, _ = make_inputs(8, 8, 40, torch.float32)
    h = hidden.clone().requires_grad_()
    fused_logprob(h, weight, targets, backend="torch").sum().backward()
    assert weight.grad is None and h.grad is not None


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0
        self.largest_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                if t.layout == torch.strided and not t.is_mkldnn:
                    self.largest_bytes = max(self.largest_bytes, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "entropy"])  # fast path / generic path
def test_never_materialises_the_logits(frozen, entropy):
    n, h, v = 256, 8, 4000  # N x V = 1,024,000; V x H (dW) = 32,000
    hidden, weight, targets, g_logp, g_entropy = make_inputs(n, h, v, torch.float32)
    hidden.requires_grad_()
    weight.requires_grad_(not frozen)
    budget = 64 * 1024
    with _LargestTensor() as mode:
        out = fused_logprob(hidden, weight, targets, return_entropy=entropy, backend="torch", tile_bytes=budget)
        logp, ent = out if entropy else (out, torch.zeros(()))
        ((logp * g_logp).sum() + (ent * g_entropy).sum()).backward()
    assert mode.largest <= max(budget // 4, v * h, n * h)


def test_plan_tiles_respects_the_budget():
    assert plan_tiles(1024, 151936, 12 * 1024 * 2048, 12) == (1024, 2048)
    assert plan_tiles(10, 300, 10**9, 12) == (10, 300)  # everything fits in one tile
    rows, cols = plan_tiles(100_000, 151936, 12 * 2**20, 12)  # too many tokens: split them
    assert cols >= MIN_TILE_COLS and rows * cols <= 2**20
    assert plan_tiles(1024, 151936, 12 * 1024 * 1000, 12) == (1024, 896)  # rounded to a multiple of 128
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


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
def test_streaming_mode_allocates_only_per_token_statistics(frozen):
    """tile_bytes=0: no torch tensor beyond the inputs' sizes and a few [S, n] fp32 partials
    (in bytes: the interpreter views the arguments' storage as bytes)."""
    n, h, v = 256, 16, 3000
    hidden, weight, targets, g_logp, g_entropy = make_inputs(n, h, v, torch.float32)
    hidden = hidden.to(TRITON_DEVICE).requires_grad_()
    weight = weight.to(TRITON_DEVICE).requires_grad_(not frozen)
    with _LargestTensor() as mode:
        logp, ent = stream_fn(hidden, weight, targets.to(TRITON_DEVICE), return_entropy=True)
        ((logp * g_logp.to(TRITON_DEVICE)).sum() + (ent * g_entropy.to(TRITON_DEVICE)).sum()).backward()
    assert mode.largest_bytes <= 4 * max(v * h, 4 * 64 * n)  # dW, or the forward's partials (<= 64 slices)
    assert mode.largest_bytes < 4 * n * v / 8


def test_zero_tile_budget_is_the_streaming_mode_only():
    hidden, weight, targets, _, _ = make_inputs(4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="backend='triton'"):
        fused_logprob(hidden, weight, targets, backend="torch", tile_bytes=0)
    with pytest.raises(ValueError, match="must be positive"):
        fused_logprob(hidden, weight, targets, backend="torch", tile_bytes=-1)
