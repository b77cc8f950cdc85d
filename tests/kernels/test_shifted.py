"""The torch backend's CPU fast path (``logprob/shifted.py``) and ``entropy_grad``.

Values and gradients against the fp64 oracle of test_logprob.py, in the
cases the fast path handles specially: a later tile whose logits overflow
the fixed shift, token blocks, oneDNN absent, and the frozen-head entropy
without gradient (which must save the entropy-gradient GEMM).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from npu_rft_kernels import fused_logprob
from npu_rft_kernels.logprob import shifted
from npu_rft_kernels.logprob.torch_chunked import TorchTileOps, plan_tiles
from tests.kernels.test_logprob import BACKENDS, IGNORE, backend_fn, errors, make_inputs, oracle, oracle_fn, rel, run

MODES = [("frozen", True), ("trainable", False)]
TILE_BYTES = 4 * 20 * 512


class _Spy:
    def __init__(self, monkeypatch, module, name):
        self.calls = 0
        real = getattr(module, name)

        def spy(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)


def overflowing_inputs():
    """Logits of order 1 in the first tiles and of 150 in the last one for
    some tokens: the first tile's max is a shift that the last tile overflows.
    With ``TILE_BYTES``: 20 valid tokens x 512 columns, tiles 512 + 512 + 176."""
    hidden, weight, targets, g_logp, g_entropy = make_inputs(40, 16, 1200, torch.float32, seed=5, head_scale=0.1)
    unit = hidden[1::2][:14] / hidden[1::2][:14].norm(dim=1, keepdim=True)
    weight[-14:] = unit * 150.0  # z = 150 |h_i| for valid token i = 2j + 1 at vocab row 1186 + j
    targets[3] = 1187  # one target among the huge logits
    return hidden, weight, targets, g_logp, g_entropy


@pytest.mark.parametrize("mode,frozen", MODES, ids=[m for m, _ in MODES])
def test_overflowing_tile_is_redone_with_a_larger_shift(monkeypatch, mode, frozen):
    hidden, weight, targets, g_logp, g_entropy = overflowing_inputs()
    spy = _Spy(monkeypatch, shifted, "_raise_shift")
    kw = dict(frozen=frozen, entropy=False, temperature=1.0)
    fn, _ = backend_fn("torch")
    got = run(fn, hidden, weight, targets, g_logp, g_entropy, tile_bytes=TILE_BYTES, **kw)
    ref = run(oracle_fn, hidden.double(), weight.double(), targets, g_logp.double(), g_entropy.double(), **kw)
    assert spy.calls >= 1  # the last tile overflowed the first tile's shift
    assert all(torch.isfinite(v).all() for v in got.values() if v is not None)
    assert all(e < 1e-5 for e in errors(got, ref).values()), errors(got, ref)


def test_overflowing_tile_no_grad_forward(monkeypatch):
    hidden, weight, targets, _, _ = overflowing_inputs()
    spy = _Spy(monkeypatch, shifted, "_raise_shift")
    with torch.no_grad():
        logp = fused_logprob(hidden, weight, targets, backend="torch", tile_bytes=TILE_BYTES)
    assert spy.calls >= 1
    assert rel(logp, oracle(hidden, weight, targets, 1.0)[0]) < 1e-5


@pytest.mark.parametrize("mode,frozen", MODES, ids=[m for m, _ in MODES])
def test_without_onednn_the_plain_gemm_gives_the_same_answer(monkeypatch, mode, frozen):
    monkeypatch.setattr(shifted, "_ONEDNN", None)
    hidden, weight, targets, g_logp, g_entropy = make_inputs(47, 31, 123, torch.float32, seed=6)
    kw = dict(frozen=frozen, entropy=False, temperature=0.7)
    fn, _ = backend_fn("torch")
    got = run(fn, hidden, weight, targets, g_logp, g_entropy, tile_bytes=4 * 7 * 50, **kw)
    ref = run(oracle_fn, hidden.double(), weight.double(), targets, g_logp.double(), g_entropy.double(), **kw)
    assert all(e < 1e-5 for e in errors(got, ref).values()), errors(got, ref)


@pytest.mark.parametrize(
    "frozen,entropy,entropy_grad,fast",
    [
        (True, False, True, True),
        (False, False, True, True),
        (True, True, False, True),  # entropy for free from the accumulator
        (True, True, True, False),  # its gradient needs the generic path's extra GEMM
        (False, True, False, False),
    ],
)
def test_which_path_runs(monkeypatch, frozen, entropy, entropy_grad, fast):
    spy = _Spy(monkeypatch, shifted, "shifted_forward")
    hidden, weight, targets, _, _ = make_inputs(16, 8, 60, torch.float32)
    h = hidden.requires_grad_()
    fused_logprob(h, weight.requires_grad_(not frozen), targets, return_entropy=entropy, entropy_grad=entropy_grad)
    assert spy.calls == int(fast)
    spy.calls = 0
    fused_logprob(hidden.bfloat16(), weight.bfloat16(), targets)  # bf16: never the fp32 fast path
    assert spy.calls == 0


@pytest.mark.parametrize("backend", ["naive"] + BACKENDS)
@pytest.mark.parametrize("mode,frozen", MODES, ids=[m for m, _ in MODES])
def test_entropy_without_gradient(backend, mode, frozen):
    """Same values as with the gradient, no autograd history, and the log-prob's
    gradients unchanged (here the loss uses only logp)."""
    hidden, weight, targets, g_logp, g_entropy = make_inputs(47, 31, 123, torch.float32, seed=7)
    fn, device = backend_fn(backend)
    h = hidden.clone().to(device).requires_grad_()
    w = weight.clone().to(device).requires_grad_(not frozen)
    logp, ent = fn(h, w, targets.to(device), temperature=0.7, ignore_index=IGNORE, return_entropy=True, entropy_grad=False)
    assert not ent.requires_grad and ent.grad_fn is None
    (logp * g_logp.to(device)).sum().backward()
    kw = dict(frozen=frozen, entropy=False, temperature=0.7)
    ref = run(oracle_fn, hidden.double(), weight.double(), targets, g_logp.double(), g_entropy.double(), **kw)
    ref_ent = oracle(hidden.double(), weight.double(), targets, 0.7)[1]
    assert rel(ent.detach().cpu(), ref_ent) < 1e-5
    assert rel(h.grad.cpu(), ref["dh"]) < 1e-5
    if not frozen:
        assert rel(w.grad.cpu(), ref["dw"]) < 1e-5


class _GemmCount(TorchDispatchMode):
    GEMMS = ("aten.mm.", "aten.addmm", "mkldnn._linear_pointwise")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(str(func).startswith(name) for name in self.GEMMS):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("entropy_grad,gemms_per_tile", [(False, 2), (True, 3)])
def test_frozen_entropy_without_gradient_saves_a_gemm(entropy_grad, gemms_per_tile):
    """Frozen head, forward + backward: logits and E_p[W] per tile; the
    entropy's gradient adds E_p[(z - c) W] (and needs the generic path)."""
    hidden, weight, targets, g_logp, _ = make_inputs(48, 16, 300, torch.float32)  # 24 valid tokens
    budget = 4 * 24 * 100
    per_elem = TorchTileOps.bytes_per_elem(torch.float32, True, True) if entropy_grad else 4
    rows, cols = plan_tiles(24, 300, budget, per_elem)
    h = hidden.requires_grad_()
    with _GemmCount() as counter:
        logp, ent = fused_logprob(h, weight, targets, return_entropy=True, entropy_grad=entropy_grad, tile_bytes=budget)
        (logp * g_logp).sum().backward()
    assert counter.count == -(-24 // rows) * -(-300 // cols) * gemms_per_tile
