"""Optional: run an HF Qwen2/Llama model's RMSNorm, rotary embedding and SwiGLU
MLP through torch_npu's fused operators.

UNVERIFIED ON HARDWARE. The replacement functions below are tested on CPU only,
with the operators replaced by a plain-torch stand-in that implements their
documented math (tests/npu_rft/ascend/test_fused_ops.py). Whether the real
operators give the same numbers, accept every shape and are faster on a 910B
has not been checked on an Ascend card. See docs/ascend.md.

The operators, as documented by torch_npu:

- ``npu_rms_norm(x, gamma, epsilon=1e-6) -> (y, rstd)``:
  ``rstd = 1 / sqrt(mean(x**2, dim=-1) + epsilon)``, ``y = x * rstd * gamma``;
  ``x`` and ``gamma`` share one dtype (fp16, bf16 or fp32); ``y`` has it too.
- ``npu_rotary_mul(x, r1, r2) -> y``: ``y = x * r1 + rotate_half(x) * r2`` with
  ``rotate_half(x) = cat(-x2, x1)`` for ``x1, x2 = chunk(x, 2, dim=-1)`` (the
  default ``'half'`` mode; HF's ``rotate_half``). ``x`` is 4-D.
- ``npu_swiglu(x, dim=-1) -> y``: ``a, b = chunk(x, 2, dim)``,
  ``y = silu(a) * b = a * sigmoid(a) * b``; documented for the Atlas A2 (910B) series.

Each replacement takes its operator as an argument, so the same code runs with
torch_npu's operator on an NPU and with a stand-in in tests.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Any, Callable, Tuple

import torch
from torch import nn

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")


@dataclass(frozen=True)
class FusedOps:
    """The three operators: torch_npu's on an NPU, a stand-in in tests."""

    rms_norm: Callable[..., Tuple[torch.Tensor, torch.Tensor]]   # npu_rms_norm(x, gamma, epsilon=...)
    rotary_mul: Callable[..., torch.Tensor]                       # npu_rotary_mul(x, r1, r2)
    swiglu: Callable[..., torch.Tensor]                           # npu_swiglu(x, dim=-1)


@dataclass(frozen=True)
class PatchSummary:
    rms_norms: int                     # RMSNorm modules now running the fused norm
    mlps: int                          # MLP modules now running the fused SwiGLU
    rotary_modules: Tuple[str, ...]    # modeling modules whose apply_rotary_pos_emb was replaced


def rms_norm_forward(module: nn.Module, hidden_states: torch.Tensor, *, rms_norm: Callable) -> torch.Tensor:
    """Fused replacement of ``Qwen2RMSNorm.forward`` / ``LlamaRMSNorm.forward``.

    HF: ``weight * (x32 * rsqrt(mean(x32**2) + eps)).to(x.dtype)`` with ``x32 = x.float()``.
    Here: ``rms_norm(x, weight, epsilon=eps)[0]`` with ``x`` and ``weight`` cast to
    ``promote_types(x.dtype, weight.dtype)``, the dtype HF's product has. Same
    formula; the fused form rounds once where HF rounds the normalised value to
    ``x.dtype`` before the product, so low-precision results may differ in the last bit.
    """
    weight = module.weight
    dtype = torch.promote_types(hidden_states.dtype, weight.dtype)
    return rms_norm(hidden_states.to(dtype), weight.to(dtype), epsilon=module.variance_epsilon)[0]


def apply_rotary_pos_emb_fused(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                               unsqueeze_dim: int = 1, *, rotary_mul: Callable) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused replacement of HF's ``apply_rotary_pos_emb`` (same signature).

    HF: ``q * cos + rotate_half(q) * sin`` (and the same for ``k``), with ``cos``
    and ``sin`` unsqueezed at ``unsqueeze_dim`` to broadcast over heads
    (q ``[B, N, S, D]``, cos ``[B, 1, S, D]``). Here: ``rotary_mul(q, cos, sin)``,
    in ``promote_types(q.dtype, cos.dtype)`` as HF's products are.
    """
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, cos.dtype)
        return rotary_mul(x.to(dtype), cos.to(dtype), sin.to(dtype))

    return rotate(q), rotate(k)


def swiglu_mlp_forward(module: nn.Module, x: torch.Tensor, *, swiglu: Callable) -> torch.Tensor:
    """Fused replacement of ``Qwen2MLP.forward`` / ``LlamaMLP.forward``.

    HF: ``down_proj(silu(gate_proj(x)) * up_proj(x))``. Here:
    ``down_proj(swiglu(cat(gate_proj(x), up_proj(x)), dim=-1))``. The projections
    are still called one by one (so LoRA-wrapped projections keep working); the
    concatenation costs one copy of the ``[..., 2 * intermediate]`` activations.
    """
    gate_up = torch.cat((module.gate_proj(x), module.up_proj(x)), dim=-1)
    return module.down_proj(swiglu(gate_up, dim=-1))


def _is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")


def _is_gated_mlp(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))


def patch_model(model: nn.Module, ops: FusedOps, *, rms_norm: bool = True, rotary: bool = True,
                swiglu: bool = True) -> PatchSummary:
    """Swap the chosen pieces of a Qwen2/Llama model (or a PEFT wrapper of one) for ``ops``.

    RMSNorm and MLP forwards are replaced per module instance. The rotary
    function is looked up by name in the model's modeling module
    (``transformers.models.qwen2.modeling_qwen2.apply_rotary_pos_emb``), so it is
    replaced there: for every model of that architecture in the process.
    Patching again replaces the earlier patch.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"NPU fused ops support model types {', '.join(SUPPORTED_MODEL_TYPES)}, not {model_type!r}; "
                         f"fix: turn the fused ops off for this model")
    if swiglu and getattr(config, "hidden_act", None) != "silu":
        raise ValueError(f"the fused SwiGLU needs hidden_act 'silu', the model has {config.hidden_act!r}; "
                         f"fix: turn the fused SwiGLU off for this model")
    norms = mlps = 0
    modeling_modules = {}
    for module in model.modules():
        if rms_norm and _is_rms_norm(module):
            module.forward = functools.partial(rms_norm_forward, module, rms_norm=ops.rms_norm)
            norms += 1
        elif swiglu and _is_gated_mlp(module):
            module.forward = functools.partial(swiglu_mlp_forward, module, swiglu=ops.swiglu)
            mlps += 1
        source = sys.modules.get(type(module).__module__)
        if rotary and source is not None and hasattr(source, "apply_rotary_pos_emb"):
            modeling_modules[source.__name__] = source
    for source in modeling_modules.values():
        source.apply_rotary_pos_emb = functools.partial(apply_rotary_pos_emb_fused, rotary_mul=ops.rotary_mul)
    return PatchSummary(rms_norms=norms, mlps=mlps, rotary_modules=tuple(sorted(modeling_modules)))


def apply_npu_fused_ops(model: nn.Module, device: Any, *, rms_norm: bool = True, rotary: bool = True,
                        swiglu: bool = True) -> PatchSummary:
    """Run ``model``'s RMSNorm, rotary embedding and SwiGLU through torch_npu's fused operators.

    ``device`` is the run's :class:`npu_rft.device.Device`; anything but an NPU
    raises :class:`npu_rft.device.DeviceError`. Unverified on hardware (see the module docstring).
    """
    torch_npu = device.npu_module()
    ops = FusedOps(rms_norm=torch_npu.npu_rms_norm, rotary_mul=torch_npu.npu_rotary_mul, swiglu=torch_npu.npu_swiglu)
    return patch_model(model, ops, rms_norm=rms_norm, rotary=rotary, swiglu=swiglu)
