"""Optional: run an HF Qwen2/Llama model's RMSNorm, rotary embedding and SwiGLU
MLP through torch_npu's fused operators.

UNVERIFIED ON HARDWARE. The replacement functions below are tested on CPU only,
with the operators replaced by a plain-torch stand-in that implements their
documented math (tests/npu_rft/ascend/test_fused_ops.py). Whether the real
operators give the same numbers, accept every shape and are faster on a 910B
has not been checked on an Ascend card. See docs/ascend.md.

The operators, as documented by torch_npu (each is called through
``npu_rft_kernels.torch_npu_api``, whose calls are checked against the
torch_npu 2.13.0 wheel's schemas; the tests' stand-ins bind their arguments by
those schemas and enforce the limits below):

- ``npu_rms_norm(x, gamma, epsilon=1e-6) -> (y, rstd)``:
  ``rstd = 1 / sqrt(mean(x**2, dim=-1) + epsilon)``, ``y = x * rstd * gamma``;
  ``x`` and ``gamma`` share one dtype (fp16, bf16 or fp32); ``y`` has it too.
- ``npu_rotary_mul(x, r1, r2) -> y``: ``y = x * r1 + rotate_half(x) * r2`` with
  ``rotate_half(x) = cat(-x2, x1)`` for ``x1, x2 = chunk(x, 2, dim=-1)`` (the
  default ``'half'`` mode; HF's ``rotate_half``). ``x`` is 4-D; HF's attention
  passes BNSD (``[B, heads, S, D]``) with ``r1``/``r2`` of shape ``B1SD``, one of
  the layouts documented for BNSD input (``11SD``, ``B1SD``, ``BNSD``); ``D`` even
  and below 896, ``B`` and ``N`` below 1000.
- ``npu_swiglu(x, dim=-1) -> y``: ``a, b = chunk(x, 2, dim)``,
  ``y = silu(a) * b = a * sigmoid(a) * b``; documented for the Atlas A2 (910B) series.

Each replacement takes its operator as an argument, so the same code runs with
torch_npu's operator on an NPU and with a stand-in in tests.
"""
from __future__ import annotations

import contextvars
import functools
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
from torch import nn

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")
OP_NAMES = ("rms_norm", "rotary", "swiglu")

# The rotary operator of the patched attention module running now (None: HF's
# own). HF's attention calls its modeling module's ``apply_rotary_pos_emb`` by
# name, so the fused rotary cannot be set on one module instance directly:
# the modeling module gets a dispatcher once, which runs HF's function unless a
# patched attention's forward is on the stack. Other models in the process
# keep HF's rotary.
_ACTIVE_ROTARY: contextvars.ContextVar[Optional[Callable]] = contextvars.ContextVar("npu_rft_rotary", default=None)


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
    attentions: int                    # attention modules now running the fused rotary

    def describe(self) -> str:
        return f"{self.rms_norms} RMSNorm, {self.attentions} rotary (attention), {self.mlps} SwiGLU (MLP) modules"


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


def _rotary_dispatcher(source: Any) -> None:
    """Give ``source`` (a modeling module) the dispatching ``apply_rotary_pos_emb``, once."""
    original = source.apply_rotary_pos_emb
    if getattr(original, "npu_rft_dispatcher", False):
        return

    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        rotary_mul = _ACTIVE_ROTARY.get()
        if rotary_mul is None:
            return original(q, k, cos, sin, *args, **kwargs)
        return apply_rotary_pos_emb_fused(q, k, cos, sin, *args, rotary_mul=rotary_mul, **kwargs)

    apply_rotary_pos_emb.npu_rft_dispatcher = True
    source.apply_rotary_pos_emb = apply_rotary_pos_emb


def _attention_forward(*args: Any, forward: Callable, rotary_mul: Callable, **kwargs: Any) -> Any:
    token = _ACTIVE_ROTARY.set(rotary_mul)
    try:
        return forward(*args, **kwargs)
    finally:
        _ACTIVE_ROTARY.reset(token)


def _rotary_source(module: nn.Module) -> Optional[Any]:
    """The modeling module whose ``apply_rotary_pos_emb`` this attention module calls, or None."""
    if not all(hasattr(module, name) for name in ("q_proj", "k_proj", "o_proj")):
        return None
    source = sys.modules.get(type(module).__module__)
    return source if source is not None and hasattr(source, "apply_rotary_pos_emb") else None


def patch_model(model: nn.Module, ops: FusedOps, *, rms_norm: bool = True, rotary: bool = True,
                swiglu: bool = True) -> PatchSummary:
    """Swap the chosen pieces of a Qwen2/Llama model (or a PEFT wrapper of one) for ``ops``.

    Every change is to this model's module instances: RMSNorm and MLP forwards
    are replaced, and attention forwards run the fused rotary (see
    ``_ACTIVE_ROTARY``). Other models in the process are left as they are.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"NPU fused ops support model types {', '.join(SUPPORTED_MODEL_TYPES)}, not {model_type!r}; "
                         f"fix: turn the fused ops off for this model")
    if swiglu and getattr(config, "hidden_act", None) != "silu":
        raise ValueError(f"the fused SwiGLU needs hidden_act 'silu', the model has {config.hidden_act!r}; "
                         f"fix: turn the fused SwiGLU off for this model")
    norms = mlps = attentions = 0
    for module in model.modules():
        if rms_norm and _is_rms_norm(module):
            module.forward = functools.partial(rms_norm_forward, module, rms_norm=ops.rms_norm)
            norms += 1
        elif swiglu and _is_gated_mlp(module):
            module.forward = functools.partial(swiglu_mlp_forward, module, swiglu=ops.swiglu)
            mlps += 1
        elif rotary and (source := _rotary_source(module)) is not None:
            _rotary_dispatcher(source)
            module.forward = functools.partial(_attention_forward, forward=module.forward, rotary_mul=ops.rotary_mul)
            attentions += 1
    return PatchSummary(rms_norms=norms, mlps=mlps, attentions=attentions)


def apply_npu_fused_ops(model: nn.Module, device: Any, *, rms_norm: bool = True, rotary: bool = True,
                        swiglu: bool = True) -> PatchSummary:
    """Run ``model``'s RMSNorm, rotary embedding and SwiGLU through torch_npu's fused operators.

    ``device`` is the run's :class:`npu_rft.device.Device`; anything but an NPU
    raises :class:`npu_rft.device.DeviceError`. Unverified on hardware (see the module docstring).
    """
    return patch_model(model, npu_ops(device), rms_norm=rms_norm, rotary=rotary, swiglu=swiglu)


def npu_ops(device: Any) -> FusedOps:
    """torch_npu's three operators, through ``npu_rft_kernels.torch_npu_api`` (the
    module that makes every torch_npu call; ``device.npu_module()`` returns it)."""
    api = device.npu_module()
    return FusedOps(rms_norm=api.npu_rms_norm, rotary_mul=api.npu_rotary_mul, swiglu=api.npu_swiglu)


def fused_ops_problem(device: Any) -> Optional[str]:
    """Why ``model.npu_fused_ops`` cannot run on ``device``, or None: they need an
    NPU whose chip runs them (``npu_rft_kernels.chips``) and bf16 compute."""
    from npu_rft_kernels import chips

    if device.type != "npu":
        return f"the device is {device.type}, not an Ascend NPU"
    if not chips.capability(device.name, "fused_ops"):
        return f"the chip {device.name} is not one that runs them (the Atlas A2, Ascend910B1-B4, where torch_npu documents them)"
    if device.compute_dtype != torch.bfloat16:
        return f"the compute dtype is {str(device.compute_dtype).replace('torch.', '')}, not bfloat16"
    return None


def apply_configured(model: nn.Module, device: Any, names: Sequence[str]) -> Optional[PatchSummary]:
    """``model.npu_fused_ops`` in ``load_policy``: apply the named ops (a subset of
    ``OP_NAMES``) where ``fused_ops_problem`` finds none, else log why not and return None."""
    if not names:
        return None
    why = fused_ops_problem(device)
    if why is not None:
        logger.info("model.npu_fused_ops %s: not applied, %s", list(names), why)
        return None
    summary = apply_npu_fused_ops(model, device, **{name: name in names for name in OP_NAMES})
    logger.info("NPU fused ops: %s", summary.describe())
    return summary
