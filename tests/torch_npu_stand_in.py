"""A STAND-IN for torch_npu, for tests on machines without an Ascend NPU.

It is NOT torch_npu: it plays the part of the calls npu-rft makes
(``npu_rft_kernels.torch_npu_api``) so that our logic runs on CPU. What keeps it
honest:

- each operator is bound by its schema, the text in ``SCHEMAS``: positional and
  keyword arguments by the schema's names and defaults, refusing what the real
  binding refuses, and returning as many outputs as the schema declares.
  ``tests/kernels/test_torch_npu_api.py`` checks that each text equals the
  torch_npu 2.13.0 wheel's schema;
- each operator enforces the limits torch_npu documents for it (rank, dtype,
  layout; ``StandInLimitError``), and computes the documented math in plain torch;
- the ``torch_npu.npu`` functions take the wheel's parameter names (checked
  against the wheel by the same test) and record every call, in order, in
  ``calls``.

Import as ``from torch_npu_stand_in import ...`` (``tests/conftest.py`` registers
this file under that name); ``install(monkeypatch, ...)`` puts one in
``sys.modules["torch_npu"]``.
"""
from __future__ import annotations

import functools
import sys
import types
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from npu_rft_kernels.torch_npu_check import parse_schema

# The operators' schemas, as torch_npu 2.13.0 declares them
# (torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml).
SCHEMAS = {
    "npu_rms_norm": "npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)",
    "npu_rotary_mul": "npu_rotary_mul(Tensor self, Tensor r1, Tensor r2, str rotary_mode='half', "
                      "Tensor? rotate=None) -> Tensor",
    "npu_swiglu": "npu_swiglu(Tensor self, int dim=-1) -> Tensor",
    "npu_fused_linear_online_max_sum": "npu_fused_linear_online_max_sum(Tensor input, Tensor weight, Tensor target, "
                                       "int vocab_start_index, int vocab_end_index, bool return_logits=False) -> "
                                       "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
}

FLOATS = (torch.float16, torch.bfloat16, torch.float32)


class StandInLimitError(RuntimeError):
    """An input the real operator's documentation rules out."""


def _require(ok: bool, op: str, message: str) -> None:
    if not ok:
        raise StandInLimitError(f"{op}: {message} (torch_npu documents this limit; the stand-in enforces it)")


def operator(name: str) -> Callable:
    """Bind calls to the decorated function by ``SCHEMAS[name]``; check the output count."""
    signature = parse_schema(SCHEMAS[name])

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(args, kwargs)
            call.calls.append(bound)
            out = fn(**bound)
            count = len(out) if isinstance(out, tuple) else 1
            assert isinstance(out, tuple) == signature.tuple_return and count == signature.outputs, (name, count)
            return out

        call.schema = SCHEMAS[name]
        call.signature = signature
        call.calls = []
        call.__name__ = name
        return call

    return wrap


@operator("npu_rms_norm")
def npu_rms_norm(self: torch.Tensor, gamma: torch.Tensor, epsilon: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x * rstd * gamma, rstd), rstd = 1/sqrt(mean(x^2) + eps) over gamma's dims, in fp32;
    y in self's dtype, rstd fp32 shaped as the wheel's meta function shapes it."""
    op = "npu_rms_norm"
    _require(self.dtype in FLOATS, op, f"self must be float16, bfloat16 or float32, not {self.dtype}")
    _require(gamma.dtype == self.dtype, op, f"gamma ({gamma.dtype}) must have self's dtype ({self.dtype})")
    _require(2 <= self.dim() <= 8, op, f"self must have 2-8 dims, not {self.dim()}")
    _require(tuple(self.shape[self.dim() - gamma.dim():]) == tuple(gamma.shape), op,
             f"gamma {tuple(gamma.shape)} must be self's trailing dims {tuple(self.shape)}")
    dims = tuple(range(self.dim() - gamma.dim(), self.dim()))
    x32 = self.float()
    rstd = torch.rsqrt(x32.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    return (x32 * rstd * gamma.float()).to(self.dtype), rstd


@operator("npu_rotary_mul")
def npu_rotary_mul(self: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, rotary_mode: str,
                   rotate: Optional[torch.Tensor]) -> torch.Tensor:
    """'half' mode: self * r1 + cat(-x2, x1) * r2. Enforces the documented limits for
    a BNSD input (the layout HF's attention passes) with jit_compile=False."""
    op = "npu_rotary_mul"
    _require(rotary_mode == "half" and rotate is None, op, "the stand-in plays 'half' mode without rotate only")
    _require(self.dim() == 4 and r1.dim() == 4 and r2.dim() == 4, op,
             f"inputs must be 4-D, got {self.dim()}-D, {r1.dim()}-D, {r2.dim()}-D")
    _require(self.dtype in FLOATS and r1.dtype == self.dtype and r2.dtype == self.dtype, op,
             f"self, r1, r2 must be one of float16/bfloat16/float32, alike; got {self.dtype}, {r1.dtype}, {r2.dtype}")
    b, n, s, d = self.shape
    layouts = {(1, 1, s, d): "11SD", (b, 1, s, d): "B1SD", (b, n, s, d): "BNSD"}
    _require(tuple(r1.shape) in layouts and r2.shape == r1.shape, op,
             f"for a BNSD input {tuple(self.shape)}, r1/r2 must be 11SD, B1SD or BNSD, got "
             f"{tuple(r1.shape)}, {tuple(r2.shape)}")
    _require(d % 2 == 0 and d < 896, op, f"D={d} must be even and below 896")
    _require(b < 1000 and n < 1000, op, f"B={b} and N={n} must be below 1000")
    if r1.requires_grad or r2.requires_grad:
        _require(b * n <= 1024, op, f"B*N={b * n} must be at most 1024 when r1/r2 need gradients")
    x1, x2 = torch.chunk(self, 2, dim=-1)
    return self * r1 + torch.cat((-x2, x1), dim=-1) * r2


@operator("npu_swiglu")
def npu_swiglu(self: torch.Tensor, dim: int) -> torch.Tensor:
    """silu(a) * b with a, b = chunk(self, 2, dim)."""
    op = "npu_swiglu"
    _require(self.dtype in FLOATS, op, f"self must be float32, float16 or bfloat16, not {self.dtype}")
    _require(1 <= self.dim() <= 8, op, f"self must have 1-8 dims, not {self.dim()}")
    _require(self.shape[dim] % 2 == 0, op, f"dim {dim} has odd size {self.shape[dim]}")
    a, b = torch.chunk(self, 2, dim=dim)
    return F.silu(a) * b


@operator("npu_fused_linear_online_max_sum")
def npu_fused_linear_online_max_sum(input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                    vocab_start_index: int, vocab_end_index: int, return_logits: bool):
    """Six outputs: logits_max, sum_exp_logits, predicted_logits (fp32), target_mask
    (uint8 bits), masked_target, and the logits (an empty tensor unless return_logits)."""
    op = "npu_fused_linear_online_max_sum"
    _require(input.dim() == 2 and weight.dim() == 2, op, "input and weight must be 2-D")
    _require(input.dtype in (torch.bfloat16, torch.float16), op, f"input must be bfloat16 or float16, not {input.dtype}")
    _require(weight.dtype == input.dtype, op, f"weight ({weight.dtype}) must have input's dtype ({input.dtype})")
    _require(input.shape[1] == weight.shape[1], op, f"input {tuple(input.shape)} and weight {tuple(weight.shape)} "
                                                    f"must share the hidden size")
    _require(target.dim() == 1 and target.dtype in (torch.int32, torch.int64) and target.shape[0] == input.shape[0],
             op, f"target must be 1-D int32/int64 with one entry per row, got {tuple(target.shape)} {target.dtype}")
    _require(0 <= vocab_start_index <= vocab_end_index, op,
             f"need 0 <= vocab_start_index <= vocab_end_index, got {vocab_start_index}, {vocab_end_index}")
    logits = input @ weight.t()
    logits_max = logits.float().max(dim=-1).values
    sub = logits.float() - logits_max.unsqueeze(1)
    mask = (target < vocab_start_index) | (target > vocab_end_index)
    masked_target = torch.where(mask, 0, target - vocab_start_index)
    predicted = torch.where(mask, 0.0, sub.gather(1, masked_target.unsqueeze(1)).squeeze(1))
    bits = torch.ones((input.shape[0] + 7) // 8 * 8, dtype=torch.uint8)
    bits[: input.shape[0]] = mask.to(torch.uint8)
    packed = (bits.view(-1, 8) << torch.arange(8, dtype=torch.uint8)).sum(1).to(torch.uint8)
    return (logits_max, sub.exp().sum(-1), predicted, packed, masked_target,
            logits if return_logits else logits.new_empty(0))


OPERATORS = (npu_rms_norm, npu_rotary_mul, npu_swiglu, npu_fused_linear_online_max_sum)


class StandInNpu:
    """``torch_npu.npu`` for a SoC name and device count. Its functions take the
    wheel's parameter names; every call is recorded in ``calls`` as
    ``(name, args...)``. ``bf16_probe=None`` leaves out ``is_bf16_supported``."""

    def __init__(self, soc: str = "Ascend910B3", count: int = 2, bf16_probe: Optional[bool] = None) -> None:
        self.soc = soc
        self.count = count
        self.calls: List[tuple] = []
        self.compile_mode: Optional[bool] = None
        self._rng = {i: torch.tensor([i, 7], dtype=torch.uint8) for i in range(count)}
        if bf16_probe is not None:
            def is_bf16_supported(including_emulation=False):
                self.calls.append(("is_bf16_supported",))
                return bf16_probe

            self.is_bf16_supported = is_bf16_supported
        self.amp = types.SimpleNamespace(GradScaler=lambda: ("stand-in GradScaler",))

    def is_available(self):
        self.calls.append(("is_available",))
        return self.count > 0

    def device_count(self):
        self.calls.append(("device_count",))
        return self.count

    def set_device(self, device):
        self.calls.append(("set_device", device))

    def set_compile_mode(self, jit_compile=False):
        self.calls.append(("set_compile_mode", jit_compile))
        self.compile_mode = jit_compile

    def get_device_name(self, device_name=None):
        self.calls.append(("get_device_name", device_name))
        return self.soc

    def synchronize(self, device=None):
        self.calls.append(("synchronize", device))

    def empty_cache(self):
        self.calls.append(("empty_cache",))

    def memory_allocated(self, device=None):
        return 100

    def max_memory_allocated(self, device=None):
        return 300

    def memory_reserved(self, device=None):
        return 512

    def reset_peak_memory_stats(self, device=None):
        self.calls.append(("reset_peak_memory_stats", device))

    def get_device_properties(self, device_name=None):
        return types.SimpleNamespace(total_memory=64 * 2**30)

    def manual_seed_all(self, seed):
        self._rng = {i: torch.tensor([seed % 256, i], dtype=torch.uint8) for i in range(self.count)}

    def get_rng_state(self, device="npu"):
        return self._rng[device].clone()

    def set_rng_state(self, new_state, device="npu"):
        self._rng[device] = new_state.clone()


# the torch_npu.npu functions npu-rft calls; their parameter names are checked against the wheel
NPU_FUNCTIONS = ("is_available", "device_count", "set_device", "set_compile_mode", "get_device_name",
                 "is_bf16_supported", "synchronize", "empty_cache", "memory_allocated", "max_memory_allocated",
                 "memory_reserved", "reset_peak_memory_stats", "get_device_properties", "manual_seed_all",
                 "get_rng_state", "set_rng_state")


def make_module(soc: str = "Ascend910B3", count: int = 2, bf16_probe: Optional[bool] = None,
                operators: bool = True) -> types.ModuleType:
    """A stand-in ``torch_npu`` module (not installed anywhere)."""
    module = types.ModuleType("torch_npu")
    module.__version__ = "2.13.0"
    module.npu = StandInNpu(soc, count, bf16_probe)
    if operators:
        for op in OPERATORS:
            op.calls.clear()
            setattr(module, op.__name__, op)
    return module


def install(monkeypatch: Any, soc: str = "Ascend910B3", count: int = 2, bf16_probe: Optional[bool] = None,
            operators: bool = True) -> types.ModuleType:
    """``make_module(...)`` placed in ``sys.modules["torch_npu"]`` for one test."""
    module = make_module(soc, count, bf16_probe, operators)
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    return module
