"""Less MLP activation memory: recomputed MLPs (the default) and a lean SwiGLU.

``patch_recomputed_mlps`` (``model.recompute_mlp``) keeps only each MLP's
input for the backward and runs the MLP's forward again there.

HF's Qwen2/Llama/Mistral MLP computes ``down_proj(silu(gate_proj(x)) * up_proj(x))``;
autograd then keeps ``gate``, ``silu(gate)`` and ``up`` (each [tokens, intermediate],
the largest activations of a decoder layer) until the backward. ``SwiGLU`` keeps
``gate`` and ``up`` and recomputes the sigmoid in the backward: a third less MLP
activation memory for a few elementwise operations. The forward computes the same
``silu(gate) * up`` as HF (the same values); the backward's rounding may differ in
the last bit (``d silu / d gate = s (1 + gate (1 - s))``, ``s = sigmoid(gate)``).

``model.lean_swiglu`` is the lighter alternative described above; with
``recompute_mlp`` on it has nothing left to save.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class SwiGLU(torch.autograd.Function):
    """``silu(gate) * up``, saving only ``gate`` and ``up``."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        s = torch.sigmoid(gate)
        grad_gate = grad_up = None
        # In place where possible: two new [tokens, intermediate] tensors besides the results' own.
        if ctx.needs_input_grad[1]:
            grad_up = torch.mul(gate, s).mul_(grad)
        if ctx.needs_input_grad[0]:
            grad_gate = torch.sub(1, s).mul_(gate).add_(1).mul_(s).mul_(up).mul_(grad)
        return grad_gate, grad_up


def lean_mlp_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``Qwen2MLP.forward`` with ``SwiGLU``; the projections are still called one by
    one, so LoRA-wrapped projections keep working."""
    return module.down_proj(SwiGLU.apply(module.gate_proj(x), module.up_proj(x)))


def _is_silu(act: object) -> bool:
    # torch's nn.SiLU, or transformers' SiLUActivation (ACT2FN["silu"]: F.silu in a Module)
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _is_silu_gated_mlp(module: nn.Module) -> bool:
    has_projections = all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
    return has_projections and _is_silu(getattr(module, "act_fn", None))


def patch_lean_mlps(model: nn.Module) -> int:
    """Give every gated MLP with a SiLU activation (``gate_proj``, ``up_proj``,
    ``down_proj``, ``act_fn`` a SiLU module) the ``lean_mlp_forward``; returns
    how many were patched (0 for other architectures, which are left as they are)."""
    patched = 0
    for module in model.modules():
        if _is_silu_gated_mlp(module):
            module.forward = functools.partial(lean_mlp_forward, module)
            patched += 1
    return patched


def _recomputed(forward, *args, **kwargs):
    """``forward(*args, **kwargs)``, under activation checkpointing when a
    gradient will flow through it: only the inputs are kept for backward."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def patch_recomputed_mlps(model: nn.Module) -> int:
    """Recompute every MLP (a module named ``mlp``) in the backward instead of
    keeping its activations: each then holds only its input between forward and
    backward, not its [tokens, intermediate] tensors, for one more MLP forward
    per layer in the backward. The recomputation runs the same operations on
    the same inputs, so values and gradients are bit-identical. Returns how
    many modules were wrapped."""
    patched = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "mlp":
            module.forward = functools.partial(_recomputed, module.forward)
            patched += 1
    return patched
