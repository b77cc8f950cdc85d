"""The ``triton`` backend's streaming mode: the logits never leave the chip.

The tiled mode (``triton.py``) writes each logits tile to device memory for
cuBLAS and the fused elementwise kernels; its memory is the tile budget. This
mode computes every [BM x BV] logits block with ``tl.dot`` inside the kernel
that consumes it, flash-attention style, so what it stores beyond its inputs
and the gradients it returns is O(N) fp32 per-token statistics:

* ``_fwd_kernel``: a program takes BM tokens and a contiguous slice of the
  vocabulary, and folds each logits block into running (max, sum-exp,
  sum-exp*z, target logit). The slices' partials ([S, N] each) are merged on
  the host side in torch: ``lse``, ``logp``, ``E_p[z]`` and the entropy.
* ``_dh_kernel``: a program owns BM tokens and BH columns of ``dh``; it walks
  the whole vocabulary, recomputes the logits block, turns it into
  ``dz = g (onehot - p) - k p (z - E_p[z])`` and accumulates ``dz @ W[:, cols]``
  in registers, then writes its ``dh`` block once.
* ``_dw_kernel``: the same with the roles swapped: a program owns BV rows and
  BH columns of ``dW`` and walks the tokens.

GEMM work, in units of 2NHV: forward 1, ``dh`` 1 + ceil(H/BH) (the logits are
recomputed once per column block), ``dW`` the same with its own BH. With
BH >= H that is 3 for a frozen head and 5 for a trainable one, against the
tiled mode's 2 and 4: the price of not storing anything.

Portability to triton-ascend, as in ``triton.py``: a 1-D persistent grid of
at most ``MAX_PROGRAMS`` programs looping over tasks, power-of-two blocks,
int32 offsets (checked on the host), ``tl.dot``/``tl.exp``/plain arithmetic.
fp32 inputs use ``input_precision="ieee"`` (no TF32), so fp32 stays exact to
~1e-6 at the cost of speed; bf16/fp16 accumulate in fp32 and feed the second
GEMM of each backward step with ``dz`` rounded to the input dtype, as a
materialised bf16 backward would. Runs on CPU under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

MAX_PROGRAMS = 65535


@dataclass(frozen=True)
class StreamBlocks:
    """Block sizes (powers of two) of the streaming kernels.

    ``fwd_m``/``fwd_v``: the forward's token and vocabulary blocks;
    ``dh_m``/``dh_v``/``dh_h``: tokens, vocabulary step and ``dh`` columns per
    program; ``dw_v``/``dw_m``/``dw_h``: ``dW`` rows, token step and columns.
    Per kernel, ``*_k`` is the reduction step over H of each logits block,
    ``*_warps`` the warps per program and ``*_stages`` the software-pipelining
    depth. The defaults are the fastest of a sweep on an H200 (bf16, H=896,
    V=151,936; docs/kernels.md).
    """

    fwd_m: int = 256
    fwd_v: int = 128
    fwd_k: int = 32
    fwd_warps: int = 8
    fwd_stages: int = 4
    dh_m: int = 64
    dh_v: int = 64
    dh_h: int = 512
    dh_k: int = 128
    dh_warps: int = 8
    dh_stages: int = 4
    dw_v: int = 64
    dw_m: int = 64
    dw_h: int = 512
    dw_k: int = 128
    dw_warps: int = 8
    dw_stages: int = 3
    # forward programs per streaming multiprocessor (vocabulary slices fill the rest)
    fwd_waves: int = 4


DEFAULT_BLOCKS = StreamBlocks()


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST (the CPU interpreter only, whose tl.dot mishandles
    16-bit floats) multiplies the same rounded operands in fp32."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _logits_block(h_ptr, w_ptr, offs_m, offs_v, mask_m, mask_v, H, BM: tl.constexpr, BV: tl.constexpr,
                  BK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """z[BM, BV] = h[offs_m] @ W[offs_v].T in fp32 (K loop over H)."""
    acc = tl.zeros((BM, BV), tl.float32)
    for k0 in range(0, H, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < H
        a = tl.load(h_ptr + offs_m[:, None] * H + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_ptr + offs_v[:, None] * H + offs_k[None, :], mask=mask_v[:, None] & mask_k[None, :], other=0.0)
        acc = _dot(a, tl.trans(b), acc, PRECISION, UPCAST)
    return acc


@triton.jit
def _grad_logits(z, offs_v, mask_v, tgt, lse, g, k, mean_z, ENTROPY: tl.constexpr):
    """d(g logp + k entropy)/dz for a logits block (0 on padded vocabulary)."""
    p = tl.where(mask_v[None, :], tl.exp(z - lse[:, None]), 0.0)
    dz = tl.where(offs_v[None, :] == tgt[:, None], g[:, None], 0.0) - p * g[:, None]
    if ENTROPY:
        dz -= k[:, None] * p * (tl.where(mask_v[None, :], z, 0.0) - mean_z[:, None])
    return dz


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, t_ptr, m_out, s_out, a_out, zt_out, N, V, H, n_split, blocks_per_split,
                ENTROPY: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr):
    n_vb = tl.cdiv(V, BV)
    for task in range(tl.program_id(0), tl.cdiv(N, BM) * n_split, tl.num_programs(0)):
        split = task % n_split
        offs_m = (task // n_split) * BM + tl.arange(0, BM)
        mask_m = offs_m < N
        tgt = tl.load(t_ptr + offs_m, mask=mask_m, other=-1)
        run_m = tl.full((BM,), float("-inf"), tl.float32)
        run_s = tl.zeros((BM,), tl.float32)
        run_a = tl.zeros((BM,), tl.float32)
        z_t = tl.zeros((BM,), tl.float32)
        vb0 = split * blocks_per_split
        for vb in range(vb0, tl.minimum(vb0 + blocks_per_split, n_vb)):
            offs_v = vb * BV + tl.arange(0, BV)
            mask_v = offs_v < V
            z = _logits_block(h_ptr, w_ptr, offs_m, offs_v, mask_m, mask_v, H, BM, BV, BK, PRECISION, UPCAST)
            z = tl.where(mask_v[None, :], z, float("-inf"))
            new_m = tl.maximum(run_m, tl.max(z, axis=1))
            alpha = tl.exp(run_m - new_m)
            e = tl.exp(z - new_m[:, None])
            run_s = run_s * alpha + tl.sum(e, axis=1)
            if ENTROPY:
                run_a = run_a * alpha + tl.sum(e * tl.where(mask_v[None, :], z, 0.0), axis=1)
            z_t += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
            run_m = new_m
        out = split * N + offs_m
        tl.store(m_out + out, run_m, mask=mask_m)
        tl.store(s_out + out, run_s, mask=mask_m)
        tl.store(zt_out + out, z_t, mask=mask_m)
        if ENTROPY:
            tl.store(a_out + out, run_a, mask=mask_m)


@triton.jit
def _dh_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, g_ptr, k_ptr, mz_ptr, dh_ptr, N, V, H,
               ENTROPY: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
               BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr):
    n_hb = tl.cdiv(H, BH)
    for task in range(tl.program_id(0), tl.cdiv(N, BM) * n_hb, tl.num_programs(0)):
        offs_m = (task // n_hb) * BM + tl.arange(0, BM)
        offs_h = (task % n_hb) * BH + tl.arange(0, BH)
        mask_m = offs_m < N
        mask_h = offs_h < H
        tgt = tl.load(t_ptr + offs_m, mask=mask_m, other=-1)
        lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
        g = tl.load(g_ptr + offs_m, mask=mask_m, other=0.0)
        k = g
        mean_z = g
        if ENTROPY:
            k = tl.load(k_ptr + offs_m, mask=mask_m, other=0.0)
            mean_z = tl.load(mz_ptr + offs_m, mask=mask_m, other=0.0)
        acc = tl.zeros((BM, BH), tl.float32)
        for vb in range(0, tl.cdiv(V, BV)):
            offs_v = vb * BV + tl.arange(0, BV)
            mask_v = offs_v < V
            z = _logits_block(h_ptr, w_ptr, offs_m, offs_v, mask_m, mask_v, H, BM, BV, BK, PRECISION, UPCAST)
            dz = _grad_logits(z, offs_v, mask_v, tgt, lse, g, k, mean_z, ENTROPY)
            w = tl.load(w_ptr + offs_v[:, None] * H + offs_h[None, :], mask=mask_v[:, None] & mask_h[None, :], other=0.0)
            acc = _dot(dz.to(w.dtype), w, acc, PRECISION, UPCAST)
        tl.store(dh_ptr + offs_m[:, None] * H + offs_h[None, :], acc.to(dh_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_h[None, :])


@triton.jit
def _dw_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, g_ptr, k_ptr, mz_ptr, dw_ptr, N, V, H,
               ENTROPY: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
               BV: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr):
    n_hb = tl.cdiv(H, BH)
    for task in range(tl.program_id(0), tl.cdiv(V, BV) * n_hb, tl.num_programs(0)):
        offs_v = (task // n_hb) * BV + tl.arange(0, BV)
        offs_h = (task % n_hb) * BH + tl.arange(0, BH)
        mask_v = offs_v < V
        mask_h = offs_h < H
        acc = tl.zeros((BV, BH), tl.float32)
        for mb in range(0, tl.cdiv(N, BM)):
            offs_m = mb * BM + tl.arange(0, BM)
            mask_m = offs_m < N
            tgt = tl.load(t_ptr + offs_m, mask=mask_m, other=-1)
            lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
            g = tl.load(g_ptr + offs_m, mask=mask_m, other=0.0)
            k = g
            mean_z = g
            if ENTROPY:
                k = tl.load(k_ptr + offs_m, mask=mask_m, other=0.0)
                mean_z = tl.load(mz_ptr + offs_m, mask=mask_m, other=0.0)
            z = _logits_block(h_ptr, w_ptr, offs_m, offs_v, mask_m, mask_v, H, BM, BV, BK, PRECISION, UPCAST)
            dz = _grad_logits(z, offs_v, mask_v, tgt, lse, g, k, mean_z, ENTROPY)
            h = tl.load(h_ptr + offs_m[:, None] * H + offs_h[None, :], mask=mask_m[:, None] & mask_h[None, :], other=0.0)
            acc = _dot(tl.trans(dz.to(h.dtype)), h, acc, PRECISION, UPCAST)
        tl.store(dw_ptr + offs_v[:, None] * H + offs_h[None, :], acc.to(dw_ptr.dtype.element_ty),
                 mask=mask_v[:, None] & mask_h[None, :])


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit inputs


def _programs(tasks: int) -> tuple:
    return (max(1, min(tasks, MAX_PROGRAMS)),)


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few slices, so the merge is exercised


def check_offsets(n: int, h: int, v: int) -> Optional[str]:
    """Why int32 offsets cannot address these shapes, or None."""
    if max(n, v) * h >= 2**31:
        return f"N*H or V*H >= 2**31 ({n}x{h}, {v}x{h}) overflows the streaming kernels' int32 offsets"
    return None


def stream_forward(h, weight, t, *, entropy: bool, blocks: StreamBlocks = DEFAULT_BLOCKS):
    """``{"logp", "lse", "entropy", "mean_z"}`` (fp32 [n]) of valid tokens, temperature applied to ``h``."""
    n, hs = h.shape
    v = weight.shape[0]
    h, weight = h.contiguous(), weight.contiguous()
    n_vb = triton.cdiv(v, blocks.fwd_v)
    n_mb = triton.cdiv(n, blocks.fwd_m)
    want = blocks.fwd_waves * _multiprocessors(h.device)
    n_split = max(1, min(n_vb, triton.cdiv(want, n_mb)))
    per_split = triton.cdiv(n_vb, n_split)
    n_split = triton.cdiv(n_vb, per_split)  # no empty slice
    parts = torch.empty(4 if entropy else 3, n_split, n, dtype=torch.float32, device=h.device)
    m, s, zt = parts[0], parts[1], parts[2]
    a = parts[3] if entropy else s
    _fwd_kernel[_programs(n_mb * n_split)](
        h, weight, t, m, s, a, zt, n, v, hs, n_split, per_split,
        ENTROPY=entropy, PRECISION=_precision(h.dtype), UPCAST=_interpreted(),
        BM=blocks.fwd_m, BV=blocks.fwd_v, BK=blocks.fwd_k, num_warps=blocks.fwd_warps, num_stages=blocks.fwd_stages,
    )
    top = m.max(dim=0).values
    w = torch.exp(m - top)
    total = (s * w).sum(0)
    lse = top + torch.log(total)
    out = {"logp": zt.sum(0) - lse, "lse": lse}
    if entropy:
        out["mean_z"] = (a * w).sum(0) / total
        out["entropy"] = lse - out["mean_z"]
    return out


def stream_backward(h, weight, t, lse, mean_z, g, k, *, need_h: bool, need_w: bool,
                    blocks: StreamBlocks = DEFAULT_BLOCKS):
    """``(dh, dW)`` of ``sum(g logp + k entropy)`` (None where not needed), in the input dtype."""
    n, hs = h.shape
    v = weight.shape[0]
    h, weight = h.contiguous(), weight.contiguous()
    entropy = k is not None
    g = torch.zeros_like(lse) if g is None else g.float().contiguous()
    k = k.float().contiguous() if entropy else g
    mean_z = mean_z if entropy else g
    common = dict(ENTROPY=entropy, PRECISION=_precision(h.dtype), UPCAST=_interpreted())
    dh = dw = None
    if need_h:
        dh = torch.empty_like(h)
        bh = max(16, min(blocks.dh_h, triton.next_power_of_2(hs)))
        tasks = triton.cdiv(n, blocks.dh_m) * triton.cdiv(hs, bh)
        _dh_kernel[_programs(tasks)](
            h, weight, t, lse, g, k, mean_z, dh, n, v, hs, BM=blocks.dh_m, BV=blocks.dh_v, BH=bh, BK=blocks.dh_k,
            num_warps=blocks.dh_warps, num_stages=blocks.dh_stages, **common,
        )
    if need_w:
        dw = torch.empty_like(weight)
        bh = max(16, min(blocks.dw_h, triton.next_power_of_2(hs)))
        tasks = triton.cdiv(v, blocks.dw_v) * triton.cdiv(hs, bh)
        _dw_kernel[_programs(tasks)](
            h, weight, t, lse, g, k, mean_z, dw, n, v, hs, BV=blocks.dw_v, BM=blocks.dw_m, BH=bh, BK=blocks.dw_k,
            num_warps=blocks.dw_warps, num_stages=blocks.dw_stages, **common,
        )
    return dh, dw


class StreamLogprob(torch.autograd.Function):
    """Autograd wrapper of ``stream_forward``/``stream_backward`` for valid
    tokens: saves ``h``, ``weight``, ``targets`` and two fp32 [n] statistics."""

    @staticmethod
    def forward(ctx, h, weight, targets, entropy, entropy_grad, blocks):
        t = targets.to(torch.int32)
        out = stream_forward(h, weight, t, entropy=entropy, blocks=blocks)
        ctx.set_materialize_grads(False)
        ctx.blocks = blocks
        ctx.save_for_backward(h, weight, t, out["lse"], out.get("mean_z"))
        if not entropy:
            return out["logp"]
        if not entropy_grad:
            ctx.mark_non_differentiable(out["entropy"])
        return out["logp"], out["entropy"]

    @staticmethod
    def backward(ctx, g, k=None):
        h, weight, t, lse, mean_z = ctx.saved_tensors
        dh, dw = stream_backward(
            h, weight, t, lse, mean_z, g, k,
            need_h=ctx.needs_input_grad[0], need_w=ctx.needs_input_grad[1], blocks=ctx.blocks,
        )
        return dh, dw, None, None, None, None
