"""The ``torch`` log-prob backend: vocab-tiled, never materialising the logits.

Notation: ``h`` are the hidden states of the valid (non-ignored) tokens
already divided by the temperature, so the tempered logits of one token are
``z_v = h . W_v``; ``p = softmax(z)``; ``t`` is the token's target. Per token

    logp    = z_t - lse,            lse = log sum_v exp(z_v)
    entropy = lse - E_p[z],         E_p[z] = sum_v p_v z_v

Forward. The vocabulary is walked in tiles of ``cols`` rows of ``W`` (and the
tokens in blocks of ``rows``, usually all of them). For each tile the logits
``Z = h @ W_tile^T`` are computed, then folded into fp32 running statistics
per token, exactly as an online softmax: the running max ``m``, the sum
``s = sum exp(z - m)`` and, for the entropy, ``a = sum exp(z - m) z``; when
the max grows from ``m`` to ``m'`` the sums are rescaled by ``exp(m - m')``.
``z_t`` is the dot product ``h . W_t`` (fp32), computed once. When only
``m`` and ``s`` are needed (no entropy, no frozen-head accumulators),
``TorchTileOps`` folds in the tile's own log-sum-exp, from one row-wise
``log_softmax`` pass, instead of four passes (max, subtract, exp, sum).

Backward, with upstream gradients ``g`` (on logp) and ``k`` (on entropy):

    d logp / d z_v    = [v = t] - p_v
    d entropy / d z_v = -p_v (z_v - E_p[z])
    dz_v = [v = t] g - p_v (g + k (z_v - E_p[z]))
    dh = sum_v dz_v W_v,   dW_v = sum_tokens dz_v h

Two modes, picked by what needs a gradient:

* head frozen (``W`` needs no gradient; the LoRA case), ``accumulate``: the
  forward also accumulates, online and rescaled like ``s``, the
  softmax-weighted head rows ``sum_v p_v W_v`` (one more GEMM per tile) and,
  with entropy, ``sum_v p_v (z_v - c) W_v`` (another), centred on ``c``, the
  running estimate of ``E_p[z]`` (moving the centre from c to c' subtracts
  ``(c' - c) sum_v p_v W_v``). Then
  ``dh = g (W_t - E_p[W]) - k (E_p[(z - c) W] - (E_p[z] - c) E_p[W])`` needs
  no logits in the backward: 2 GEMMs in all (3 with entropy), and the saved
  state is O(N x H). The centring avoids the cancellation of
  ``E_p[zW] - E_p[z] E_p[W]`` that bf16 GEMM operands would otherwise
  amplify.
* head trainable, ``recompute``: the forward keeps only ``m``, ``s`` (``a``);
  the backward recomputes each logits tile, turns it into ``dz`` in place and
  writes ``dW[tile] = dz^T h`` straight into the gradient buffer and
  ``dh += dz @ W_tile``: 4 GEMMs. The one-hot term of ``dz`` is added once at
  the end (``dh += g W_t``, ``dW[t] += g h``), so tiles need no target lookup.

Under ``torch.no_grad`` (or when nothing needs a gradient) only the forward
statistics are computed.

Memory: the tile buffers are sized from a byte budget (``tile_bytes``; see
``npu_rft_kernels.dispatch.tile_budget`` for the defaults), plus O(N x H)
per-token state; nothing of size N x V exists at any time.

The per-tile elementwise work is delegated to a small ``TileOps`` object so
that the Triton backend reuses this algorithm with fused kernels;
``TorchTileOps`` here does it with plain torch operations on fp32 tiles.
"""
from __future__ import annotations

from typing import Optional, Tuple, Type

import torch

from npu_rft_kernels.logprob import shifted
from npu_rft_kernels.logprob.tiling import DEFAULT_TILE_BYTES, MIN_TILE_COLS, TILE_ALIGN, plan_tiles, tile_budget  # noqa: F401


class TorchTileOps:
    """Per-tile elementwise work in plain torch, on fp32 copies of the logits,
    in place wherever the logits are not needed afterwards.

    Workspace: one fp32 tile (the logits, turned in place into ``p``, the
    tile's log-softmax or ``dz``); a second fp32 tile for ``p`` next to ``z``
    with entropy; and, for bf16/fp16 inputs, one tile in the input dtype to
    stage GEMM operands and results.
    """

    @staticmethod
    def bytes_per_elem(dtype: torch.dtype, entropy: bool, accumulate: bool) -> int:
        """Workspace bytes per tile element (see the class docstring)."""
        return 4 * (2 if entropy else 1) + (0 if dtype == torch.float32 else dtype.itemsize)

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype = dtype
        self._z = torch.empty(numel, dtype=torch.float32, device=device)
        self._p: Optional[torch.Tensor] = None  # allocated when first needed (entropy)
        self._low = None if dtype == torch.float32 else torch.empty(numel, dtype=dtype, device=device)

    def _p_tile(self, like: torch.Tensor) -> torch.Tensor:
        if self._p is None:
            self._p = torch.empty_like(self._z)
        return self._p[: like.numel()].view_as(like)

    def logits(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``h @ w^T`` as an fp32 tile."""
        z = self._z[: h.shape[0] * w.shape[0]].view(h.shape[0], w.shape[0])
        if self._low is None:
            return torch.mm(h, w.t(), out=z)
        staged = self._low[: z.numel()].view_as(z)
        torch.mm(h, w.t(), out=staged)
        return z.copy_(staged)

    def online_update(
        self,
        z: torch.Tensor,
        m: torch.Tensor,
        s: torch.Tensor,
        a: Optional[torch.Tensor],
        c: Optional[torch.Tensor],
        want_p: bool,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Fold tile ``z`` into the running ``m``, ``s``, ``a`` (in place).

        Returns ``alpha = exp(m_old - m_new)`` and, rescaled to the new max,
        ``p = exp(z - m_new)`` if ``want_p``, and ``p (z - c)`` if ``c`` is
        given, after setting ``c`` to the running mean ``a / s`` (the
        centring of ``tiled_forward``'s entropy accumulator). Both may
        overwrite ``z``'s storage.
        """
        if a is None and not want_p:
            return self._fold_log_sum_exp(z, m, s), None, None
        m_new = torch.maximum(m, z.amax(dim=1))
        alpha = (m - m_new).exp_()
        # Without entropy z is not needed again: p takes its place.
        p = torch.sub(z, m_new.unsqueeze(1), out=z if a is None else self._p_tile(z)).exp_()
        s.mul_(alpha).add_(p.sum(dim=1))
        m.copy_(m_new)
        if a is None:
            return alpha, p, None
        pz = z.mul_(p)
        a.mul_(alpha).add_(pz.sum(dim=1))
        if c is None:
            return alpha, (p if want_p else None), None
        torch.div(a, s, out=c)
        return alpha, p, pz.addcmul_(p, c.unsqueeze(1), value=-1.0)

    @staticmethod
    def _fold_log_sum_exp(z: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``online_update`` when only ``m`` and ``s`` are wanted: the tile's
        own ``lse_tile = log sum exp z`` from one row-wise pass, then
        ``m' = max(m, lse_tile)``, ``s' = s exp(m - m') + exp(lse_tile - m')``.

        The pass is ``log_softmax`` in place (per row: max, sum of exp, then
        ``z - max - log sum``), read back at column 0 as
        ``lse_tile = z_0 - log_softmax(z)_0``; this adds a rounding error of
        ``ulp(lse_tile - z_0)``, the order of one logit's own rounding.
        One pass instead of four (max, subtract, exp, sum) matters on a
        loaded CPU, where every pass is a parallel region that can wait a
        time slice for a descheduled thread.
        """
        z0 = z[:, 0].clone()
        torch.log_softmax(z, 1, out=z)
        lse_tile = z0.sub_(z[:, 0])
        m_new = torch.maximum(m, lse_tile)
        alpha = (m - m_new).exp_()
        s.mul_(alpha).add_(lse_tile.sub_(m_new).exp_())
        m.copy_(m_new)
        return alpha

    def grad_logits(
        self,
        z: torch.Tensor,
        lse: torch.Tensor,
        mean_z: Optional[torch.Tensor],
        g: torch.Tensor,
        k: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """``dz = -p (g + k (z - E_p[z]))`` without the one-hot term, in place."""
        if k is None:
            return torch.sub(z, lse.unsqueeze(1), out=z).exp_().mul_(-g.unsqueeze(1))
        p = torch.sub(z, lse.unsqueeze(1), out=self._p_tile(z)).exp_()
        z.mul_(-k.unsqueeze(1)).add_((k * mean_z - g).unsqueeze(1))
        return p.mul_(z)

    def gemm_operand(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the GEMM dtype (staged in the workspace when it differs)."""
        if x.dtype == self.dtype:
            return x
        return self._low[: x.numel()].view_as(x).copy_(x)


def _accumulate(acc: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """``acc += x @ w`` with ``acc`` fp32 (``x @ w`` in ``w``'s dtype)."""
    if x.dtype == acc.dtype:
        acc.addmm_(x, w)
    else:
        acc.add_(torch.mm(x, w))


def tiled_forward(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    entropy: bool,
    accumulate: bool,
    entropy_grad: bool = True,
    ops_cls: Type = TorchTileOps,
    tile_bytes: Optional[int] = None,
) -> dict:
    """The forward pass over valid tokens: ``h`` [n, H] (tempered), ``targets`` [n].

    Returns a dict with ``logp`` [n] and ``lse`` [n], plus ``entropy`` and
    ``mean_z`` with ``entropy``, plus ``grad_logp`` = ``W_t - E_p[W]`` and,
    with ``entropy_grad``, ``grad_entropy`` = ``-(E_p[zW] - E_p[z] E_p[W])``
    ([n, H] fp32, the gradients of logp and entropy with respect to ``h``)
    with ``accumulate``.
    """
    n, hidden_size = h.shape
    vocab = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=h.device)
    m = torch.full((n,), float("-inf"), **f32)
    s = torch.zeros(n, **f32)
    a = torch.zeros(n, **f32) if entropy else None
    acc_w = torch.zeros(n, hidden_size, **f32) if accumulate else None
    acc_zw = torch.zeros(n, hidden_size, **f32) if accumulate and entropy and entropy_grad else None
    centre = torch.zeros(n, **f32) if acc_zw is not None else None
    rows, cols = plan_tiles(n, vocab, tile_budget(tile_bytes), ops_cls.bytes_per_elem(h.dtype, entropy, accumulate))
    ops = ops_cls(rows * cols, h.dtype, h.device)
    for v0 in range(0, vocab, cols):
        w = weight[v0 : v0 + cols]
        for r0 in range(0, n, rows):
            r = slice(r0, r0 + rows)
            z = ops.logits(h[r], w)
            old_centre = centre[r].clone() if centre is not None else None
            alpha, p, pz = ops.online_update(
                z, m[r], s[r], a[r] if entropy else None, centre[r] if centre is not None else None, accumulate
            )
            if accumulate:
                acc_w[r].mul_(alpha.unsqueeze(1))
                if acc_zw is not None:
                    # Rescale, then move the centre: sum p (z - c') W = sum p (z - c) W - (c' - c) sum p W.
                    acc_zw[r].mul_(alpha.unsqueeze(1)).addcmul_(acc_w[r], (centre[r] - old_centre).unsqueeze(1), value=-1.0)
                    _accumulate(acc_zw[r], ops.gemm_operand(pz), w)
                _accumulate(acc_w[r], ops.gemm_operand(p), w)
    w_target = weight[targets].float()
    z_target = (h.float() * w_target).sum(dim=1)
    lse = m + s.log()
    out = {"logp": z_target - lse, "lse": lse}
    if entropy:
        out["mean_z"] = a / s
        out["entropy"] = lse - out["mean_z"]
    if accumulate:
        mean_w = acc_w.div_(s.unsqueeze(1))
        if acc_zw is not None:
            # E_p[zW] - E_p[z] E_p[W] = E_p[(z - c) W] - (E_p[z] - c) E_p[W]
            cov = acc_zw.div_(s.unsqueeze(1)).addcmul_(mean_w, (out["mean_z"] - centre).unsqueeze(1), value=-1.0)
            out["grad_entropy"] = cov.neg_()
        out["grad_logp"] = w_target.sub_(mean_w)
    return out


def tiled_backward(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    mean_z: Optional[torch.Tensor],
    g: Optional[torch.Tensor],
    k: Optional[torch.Tensor],
    *,
    need_h: bool,
    need_w: bool,
    ops_cls: Type = TorchTileOps,
    tile_bytes: Optional[int] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The recompute backward: ``(dh [n, H] in h's dtype, dW [V, H] in W's dtype)``.

    ``g``/``k`` are the upstream gradients of logp/entropy ([n] fp32, None
    for zero). ``dW`` is written tile by tile into one buffer; with bf16/fp16
    weights and several token blocks, each tile is summed in fp32 first.
    """
    n, hidden_size = h.shape
    vocab = weight.shape[0]
    if n == 0:  # no valid token (every target ignored): the gradients are zero
        return (torch.zeros_like(h) if need_h else None), (torch.zeros_like(weight) if need_w else None)
    g = torch.zeros(n, dtype=torch.float32, device=h.device) if g is None else g.float()
    k = None if k is None else k.float()
    rows, cols = plan_tiles(n, vocab, tile_budget(tile_bytes), ops_cls.bytes_per_elem(h.dtype, k is not None, False))
    ops = ops_cls(rows * cols, h.dtype, h.device)
    dh = torch.zeros(n, hidden_size, dtype=torch.float32, device=h.device) if need_h else None
    dw = torch.empty_like(weight) if need_w else None
    sum_dw_in_fp32 = need_w and weight.dtype != torch.float32 and rows < n
    dw_tile = torch.empty(cols, hidden_size, dtype=torch.float32, device=h.device) if sum_dw_in_fp32 else None
    for v0 in range(0, vocab, cols):
        w = weight[v0 : v0 + cols]
        dw_acc = None
        if need_w:
            dw_acc = dw_tile[: w.shape[0]] if sum_dw_in_fp32 else dw[v0 : v0 + cols]
        for r0 in range(0, n, rows):
            r = slice(r0, r0 + rows)
            z = ops.logits(h[r], w)
            if k is None:
                dz = ops.grad_logits(z, lse[r], None, g[r], None)
            else:
                dz = ops.grad_logits(z, lse[r], mean_z[r], g[r], k[r])
            dz = ops.gemm_operand(dz)
            if need_w:
                hr = h[r] if dw_acc.dtype == h.dtype else h[r].float()
                dz_w = dz if dw_acc.dtype == dz.dtype else dz.float()
                if r0 == 0:
                    torch.mm(dz_w.t(), hr, out=dw_acc)
                else:
                    dw_acc.addmm_(dz_w.t(), hr)
            if need_h:
                _accumulate(dh[r], dz, w)
        if sum_dw_in_fp32:
            dw[v0 : v0 + cols].copy_(dw_acc)
    # The one-hot term [v = t] g of dz.
    if need_h:
        dh.add_(g.unsqueeze(1) * weight[targets].float())
    if need_w:
        dw.index_add_(0, targets, (g.unsqueeze(1) * h.float()).to(dw.dtype))
    return (dh.to(h.dtype) if need_h else None), dw


class TiledLogprob(torch.autograd.Function):
    """Autograd wrapper of ``tiled_forward``/``tiled_backward`` for valid tokens.

    Inputs ``(h, weight, targets, entropy, entropy_grad, ops_cls, tile_bytes)``;
    outputs ``logp`` or ``(logp, entropy)`` (the entropy non-differentiable
    without ``entropy_grad``). The mode (accumulate or recompute) is chosen
    from which of ``h``/``weight`` require a gradient; with ``TorchTileOps``
    the ``shifted`` fast path runs where it applies (CPU fp32).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, entropy, entropy_grad, ops_cls, tile_bytes):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        accumulate = need_h and not need_w
        ctx.shifted = ops_cls is TorchTileOps and shifted.applies(h, entropy, entropy_grad, accumulate)
        if ctx.shifted:
            out = shifted.shifted_forward(
                h, weight, targets, accumulate=accumulate, entropy=entropy, tile_bytes=tile_bytes, trainable=need_w
            )
        else:
            out = tiled_forward(
                h,
                weight,
                targets,
                entropy=entropy,
                accumulate=accumulate,
                entropy_grad=entropy_grad,
                ops_cls=ops_cls,
                tile_bytes=tile_bytes,
            )
        ctx.set_materialize_grads(False)
        ctx.accumulate, ctx.entropy, ctx.ops_cls, ctx.tile_bytes = accumulate, entropy, ops_cls, tile_bytes
        ctx.h_dtype = h.dtype
        if accumulate:
            ctx.save_for_backward(out["grad_logp"], out.get("grad_entropy"))
        else:
            ctx.save_for_backward(h, weight, targets, out["lse"], out.get("mean_z"))
        if not entropy:
            return out["logp"]
        if not entropy_grad:
            ctx.mark_non_differentiable(out["entropy"])
        return out["logp"], out["entropy"]

    @staticmethod
    def backward(ctx, g, k=None):
        if ctx.accumulate:
            grad_logp, grad_entropy = ctx.saved_tensors
            dh = torch.zeros_like(grad_logp)
            if g is not None:
                dh.addcmul_(grad_logp, g.unsqueeze(1))
            if k is not None:
                dh.addcmul_(grad_entropy, k.unsqueeze(1))
            return dh.to(ctx.h_dtype), None, None, None, None, None, None
        h, weight, targets, lse, mean_z = ctx.saved_tensors
        needs = dict(need_h=ctx.needs_input_grad[0], need_w=ctx.needs_input_grad[1], tile_bytes=ctx.tile_bytes)
        if ctx.shifted:
            dh, dw = shifted.shifted_backward(h, weight, targets, lse, g, **needs)
        else:
            dh, dw = tiled_backward(h, weight, targets, lse, mean_z, g, k, ops_cls=ctx.ops_cls, **needs)
        return dh, dw, None, None, None, None, None


def valid_tokens(hidden: torch.Tensor, targets: torch.Tensor, temperature: float, ignore_index: int):
    """Flatten, keep the tokens whose target is not ``ignore_index`` and divide
    by the temperature (differentiably): ``(h [n, H], targets [n], index [n] or None)``.
    ``index`` is None when every token is valid (then nothing is copied at T=1)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).long()
    valid = t != ignore_index
    index = None
    if not bool(valid.all()):
        index = valid.nonzero().squeeze(1)
        h, t = h[index], t[index]
    if temperature != 1.0:
        h = h * (1.0 / temperature)
    return h, t, index


def scatter_tokens(values: torch.Tensor, index: Optional[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """Per-valid-token ``values`` back to ``shape`` with 0 at ignored tokens."""
    if index is None:
        return values.reshape(shape)
    full = values.new_zeros(shape.numel())
    return full.index_put((index,), values).reshape(shape)


def run_tiled(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    ignore_index: int,
    return_entropy: bool,
    ops_cls: Type,
    tile_bytes: Optional[int],
    entropy_grad: bool = True,
):
    """Shared driver of the tiled backends: valid tokens, the autograd
    function (or the bare forward when no gradient is needed), scatter back."""
    if tile_bytes == 0:
        raise ValueError(
            "fused_logprob: tile_bytes=0 (no logits tile) is the triton backend's streaming mode; "
            "pass backend='triton' or a positive tile budget"
        )
    h, t, index = valid_tokens(hidden, targets, temperature, ignore_index)
    shape = targets.shape
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    if needs_grad:
        out = TiledLogprob.apply(h, weight, t, return_entropy, entropy_grad, ops_cls, tile_bytes)
        logp, entropy = out if return_entropy else (out, None)
    else:
        with torch.no_grad():
            if ops_cls is TorchTileOps and shifted.applies(h, return_entropy, False, False):
                res = shifted.shifted_forward(h, weight, t, accumulate=False, entropy=False, tile_bytes=tile_bytes)
            else:
                res = tiled_forward(
                    h, weight, t, entropy=return_entropy, accumulate=False, ops_cls=ops_cls, tile_bytes=tile_bytes
                )
        logp, entropy = res["logp"], res.get("entropy")
    logp = scatter_tokens(logp, index, shape)
    if not return_entropy:
        return logp
    return logp, scatter_tokens(entropy, index, shape)


def torch_logprob(
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
    """The ``torch`` backend of ``fused_logprob`` (see the module docstring;
    CPU fp32 takes the ``shifted`` fast path where it applies)."""
    return run_tiled(
        hidden,
        weight,
        targets,
        temperature=temperature,
        ignore_index=ignore_index,
        return_entropy=return_entropy,
        entropy_grad=entropy_grad,
        ops_cls=TorchTileOps,
        tile_bytes=tile_bytes,
    )
