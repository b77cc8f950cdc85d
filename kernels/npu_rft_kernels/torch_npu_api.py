"""Every use of torch_npu in npu-rft, in one module.

Nothing else in ``npu_rft`` or ``npu_rft_kernels`` imports torch_npu: the
device module, the fused operators, the doctor, the kernel dispatch and the
``npu`` log-prob backend all call the functions below, so the list of call
sites into torch_npu is closed. Each call is written
``_torch_npu().<attribute>...(...)``; ``npu_rft_kernels.torch_npu_check``
finds every such expression in this file and checks it against a torch_npu
wheel without importing torch_npu: the names against its Python sources and
op schemas (``torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml``),
the keyword names, the number of positional arguments and, for operators,
the number of outputs used (``tests/kernels/test_torch_npu_api.py``, against
the wheel that ``make torch-npu-wheel`` downloads).

Importing this module does not import torch_npu; each call imports it
(``importlib.import_module``, so a stand-in placed in ``sys.modules`` in tests
is what runs).

The operators, as torch_npu 2.13.0 declares and documents them (all are
exported from ``torch.ops.npu`` as ``torch_npu.<name>``, and take keywords
by their schema names):

- ``npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)``:
  ``(x * rstd * gamma, rstd)``; fp16/bf16/fp32, ``gamma`` in ``self``'s dtype, 2-8 dims.
- ``npu_rotary_mul(Tensor self, Tensor r1, Tensor r2, str rotary_mode='half', Tensor? rotate=None) -> Tensor``:
  4-D inputs; in ``'half'`` mode with ``jit_compile=False`` a BNSD input takes
  ``r1``/``r2`` of shape ``11SD``, ``B1SD`` or ``BNSD``; ``D < 896`` and even; ``B, N < 1000``.
- ``npu_swiglu(Tensor self, int dim=-1) -> Tensor``: 1-8 dims, fp32/fp16/bf16; Atlas A2.
- ``npu_fused_linear_online_max_sum(Tensor input, Tensor weight, Tensor target,
  int vocab_start_index, int vocab_end_index, bool return_logits=False)``
  ``-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)``: 2-D bf16/fp16 ``input``
  and ``weight`` of one dtype, 1-D int32/int64 ``target``; outputs logits_max,
  sum_exp_logits (fp32), predicted_logits, target_mask, masked_target, logits.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Callable, Optional, Tuple

def _torch_npu() -> ModuleType:
    """The torch_npu module (imported on first use; raises what its import raises).
    The only import of torch_npu in npu-rft."""
    return importlib.import_module("torch_npu")


def try_import() -> Tuple[Optional[ModuleType], Optional[BaseException]]:
    """``(torch_npu, None)``, or ``(None, the exception its import raised)``."""
    try:
        return _torch_npu(), None
    except Exception as exc:  # CANN missing or mismatched, a CUDA torch beside it: see describe_import_error
        return None, exc


def not_installed(exc: BaseException) -> bool:
    """True when ``exc`` says torch_npu itself is absent (not a dependency of it)."""
    return isinstance(exc, ModuleNotFoundError) and exc.name == "torch_npu"


def describe_import_error(exc: BaseException) -> str:
    """One line: the exception and, when it wraps others, its root cause."""
    chain = [exc]
    while True:
        nxt = chain[-1].__cause__ or chain[-1].__context__
        if nxt is None or nxt in chain:
            break
        chain.append(nxt)
    top = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if len(chain) == 1:
        return top
    root = chain[-1]
    return f"{top} (root cause: {type(root).__name__}: {str(root).splitlines()[0] if str(root) else ''})"


def version() -> str:
    return str(_torch_npu().__version__)


# ----------------------------------------------------------------- torch_npu.npu


class _Npu:
    """The part of ``torch_npu.npu`` that npu-rft calls, with ``torch.cuda``'s
    names, so that :class:`npu_rft.device.Device` treats both alike."""

    def is_available(self) -> bool:
        return bool(_torch_npu().npu.is_available())

    def device_count(self) -> int:
        return int(_torch_npu().npu.device_count())

    def set_device(self, index: int) -> None:
        _torch_npu().npu.set_device(index)

    def set_compile_mode(self, jit_compile: bool) -> None:
        """``jit_compile=False``: use the precompiled operator binaries instead of
        compiling each operator for each new shape (RFT's shapes change every step)."""
        _torch_npu().npu.set_compile_mode(jit_compile=jit_compile)

    def get_device_name(self, index: int) -> str:
        return str(_torch_npu().npu.get_device_name(index))

    def is_bf16_supported(self) -> Optional[bool]:
        """torch_npu's probe, or None where this torch_npu has none."""
        if not hasattr(_torch_npu().npu, "is_bf16_supported"):
            return None
        return bool(_torch_npu().npu.is_bf16_supported())

    def synchronize(self, index: int) -> None:
        _torch_npu().npu.synchronize(index)

    def empty_cache(self) -> None:
        _torch_npu().npu.empty_cache()

    def memory_allocated(self, index: int) -> int:
        return int(_torch_npu().npu.memory_allocated(index))

    def max_memory_allocated(self, index: int) -> int:
        return int(_torch_npu().npu.max_memory_allocated(index))

    def memory_reserved(self, index: int) -> int:
        return int(_torch_npu().npu.memory_reserved(index))

    def reset_peak_memory_stats(self, index: int) -> None:
        _torch_npu().npu.reset_peak_memory_stats(index)

    def get_device_properties(self, index: int) -> Any:
        return _torch_npu().npu.get_device_properties(index)

    def manual_seed_all(self, seed: int) -> None:
        _torch_npu().npu.manual_seed_all(seed)

    def get_rng_state(self, index: int) -> Any:
        return _torch_npu().npu.get_rng_state(index)

    def set_rng_state(self, state: Any, index: int) -> None:
        _torch_npu().npu.set_rng_state(state, index)


npu = _Npu()


def grad_scaler() -> Any:
    """``torch_npu.npu.amp.GradScaler()`` (``torch.amp.GradScaler``'s interface)."""
    return _torch_npu().npu.amp.GradScaler()


def profile(out_dir: str, *, wait: int, warmup: int, active: int, repeat: int, record_shapes: bool,
            profile_memory: bool, with_stack: bool) -> Any:
    """``torch_npu.profiler.profile`` with CPU and NPU activities, profiler level 1
    and AI Core pipe-utilisation metrics, writing to ``out_dir``."""
    experimental = _torch_npu().profiler._ExperimentalConfig(
        profiler_level=_torch_npu().profiler.ProfilerLevel.Level1,
        aic_metrics=_torch_npu().profiler.AiCMetrics.PipeUtilization,
        l2_cache=False,
    )
    return _torch_npu().profiler.profile(
        activities=[_torch_npu().profiler.ProfilerActivity.CPU, _torch_npu().profiler.ProfilerActivity.NPU],
        schedule=_torch_npu().profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=repeat),
        on_trace_ready=_torch_npu().profiler.tensorboard_trace_handler(out_dir),
        record_shapes=record_shapes,
        profile_memory=profile_memory,
        with_stack=with_stack,
        experimental_config=experimental,
    )


# ----------------------------------------------------------------- operators


def npu_rms_norm(x: Any, gamma: Any, epsilon: float = 1e-6) -> Tuple[Any, Any]:
    """``(y, rstd)`` from ``torch_npu.npu_rms_norm``."""
    y, rstd = _torch_npu().npu_rms_norm(x, gamma, epsilon=epsilon)
    return y, rstd


def npu_rotary_mul(x: Any, r1: Any, r2: Any) -> Any:
    """``torch_npu.npu_rotary_mul`` in its default ``'half'`` mode (HF's ``rotate_half``)."""
    return _torch_npu().npu_rotary_mul(x, r1, r2)


def npu_swiglu(x: Any, dim: int = -1) -> Any:
    return _torch_npu().npu_swiglu(x, dim=dim)


def has_online_max_sum() -> bool:
    """Whether this torch_npu has ``npu_fused_linear_online_max_sum``."""
    return hasattr(_torch_npu(), "npu_fused_linear_online_max_sum")


def online_max_sum(h: Any, weight: Any, target: Any, vocab_start_index: int, vocab_end_index: int) -> Tuple[Any, Any]:
    """``(logits_max, sum_exp_logits)`` of ``h @ weight.T`` per row (fp32), from
    ``torch_npu.npu_fused_linear_online_max_sum`` without its logits; the other
    four outputs are not used."""
    logits_max, sum_exp_logits = _torch_npu().npu_fused_linear_online_max_sum(
        h, weight, target, vocab_start_index, vocab_end_index, return_logits=False)[:2]
    return logits_max, sum_exp_logits


OnlineMaxSum = Callable[[Any, Any, Any, int, int], Tuple[Any, Any]]
