"""The ``triton`` log-prob backend: the tiled algorithm of ``torch_chunked``
with its per-tile elementwise work fused into two Triton kernels.

The GEMMs stay with ``torch.mm`` (cuBLAS on CUDA); the kernels replace the
chain of torch elementwise passes over each logits tile:

* ``_online_update_kernel`` reads a logits tile once to fold it into the
  running max / sum-exp / sum-exp*z of each token and, in the frozen-head
  mode, reads it a second time to write ``p = exp(z - m)`` and
  ``p (z - c)`` in the GEMM dtype for the accumulator GEMMs;
* ``_grad_logits_kernel`` turns a recomputed logits tile into
  ``dz = -p (g + k (z - E_p[z]))`` in place.

Written to stay portable to triton-ascend: a persistent grid of at most
``MAX_PROGRAMS`` programs, each looping over rows; blocks of ``BLOCK``
columns; int32 offsets throughout (a tile holds < 2**31 elements, checked); only
``tl.exp`` and plain arithmetic, no CUDA-only intrinsics. On CPU it runs
under ``TRITON_INTERPRET=1`` (the tests).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from npu_rft_kernels.logprob import triton_stream
from npu_rft_kernels.logprob.torch_chunked import run_tiled, scatter_tokens, valid_tokens

MAX_PROGRAMS = 4096
BLOCK = 1024


@triton.jit
def _online_update_kernel(
    z_ptr, p_ptr, pz_ptr, m_ptr, s_ptr, a_ptr, c_ptr, alpha_ptr,
    n_rows, n_cols,
    ENTROPY: tl.constexpr, WANT_P: tl.constexpr, CENTRE: tl.constexpr, BLOCK: tl.constexpr,
):
    cols = tl.arange(0, BLOCK)
    for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        base = row * n_cols
        # Pass 1: lane-wise online max / sum-exp / sum-exp*z over the row of the tile.
        lane_m = tl.full((BLOCK,), float("-inf"), tl.float32)
        lane_s = tl.zeros((BLOCK,), tl.float32)
        lane_a = tl.zeros((BLOCK,), tl.float32)
        for c0 in range(0, n_cols, BLOCK):
            mask = c0 + cols < n_cols
            z = tl.load(z_ptr + base + c0 + cols, mask=mask, other=float("-inf")).to(tl.float32)
            new_m = tl.maximum(lane_m, z)
            ref = tl.where(new_m == float("-inf"), 0.0, new_m)  # lanes that saw no column yet
            scale = tl.exp(lane_m - ref)
            e = tl.exp(z - ref)
            lane_s = lane_s * scale + e
            if ENTROPY:
                lane_a = lane_a * scale + e * tl.where(mask, z, 0.0)  # e = 0 off the tile
            lane_m = new_m
        tile_m = tl.max(lane_m, axis=0)
        lane_w = tl.exp(lane_m - tile_m)
        m_old = tl.load(m_ptr + row)
        m_new = tl.maximum(m_old, tile_m)
        alpha = tl.exp(m_old - m_new)
        beta = tl.exp(tile_m - m_new)
        s_new = tl.load(s_ptr + row) * alpha + tl.sum(lane_s * lane_w, axis=0) * beta
        tl.store(m_ptr + row, m_new)
        tl.store(s_ptr + row, s_new)
        tl.store(alpha_ptr + row, alpha)
        centre = 0.0
        if ENTROPY:
            a_new = tl.load(a_ptr + row) * alpha + tl.sum(lane_a * lane_w, axis=0) * beta
            tl.store(a_ptr + row, a_new)
            if CENTRE:
                centre = a_new / s_new
                tl.store(c_ptr + row, centre)
        # Pass 2: the GEMM operands p = exp(z - m_new) and p (z - centre).
        if WANT_P:
            for c0 in range(0, n_cols, BLOCK):
                mask = c0 + cols < n_cols
                z = tl.load(z_ptr + base + c0 + cols, mask=mask, other=0.0).to(tl.float32)
                p = tl.exp(z - m_new)
                tl.store(p_ptr + base + c0 + cols, p.to(p_ptr.dtype.element_ty), mask=mask)
                if CENTRE:
                    tl.store(pz_ptr + base + c0 + cols, (p * (z - centre)).to(pz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_logits_kernel(
    z_ptr, lse_ptr, mean_z_ptr, g_ptr, k_ptr,
    n_rows, n_cols,
    ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    cols = tl.arange(0, BLOCK)
    for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        base = row * n_cols
        lse = tl.load(lse_ptr + row)
        g = tl.load(g_ptr + row)
        k = 0.0
        mean_z = 0.0
        if ENTROPY:
            k = tl.load(k_ptr + row)
            mean_z = tl.load(mean_z_ptr + row)
        for c0 in range(0, n_cols, BLOCK):
            mask = c0 + cols < n_cols
            z = tl.load(z_ptr + base + c0 + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(z - lse)
            if ENTROPY:
                dz = -p * (g + k * (z - mean_z))
            else:
                dz = -p * g
            tl.store(z_ptr + base + c0 + cols, dz.to(z_ptr.dtype.element_ty), mask=mask)


def _grid(n_rows: int) -> Tuple[int]:
    return (max(1, min(n_rows, MAX_PROGRAMS)),)


class TritonTileOps:
    """``TileOps`` (see ``torch_chunked``) with fused Triton kernels; tiles stay
    in the input dtype, statistics are fp32."""

    @staticmethod
    def bytes_per_elem(dtype: torch.dtype, entropy: bool, accumulate: bool) -> int:
        """Tiles in the input dtype: the logits (``dz`` in place), and with
        ``accumulate`` also ``p`` and, with entropy, ``p (z - c)``."""
        return dtype.itemsize * (1 + accumulate + (accumulate and entropy))

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        if numel >= 2**31:
            raise ValueError(f"a tile of {numel} elements overflows int32 offsets; pass a smaller tile_bytes")
        self.dtype = dtype
        self._z = torch.empty(numel, dtype=dtype, device=device)
        self._p: Optional[torch.Tensor] = None
        self._pz: Optional[torch.Tensor] = None

    def logits(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.mm(h, w.t(), out=self._z[: h.shape[0] * w.shape[0]].view(h.shape[0], w.shape[0]))

    def online_update(self, z, m, s, a, c, want_p):
        alpha = torch.empty_like(m)
        p = pz = None
        if want_p:
            if self._p is None:
                self._p = torch.empty_like(self._z)
            p = self._p[: z.numel()].view_as(z)
        if c is not None:
            if self._pz is None:
                self._pz = torch.empty_like(self._z)
            pz = self._pz[: z.numel()].view_as(z)
        rows, cols = z.shape
        _online_update_kernel[_grid(rows)](
            z, z if p is None else p, z if pz is None else pz, m, s, s if a is None else a, s if c is None else c,
            alpha, rows, cols,
            ENTROPY=a is not None, WANT_P=want_p, CENTRE=c is not None, BLOCK=BLOCK,
        )
        return alpha, p, pz

    def grad_logits(self, z, lse, mean_z, g, k):
        rows, cols = z.shape
        entropy = k is not None
        _grad_logits_kernel[_grid(rows)](
            z, lse, mean_z if entropy else lse, g, k if entropy else g, rows, cols, ENTROPY=entropy, BLOCK=BLOCK
        )
        return z

    def gemm_operand(self, x: torch.Tensor) -> torch.Tensor:
        return x


def triton_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    entropy_grad: bool = True,
    tile_bytes: Optional[int] = None,
):
    """The ``triton`` backend of ``fused_logprob``. With a tile budget, the
    tiled algorithm of the ``torch`` backend (see ``torch_chunked``) with fused
    tile kernels; with ``tile_bytes=0``, the streaming kernels of
    ``triton_stream``, which keep no logits tile in memory at all."""
    if tile_bytes == 0:
        return stream_logprob(
            hidden, weight, targets, temperature=temperature, ignore_index=ignore_index,
            return_entropy=return_entropy, entropy_grad=entropy_grad,
        )
    return run_tiled(
        hidden,
        weight,
        targets,
        temperature=temperature,
        ignore_index=ignore_index,
        return_entropy=return_entropy,
        entropy_grad=entropy_grad,
        ops_cls=TritonTileOps,
        tile_bytes=tile_bytes,
    )


def stream_logprob(
    hidden, weight, targets, *, temperature, ignore_index, return_entropy, entropy_grad,
    blocks: Optional[triton_stream.StreamBlocks] = None,
):
    """``fused_logprob`` through the streaming kernels (``triton_stream``);
    ``blocks`` defaults to ``triton_stream.DEFAULT_BLOCKS``."""
    blocks = blocks or triton_stream.DEFAULT_BLOCKS
    h, t, index = valid_tokens(hidden, targets, temperature, ignore_index)
    why = triton_stream.check_offsets(h.shape[0], h.shape[1], weight.shape[0])
    if why is not None:
        raise ValueError(f"fused_logprob: {why}; pass a tile budget (tile_bytes > 0) to use the tiled kernels")
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        out = triton_stream.StreamLogprob.apply(h, weight, t, return_entropy, entropy_grad, blocks)
        logp, entropy = out if return_entropy else (out, None)
    else:
        with torch.no_grad():
            res = triton_stream.stream_forward(h, weight, t.to(torch.int32), entropy=return_entropy, blocks=blocks)
        logp, entropy = res["logp"], res.get("entropy")
    logp = scatter_tokens(logp, index, targets.shape)
    if not return_entropy:
        return logp
    return logp, scatter_tokens(entropy, index, targets.shape)
