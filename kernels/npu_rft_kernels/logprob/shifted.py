"""The ``torch`` backend's fast path on CPU (fp32, no entropy gradient):
vocabulary-major tiles with a fixed per-token shift.

Same quantities as ``torch_chunked`` (``h`` tempered hidden states of the
valid tokens, ``z_v = h . W_v``, ``p = softmax(z)``), computed with fewer
passes over each tile and faster GEMMs:

* **Vocabulary-major tiles.** A tile is ``Z^T - b = W_tile @ h^T - b`` ([c, n]),
  with a per-token shift ``b`` added by the GEMM itself (its bias). On CPU the
  GEMM is oneDNN's linear with ``h`` packed once per call as its "weight": at
  H=896 it runs ~10% faster than ``torch.mm``'s MKL GEMM of the row-major
  tile, whose inner dimension of 896 suits MKL's blocking badly (measured
  in docs/kernels.md). Elsewhere (or without oneDNN) it is ``torch.addmm``.
* **Fixed shift in the forward.** Instead of an online max that rescales the
  running sums at every tile, the shift ``b`` is the first tile's per-token
  max and stays fixed: a tile costs one ``exp`` and one column sum,
  ``s += sum_v exp(z_v - b)``. A later logit more than ~88 above ``b`` would
  overflow fp32; the column sum then is not finite, and that tile (only) is
  redone with the larger shift and the sums rescaled: exact either way.
  Logits far below ``b`` underflow to 0, as in any softmax: ``s >= 1``.
* **Shift by lse in the backward.** With ``b = lse`` the tile becomes ``p``
  after one in-place ``exp``; the upstream gradient ``g`` goes into the small
  operands: ``dW_tile = P_tile^T (-g h)`` and ``dh = g W_t - g sum_v p_v W_v``.
  So the backward of a tile is GEMM, ``exp``, GEMM, GEMM: 4 GEMMs in all
  with the forward's one, and one elementwise pass per GEMM of logits.
* **Frozen head** (``accumulate``): the forward also accumulates
  ``sum_v exp(z_v - b) W_v`` (rescaled only on the rare overflow), giving
  ``dh = g (W_t - E_p[W])`` with no backward GEMM, and the entropy for free:
  ``E_p[z] = E_p[W] . h`` (no gradient: the entropy's gradient needs another
  GEMM, the generic path's).

Memory: one [c, n] fp32 tile at a time (a fresh tensor per GEMM: oneDNN's
linear has no ``out=``), ``c`` from the tile budget as in ``plan_tiles`` and
at most ``FROZEN_MAX_COLS`` / ``TRAINABLE_MAX_COLS``; the
per-token state is O(n x H). Checked against an fp64 oracle with the other
backends (tests/kernels/test_logprob.py), including overflowing logits.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from npu_rft_kernels.logprob.tiling import plan_tiles, tile_budget


def _onednn_linear():
    """oneDNN's dense fp32 linear (``x @ w^T + b``) and its weight packing, or None."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default, torch.ops.mkldnn._reorder_linear_weight.default
    except (AttributeError, RuntimeError):
        return None


_ONEDNN = _onednn_linear()


def onednn_pack(w: torch.Tensor, batch_hint: int) -> Optional[torch.Tensor]:
    """``w`` [out, in] packed as the weight of ``onednn_linear``, or None where
    oneDNN cannot take it (not CPU fp32, or no oneDNN in this torch). Also used
    by the trainer's sampler for its decode GEMMs."""
    if _ONEDNN is None or w.device.type != "cpu" or w.dtype != torch.float32:
        return None
    return _ONEDNN[1](w.detach(), batch_hint)


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ w^T + bias`` (a new tensor) for ``packed = onednn_pack(w, ...)``."""
    return _ONEDNN[0](x, packed, bias, "none", [], "")


# Vocabulary rows per tile at most, below what the byte budget allows when
# there are few tokens (a training micro-batch): more only holds memory. At
# N=1024, H=896 the frozen-head and no-grad passes ran as fast with 2048 as
# with 4096 columns, the trainable head 1.8% faster with 4096 (interleaved,
# medians of 5); at N=512, H=256 every size from 1024 to 8192 columns ran alike.
FROZEN_MAX_COLS = 2048
TRAINABLE_MAX_COLS = 4096


def _plan(n: int, vocab: int, tile_bytes: Optional[int], trainable: bool) -> Tuple[int, int]:
    rows, cols = plan_tiles(n, vocab, tile_budget(tile_bytes), 4)
    return rows, min(cols, TRAINABLE_MAX_COLS if trainable else FROZEN_MAX_COLS)


def applies(h: torch.Tensor, entropy: bool, entropy_grad: bool, accumulate: bool) -> bool:
    """Whether the shifted path runs: CPU fp32, and an entropy (if any) only
    without gradient in the frozen-head mode (where it comes for free)."""
    if h.device.type != "cpu" or h.dtype != torch.float32:
        return False
    return not entropy or (accumulate and not entropy_grad)


class VocabMajorTiles:
    """Vocabulary-major tiles of the logits of the tokens ``h`` [n, H]: for a
    slice ``w`` [c, H] of the head, new [c, n] fp32 tensors (oneDNN's linear
    has no ``out=``)."""

    def __init__(self, h: torch.Tensor, cols: int) -> None:
        self.h = h
        self.packed = onednn_pack(h, cols)  # packed once, used by every tile

    def logits(self, w: torch.Tensor) -> torch.Tensor:
        """``w @ h^T``."""
        if self.packed is not None:
            return onednn_linear(w, self.packed)
        return torch.mm(w, self.h.t())

    def exp(self, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``exp(w @ h^T + bias)`` for a per-token ``bias`` [n], added by the GEMM."""
        if self.packed is not None:
            return onednn_linear(w, self.packed, bias).exp_()
        return torch.addmm(bias, w, self.h.t()).exp_()


class RightOperand:
    """``x @ b`` for a fixed ``b`` [n, H] and many ``x`` [c, n], written into
    ``out``: with oneDNN, ``b^T`` packed once as a linear's weight (its GEMM
    runs ~10% faster than ``torch.mm`` here, copy into ``out`` included),
    else ``torch.mm``."""

    def __init__(self, b: torch.Tensor, rows: int) -> None:
        self.b = b
        self.packed = onednn_pack(b.t().contiguous(), rows)

    def mm(self, x: torch.Tensor, out: torch.Tensor) -> None:
        if self.packed is not None:
            out.copy_(onednn_linear(x, self.packed))
        else:
            torch.mm(x, self.b, out=out)


def shifted_forward(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    accumulate: bool,
    entropy: bool,
    tile_bytes: Optional[int] = None,
    trainable: bool = False,
) -> dict:
    """``tiled_forward``'s results (``logp``, ``lse``; with ``accumulate``
    ``grad_logp`` = ``W_t - E_p[W]``, and ``entropy`` if asked, which needs
    ``accumulate``) for valid tokens ``h`` [n, H] fp32, ``targets`` [n].
    ``trainable`` (the head gets a gradient) only sets the tile width.

    Per token, ``s = sum_v exp(z_v - shift)`` and (frozen head)
    ``acc = sum_v exp(z_v - shift) W_v``, so that ``lse = shift + log s`` and
    ``E_p[W] = acc / s``.
    """
    if entropy and not accumulate:
        raise ValueError("shifted_forward: the entropy comes from the frozen-head accumulator; pass accumulate=True")
    n, hidden_size = h.shape
    vocab = weight.shape[0]
    rows, cols = _plan(n, vocab, tile_bytes, trainable)
    shift = torch.empty(n, dtype=torch.float32)
    s = torch.zeros(n, dtype=torch.float32)
    acc_w = torch.zeros(n, hidden_size, dtype=torch.float32) if accumulate else None
    for r0 in range(0, n, rows):
        r = slice(r0, r0 + rows)
        tiles = VocabMajorTiles(h[r], cols)
        acc = acc_w[r] if accumulate else None
        bias = None
        for v0 in range(0, vocab, cols):
            w = weight[v0 : v0 + cols]
            if bias is None:  # the first tile sets the shift
                zt = tiles.logits(w)
                shift[r] = zt.amax(dim=0)
                bias = -shift[r]
                pt = zt.add_(bias).exp_()
                s_tile = pt.sum(dim=0)
            else:
                pt = tiles.exp(w, bias)
                s_tile = pt.sum(dim=0)
                if not bool(torch.isfinite(s_tile).all()):  # some z - shift > ~88
                    pt, s_tile = _raise_shift(tiles, w, shift[r], s[r], acc)
                    bias = -shift[r]
            s[r] += s_tile
            if accumulate:
                acc.addmm_(pt.t(), w)
            del pt
    w_target = weight[targets].float()
    lse = shift + s.log()
    out = {"logp": (h * w_target).sum(dim=1) - lse, "lse": lse}
    if accumulate:
        mean_w = acc_w.div_(s.unsqueeze(1))
        if entropy:
            out["entropy"] = lse - (mean_w * h).sum(dim=1)
        out["grad_logp"] = w_target.sub_(mean_w)
    return out


def _raise_shift(
    tiles: VocabMajorTiles, w: torch.Tensor, shift: torch.Tensor, s: torch.Tensor, acc: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A tile overflowed: recompute its logits, raise ``shift`` (in place) to
    cover their max, rescale ``s`` and ``acc`` to the new shift; return the
    tile's ``exp(z - shift)`` and its column sum."""
    zt = tiles.logits(w)
    new_shift = torch.maximum(shift, zt.amax(dim=0))
    alpha = (shift - new_shift).exp_()
    s.mul_(alpha)
    if acc is not None:
        acc.mul_(alpha.unsqueeze(1))
    shift.copy_(new_shift)
    pt = zt.sub_(new_shift).exp_()
    return pt, pt.sum(dim=0)


def shifted_backward(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    g: Optional[torch.Tensor],
    *,
    need_h: bool,
    need_w: bool,
    tile_bytes: Optional[int] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``tiled_backward`` without entropy: ``(dh [n, H], dW [V, H])`` (None
    where not needed) for the upstream gradient ``g`` of logp ([n], None = 0)."""
    n, hidden_size = h.shape
    vocab = weight.shape[0]
    if g is None or n == 0:
        return (torch.zeros_like(h) if need_h else None), (torch.zeros_like(weight) if need_w else None)
    g = g.float()
    rows, cols = _plan(n, vocab, tile_bytes, need_w)
    dh = torch.empty_like(h) if need_h else None
    dw = torch.empty_like(weight) if need_w else None
    for r0 in range(0, n, rows):
        r = slice(r0, r0 + rows)
        tiles = VocabMajorTiles(h[r], cols)
        neg_lse = -lse[r]
        minus_gh = RightOperand(h[r] * (-g[r]).unsqueeze(1), cols) if need_w else None
        acc = torch.zeros(h[r].shape[0], hidden_size, dtype=torch.float32) if need_h else None
        for v0 in range(0, vocab, cols):
            w = weight[v0 : v0 + cols]
            pt = tiles.exp(w, neg_lse)  # p^T of the tile
            if need_w:
                if r0 == 0:
                    minus_gh.mm(pt, out=dw[v0 : v0 + cols])
                else:
                    dw[v0 : v0 + cols].addmm_(pt, minus_gh.b)
            if need_h:
                acc.addmm_(pt.t(), w)
            del pt
        if need_h:  # dh = g (W_t - E_p[W])
            dh[r] = weight[targets[r]].float().sub_(acc).mul_(g[r].unsqueeze(1))
    if need_w:  # the one-hot term [v = t] g of dz
        dw.index_add_(0, targets, h * g.unsqueeze(1))
    return dh, dw
