"""The one place in npu_rft that asks which accelerator is present.

``get_device("auto" | "npu" | "cuda" | "cpu")`` turns a name into a frozen
:class:`Device`; everything else in the project receives that object and never
tests for "npu" or "cuda" itself. torch_npu is reached only through
``npu_rft_kernels.torch_npu_api`` (the one module that calls it), here while
probing for an Ascend NPU; modules that exist only for Ascend reach that module
through :meth:`Device.npu_module`.

Selection rules:

- The name comes from the caller: the config's ``run.device`` (which
  ``NPU_RFT_DEVICE`` fills only where the config leaves it unset) or a CLI's
  ``--device`` (likewise). ``get_device`` itself reads no environment variable.
- ``auto`` picks the first that is present, in the order npu, cuda, cpu.
- The device index defaults to ``LOCAL_RANK`` (set by torchrun), else 0; it
  counts among the *visible* devices (``ASCEND_RT_VISIBLE_DEVICES`` /
  ``CUDA_VISIBLE_DEVICES``).
- Asking for an absent device raises :class:`DeviceError` naming what was found.

bf16 support is probed, never assumed: on NPU ``torch.npu.is_bf16_supported()``
when torch_npu provides it, else by SoC name from the chip table
(``npu_rft_kernels.chips``: the first-generation Ascend 910, including the name
"Ascend910B" without a digit, and the 310 inference chips have no bf16; the
910B1..910B4_1, 910_93 and 950 have it; an unknown name gets none); on CUDA
``torch.cuda.is_bf16_supported()``.

NPU set-up, in this order, when ``get_device`` selects an NPU: ``set_device(index)``
first, so that no probe opens a context on NPU 0 (with older CANN,
``is_bf16_supported()`` initialises the current device, which is 0 until
``set_device``); then ``set_compile_mode(jit_compile=False)`` (precompiled
operator binaries: RFT's shapes change every step, and with online compilation
each new shape is compiled again); then the SoC name and the bf16 probe.
Probing only asks ``is_available()`` and ``device_count()``.

The NPU branch is tested only against a stand-in for torch_npu
(tests/npu_rft/test_device.py); see docs/ascend.md, "Verified vs unverified on
hardware".
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import random
import resource
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ContextManager, Dict, List, Optional

import numpy as np
import torch

from npu_rft.hardware import Hardware, hardware_for
from npu_rft_kernels import torch_npu_api

logger = logging.getLogger(__name__)

DEVICE_ENV = "NPU_RFT_DEVICE"
DEVICE_CHOICES = ("auto", "npu", "cuda", "cpu")
AUTO_ORDER = ("npu", "cuda", "cpu")

_DIST_BACKEND = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}
_VISIBLE_DEVICES_ENV = {"npu": "ASCEND_RT_VISIBLE_DEVICES", "cuda": "CUDA_VISIBLE_DEVICES", "cpu": None}



# Calls of Device.to_host per device type (each one a host synchronisation on an accelerator).
HOST_READS: "collections.Counter[str]" = collections.Counter()


class DeviceError(RuntimeError):
    """A device was asked for that is absent or unusable; the message says what was found."""


def soc_supports_bf16(soc_name: str) -> bool:
    """bf16 support of an Ascend SoC, by name, from the chip table
    (``npu_rft_kernels.chips``; used when torch_npu has no probe). False for
    the first-generation 910 (``Ascend910A`` ... ``Ascend910B``), the 310 chips
    and names the table does not know."""
    from npu_rft_kernels import chips

    return chips.capability(soc_name, "bf16")


# --------------------------------------------------------------------------- probing


@dataclass(frozen=True)
class Probe:
    """What was found for one device type: ``count`` usable devices, or why none."""

    type: str
    count: int
    detail: str           # "2 x Ascend910B3", or the reason none is usable

    @property
    def available(self) -> bool:
        return self.count > 0


def _import_torch_npu() -> tuple[Optional[ModuleType], str]:
    """(torch_npu, "") or (None, why it is unusable), through ``torch_npu_api``."""
    module, exc = torch_npu_api.try_import()
    if exc is None:
        return module, ""
    if torch_npu_api.not_installed(exc):
        return None, "torch_npu is not installed"
    # CANN missing (ImportError: libhccl.so ...), a CUDA torch beside it (RuntimeError: Two accelerators ...)
    return None, (f"torch_npu failed to import: {torch_npu_api.describe_import_error(exc)}; "
                  f"`npu-rft doctor` explains the fix")


def probe(device_type: str) -> Probe:
    """Look for one device type (``npu``, ``cuda`` or ``cpu``) without selecting it.
    On NPU only ``is_available()`` and ``device_count()`` are asked: nothing that
    opens a device context before ``set_device`` (the SoC name comes after it)."""
    if device_type == "npu":
        found, why = _import_torch_npu()
        if found is None:
            return Probe("npu", 0, why)
        if not torch_npu_api.npu.is_available():
            return Probe("npu", 0, "torch_npu is installed but no NPU is visible "
                                   "(check `npu-smi info` and ASCEND_RT_VISIBLE_DEVICES)")
        count = torch_npu_api.npu.device_count()
        return Probe("npu", count, f"{count} NPU(s) visible")
    if device_type == "cuda":
        if not torch.cuda.is_available():
            why = "torch has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            return Probe("cuda", 0, why)
        count = torch.cuda.device_count()
        return Probe("cuda", count, f"{count} x {torch.cuda.get_device_name(0)}")
    if device_type == "cpu":
        return Probe("cpu", 1, "cpu")
    raise ValueError(f"unknown device type {device_type!r}; choose one of {', '.join(AUTO_ORDER)}")


def probe_all() -> List[Probe]:
    """One :class:`Probe` per device type, in the ``auto`` order."""
    return [probe(t) for t in AUTO_ORDER]


def _found_summary(probes: List[Probe]) -> str:
    return "; ".join(f"{p.type}: {p.detail}" for p in probes)


# --------------------------------------------------------------------------- selection


def get_device(name: str = "auto", index: Optional[int] = None) -> "Device":
    """Resolve ``auto|npu|cuda|cpu`` to a :class:`Device`.

    ``index`` defaults to ``$LOCAL_RANK`` or 0. Raises ``ValueError`` for an unknown
    name and :class:`DeviceError` when the asked-for device or index is absent.
    """
    source = "get_device(name=...)"
    if name not in DEVICE_CHOICES:
        raise ValueError(f"{source}: unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if index is None:
        index = int(os.environ.get("LOCAL_RANK", "0"))

    if name == "auto":
        probes = []
        for device_type in AUTO_ORDER:
            found = probe(device_type)
            probes.append(found)
            if found.available:
                break
        logger.debug("device probe: %s", _found_summary(probes))
    else:
        found = probe(name)
        if not found.available:
            others = [probe(t) for t in AUTO_ORDER if t != name]
            raise DeviceError(
                f"{source}: asked for device {name!r} but it is not available ({found.detail}). "
                f"Found: {_found_summary(others)}. Fix: install/expose the device, or use 'auto' or 'cpu'."
            )

    if found.type == "cpu":
        hardware_for("cpu").setup_process()
        return Device(type="cpu", index=0, dist_backend="gloo", visible_devices_env=None,
                      supports_bf16=False, name=_cpu_name(), count=1)
    if not 0 <= index < found.count:
        env = _VISIBLE_DEVICES_ENV[found.type]
        raise DeviceError(
            f"{source}: {found.type} index {index} is out of range: {found.detail} visible "
            f"({env}={os.environ.get(env, '<unset>')}, LOCAL_RANK={os.environ.get('LOCAL_RANK', '<unset>')}). "
            f"Fix: launch at most {found.count} processes per node, or widen {env}."
        )
    return _accelerator_device(found.type, index, found.count)


def _cpu_name() -> str:
    import platform

    return platform.processor() or platform.machine() or "cpu"


def _accelerator_device(device_type: str, index: int, count: int) -> "Device":
    if device_type == "npu":
        npu = torch_npu_api.npu  # probe() imported torch_npu just before
        npu.set_device(index)  # first: every later call acts on this device, not NPU 0
        hardware_for("npu").setup_process()  # set_compile_mode(jit_compile=False)
        name = npu.get_device_name(index)
        probed = npu.is_bf16_supported()
        bf16 = probed if probed is not None else soc_supports_bf16(name)
    else:
        name = torch.cuda.get_device_name(index)
        bf16 = bool(torch.cuda.is_bf16_supported())
    return Device(type=device_type, index=index, dist_backend=_DIST_BACKEND[device_type],
                  visible_devices_env=_VISIBLE_DEVICES_ENV[device_type], supports_bf16=bf16,
                  name=name, count=count)


# --------------------------------------------------------------------------- the Device


@dataclass(frozen=True)
class Device:
    """A resolved device: what the rest of npu_rft uses instead of asking torch."""

    type: str                            # "npu" | "cuda" | "cpu"
    index: int
    dist_backend: str                    # "hccl" | "nccl" | "gloo"
    visible_devices_env: Optional[str]   # "ASCEND_RT_VISIBLE_DEVICES" | "CUDA_VISIBLE_DEVICES" | None
    supports_bf16: bool                  # probed (the 910A has none)
    name: str = "cpu"                    # "Ascend910B3", "NVIDIA H100 80GB HBM3", the CPU
    count: int = 1                       # visible devices of this type

    # ---- what to compute in

    @property
    def torch_device(self) -> torch.device:
        if self.type == "cpu":
            return torch.device("cpu")
        return torch.device(self.type, self.index)

    @property
    def compute_dtype(self) -> torch.dtype:
        """bf16 where supported; fp16 on an accelerator without bf16; fp32 on CPU."""
        if self.type == "cpu":
            return torch.float32
        return torch.bfloat16 if self.supports_bf16 else torch.float16

    @property
    def needs_loss_scaling(self) -> bool:
        """True when :attr:`compute_dtype` is fp16 (its range needs a loss scale)."""
        return self.compute_dtype == torch.float16

    def autocast(self, enabled: bool = True) -> ContextManager[Any]:
        """``torch.autocast`` in :attr:`compute_dtype`; a no-op on CPU or when disabled."""
        if not enabled or self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.type, dtype=self.compute_dtype)

    def grad_scaler(self) -> Optional[Any]:
        """A gradient scaler when :attr:`needs_loss_scaling`, else None.

        CUDA: ``torch.amp.GradScaler("cuda")``; NPU: torch_npu's
        ``torch_npu.npu.amp.GradScaler()`` (same interface).
        """
        if not self.needs_loss_scaling:
            return None
        if self.type == "npu":
            return self.npu_module().grad_scaler()
        return torch.amp.GradScaler(self.type)

    # ---- the hardware profile, and reading results on the host

    @property
    def hardware(self) -> Hardware:
        """This device type's choices (decode sync policy, decode head, process set-up): ``npu_rft.hardware``."""
        return hardware_for(self.type)

    def to_host(self, *tensors: torch.Tensor) -> Any:
        """The tensors' values as Python numbers or nested lists (one value: that
        value; several: a tuple). Every read of a result on the host in rollout,
        trainer and algorithms goes through here: on an accelerator each call is
        a device synchronisation, and ``HOST_READS`` counts the calls per device
        type so tests can hold them to a bound."""
        HOST_READS[self.type] += 1
        values = tuple(t.tolist() for t in tensors)
        return values[0] if len(values) == 1 else values

    # ---- housekeeping

    def _backend(self) -> Optional[Any]:
        """``torch.cuda`` or ``torch_npu_api.npu`` (torch_npu.npu's calls); None on CPU."""
        if self.type == "cuda":
            return torch.cuda
        if self.type == "npu":
            return self.npu_module().npu
        return None

    def npu_module(self) -> ModuleType:
        """``npu_rft_kernels.torch_npu_api``, the one module that calls torch_npu,
        for Ascend-only code (fused ops, profiler, grad scaler); torch_npu is
        importable there.

        Raises :class:`DeviceError` on any other device type.
        """
        if self.type != "npu":
            raise DeviceError(
                f"torch_npu is only reachable on an Ascend NPU device, not on {self.type!r}. "
                f"Fix: run on an NPU (device: npu) or turn the Ascend-only feature off."
            )
        found, why = _import_torch_npu()
        if found is None:
            raise DeviceError(f"device is npu but {why}")
        return torch_npu_api

    def set_current(self) -> None:
        """Make this the process's current device (before creating an HCCL/NCCL group)."""
        backend = self._backend()
        if backend is not None:
            backend.set_device(self.index)

    def synchronize(self) -> None:
        backend = self._backend()
        if backend is not None:
            backend.synchronize(self.index)

    def empty_cache(self) -> None:
        backend = self._backend()
        if backend is not None:
            backend.empty_cache()

    def memory_stats(self) -> Dict[str, int]:
        """``{"allocated", "peak_allocated", "reserved"}`` in bytes.

        Accelerators: the caching allocator's ``memory_allocated``,
        ``max_memory_allocated`` and ``memory_reserved``. CPU: the process's
        resident set size for ``allocated`` and ``reserved``, and its lifetime
        peak RSS (``ru_maxrss``) for ``peak_allocated``.
        """
        backend = self._backend()
        if backend is None:
            import psutil

            rss = int(psutil.Process().memory_info().rss)
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = maxrss if sys.platform == "darwin" else maxrss * 1024  # Linux reports KiB
            return {"allocated": rss, "peak_allocated": max(int(peak), rss), "reserved": rss}
        return {
            "allocated": int(backend.memory_allocated(self.index)),
            "peak_allocated": int(backend.max_memory_allocated(self.index)),
            "reserved": int(backend.memory_reserved(self.index)),
        }

    def reset_peak_memory_stats(self) -> None:
        """Restart the peak counter (accelerators; the CPU's ``ru_maxrss`` cannot be reset)."""
        backend = self._backend()
        if backend is not None:
            backend.reset_peak_memory_stats(self.index)

    def total_memory(self) -> int:
        """Bytes of memory on this device (host RAM on CPU)."""
        backend = self._backend()
        if backend is None:
            import psutil

            return int(psutil.virtual_memory().total)
        return int(backend.get_device_properties(self.index).total_memory)

    # ---- randomness

    def seed_everything(self, seed: int) -> None:
        """Seed Python's ``random``, NumPy's global RNG, torch's CPU RNG and every device RNG."""
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        backend = self._backend()
        if backend is not None:
            backend.manual_seed_all(seed)

    def rng_state(self) -> Dict[str, Any]:
        """Every RNG state, in a form a checkpoint can store as JSON + tensors.

        - ``"python"``: ``random.getstate()`` as nested lists (JSON);
        - ``"numpy"``: NumPy's legacy MT19937 state
          ``[name, keys(624 ints), pos, has_gauss, cached_gaussian]`` (JSON);
        - ``"torch"``: the CPU generator state, a uint8 tensor (safetensors);
        - ``"device"``: this device's generator state, a uint8 tensor; absent on CPU.

        :meth:`set_rng_state` accepts this dict back, also after the JSON parts
        went through ``json.dumps``/``json.loads`` (tuples become lists).
        """
        version, internal, gauss_next = random.getstate()
        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state: Dict[str, Any] = {
            "python": [version, list(internal), gauss_next],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
        }
        backend = self._backend()
        if backend is not None:
            state["device"] = backend.get_rng_state(self.index).cpu()
        return state

    def set_rng_state(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`rng_state` returned (see there for the form)."""
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        backend = self._backend()
        if backend is not None:
            if "device" not in state:
                raise ValueError(
                    f"rng state has no 'device' entry but the device is {self.type}: it was saved on CPU; "
                    f"resuming on an accelerator cannot restore its RNG. Fix: resume on the device it was saved on."
                )
            backend.set_rng_state(state["device"], self.index)

    # ---- profiling and reporting

    def profiler(self, out_dir: str, *, wait: int = 1, warmup: int = 1, active: int = 3, repeat: int = 1,
                 record_shapes: bool = True, profile_memory: bool = True, with_stack: bool = False) -> Any:
        """A profiler context manager writing TensorBoard traces to ``out_dir``.

        Call ``prof.step()`` once per training step; the schedule skips ``wait``
        steps, warms up ``warmup``, records ``active``, ``repeat`` times.
        NPU: ``torch_npu.profiler.profile`` with CPU+NPU activities and an
        ``_ExperimentalConfig`` at profiler level 1 with AI Core pipe-utilisation
        metrics (view the result with MindStudio Insight); elsewhere
        ``torch.profiler.profile`` (TensorBoard traces).
        """
        if self.type == "npu":
            return self.npu_module().profile(out_dir, wait=wait, warmup=warmup, active=active, repeat=repeat,
                                             record_shapes=record_shapes, profile_memory=profile_memory,
                                             with_stack=with_stack)
        prof = torch.profiler
        activities = [prof.ProfilerActivity.CPU]
        if self.type == "cuda":
            activities.append(prof.ProfilerActivity.CUDA)
        return prof.profile(
            activities=activities,
            schedule=prof.schedule(wait=wait, warmup=warmup, active=active, repeat=repeat),
            on_trace_ready=prof.tensorboard_trace_handler(out_dir),
            record_shapes=record_shapes,
            profile_memory=profile_memory,
            with_stack=with_stack,
        )

    def describe(self) -> Dict[str, Any]:
        """A JSON-ready summary for run logs."""
        info: Dict[str, Any] = dataclasses.asdict(self)
        info["compute_dtype"] = str(self.compute_dtype).replace("torch.", "")
        info["torch"] = torch.__version__
        if self.visible_devices_env:
            info["visible_devices"] = os.environ.get(self.visible_devices_env)
        if self.type == "npu":
            info["torch_npu"] = self.npu_module().version()
        info["total_memory"] = self.total_memory()
        return info
