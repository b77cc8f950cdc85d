"""Tests for npu_rft/device.py.

This machine has no Ascend NPU. The NPU branch is exercised against a STAND-IN
for torch_npu (tests/torch_npu_stand_in.py), a small module placed in
``sys.modules["torch_npu"]`` that plays the part of torch_npu's Python API as
device.py uses it through npu_rft_kernels.torch_npu_api (``torch_npu.npu.is_available``,
``device_count``, ``set_device``, ``set_compile_mode``, ``get_device_name``,
``is_bf16_supported``, memory and RNG calls), with the wheel's parameter names
(tests/kernels/test_torch_npu_api.py), recording every call in order. It checks
our logic, not torch_npu: nothing here proves the real library behaves the same.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import types

import numpy as np
import pytest
import torch
from helpers import run_command

import torch_npu_stand_in
from npu_rft.cpu import ONEDNN_CACHE_CAPACITY
from npu_rft.device import DeviceError, get_device
from npu_rft_kernels import torch_npu_api


def _install_stand_in(monkeypatch, soc="Ascend910B3", count=2, bf16_probe=None):
    return torch_npu_stand_in.install(monkeypatch, soc=soc, count=count, bf16_probe=bf16_probe)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("NPU_RFT_DEVICE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


def _no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ----------------------------------------------------------------- CPU (real)


def test_cpu_device_properties():
    dev = get_device("cpu")
    assert (dev.type, dev.index, dev.dist_backend, dev.visible_devices_env) == ("cpu", 0, "gloo", None)
    assert dev.supports_bf16 is False
    assert dev.torch_device == torch.device("cpu")
    assert dev.compute_dtype == torch.float32
    assert dev.needs_loss_scaling is False
    assert dev.grad_scaler() is None
    with dev.autocast():
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        dev.type = "cuda"  # type: ignore[misc]


def test_auto_on_this_machine_falls_back_to_cpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import torch_npu -> ImportError
    _no_cuda(monkeypatch)
    assert get_device("auto").type == "cpu"


def test_cpu_memory_stats_are_process_rss():
    import psutil

    stats = get_device("cpu").memory_stats()
    assert set(stats) == {"allocated", "peak_allocated", "reserved"}
    rss = psutil.Process().memory_info().rss
    assert 0.5 * rss < stats["allocated"] < 2 * rss
    assert stats["peak_allocated"] >= stats["allocated"]


def test_cpu_device_bounds_onednn_caches_unless_the_user_set_them(monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    get_device("cpu")
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(ONEDNN_CACHE_CAPACITY)
    assert os.environ["LRU_CACHE_CAPACITY"] == "7"


_CACHE_PROBE = """
import ctypes, sys
import torch
from npu_rft_kernels.logprob.shifted import onednn_linear, onednn_pack
if sys.argv[1] == "bounded":
    from npu_rft.device import get_device
    get_device("cpu")
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                 "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
torch.set_num_threads(1)
packed = onednn_pack(torch.randn(512, 128), 8)
if packed is None:
    print("no-onednn")
    raise SystemExit
before = libc.mallinfo2().uordblks
for rows in range(1, 301):
    onednn_linear(torch.randn(rows, 128), packed)
print((libc.mallinfo2().uordblks - before) / 2**20)
"""


def test_bounded_onednn_caches_stop_the_heap_growing_with_new_shapes(tmp_path):
    """300 GEMMs of 300 shapes: oneDNN's default caches keep a primitive per shape,
    the bounded ones at most 64 (each process is fresh: the caches read their
    capacity once)."""
    import ctypes.util

    if not ctypes.util.find_library("c") or sys.platform != "linux":
        pytest.skip("needs glibc's mallinfo2")
    script = tmp_path / "probe.py"
    script.write_text(_CACHE_PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    grown = {}
    for mode in ("default", "bounded"):
        out = run_command([sys.executable, str(script), mode], env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        last = out.stdout.strip().splitlines()[-1]
        if last == "no-onednn":
            pytest.skip("this torch has no oneDNN linear")
        grown[mode] = float(last)
    assert grown["bounded"] < 0.5 * grown["default"], grown


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="auto, npu, cuda, cpu"):
        get_device("tpu")


def test_absent_device_error_says_what_was_found(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    _no_cuda(monkeypatch)
    with pytest.raises(DeviceError) as info:
        get_device("npu")
    message = str(info.value)
    assert "torch_npu is not installed" in message
    assert "cuda:" in message and "cpu: cpu" in message


def test_get_device_reads_no_environment(monkeypatch):
    # NPU_RFT_DEVICE fills run.device / --device where they are unset (tests/npu_rft/test_config.py);
    # an explicit name always wins
    monkeypatch.setenv("NPU_RFT_DEVICE", "cpu")
    _install_stand_in(monkeypatch)
    assert get_device("npu").type == "npu"
    with pytest.raises(ValueError, match=r"unknown device 'gpu'"):
        get_device("gpu")


def test_seed_everything_is_reproducible():
    dev = get_device("cpu")

    def draw():
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    dev.seed_everything(1234)
    first = draw()
    dev.seed_everything(1234)
    assert draw() == first
    dev.seed_everything(1235)
    assert draw() != first


def test_rng_state_round_trips_through_json():
    dev = get_device("cpu")
    dev.seed_everything(7)
    state = dev.rng_state()
    # what a checkpoint does: JSON for python/numpy, tensors kept as tensors
    saved = json.loads(json.dumps({"python": state["python"], "numpy": state["numpy"]}))
    saved["torch"] = state["torch"].clone()
    expected = (random.random(), float(np.random.rand()), torch.rand(2).tolist())
    random.random(), np.random.rand(), torch.rand(5)  # move every RNG on
    dev.set_rng_state(saved)
    assert (random.random(), float(np.random.rand()), torch.rand(2).tolist()) == expected


def test_describe_is_json_ready():
    info = get_device("cpu").describe()
    json.dumps(info)
    assert info["type"] == "cpu" and info["compute_dtype"] == "float32" and info["total_memory"] > 0


def test_profiler_on_cpu_writes_a_trace(tmp_path):
    dev = get_device("cpu")
    with dev.profiler(str(tmp_path), wait=0, warmup=1, active=1) as prof:
        for _ in range(2):
            torch.ones(4).sum()
            prof.step()
    assert any(tmp_path.iterdir())


def test_npu_module_refused_off_npu():
    with pytest.raises(DeviceError, match="only reachable on an Ascend NPU"):
        get_device("cpu").npu_module()


# ----------------------------------------------------------------- NPU (stand-in)


def test_npu_stand_in_910b_device(monkeypatch):
    stand_in = _install_stand_in(monkeypatch, soc="Ascend910B3", count=2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    dev = get_device("auto")
    assert (dev.type, dev.index, dev.count, dev.name) == ("npu", 1, 2, "Ascend910B3")
    assert dev.dist_backend == "hccl"
    assert dev.visible_devices_env == "ASCEND_RT_VISIBLE_DEVICES"
    assert dev.supports_bf16 is True  # by SoC name: the stand-in has no is_bf16_supported
    assert dev.compute_dtype == torch.bfloat16 and not dev.needs_loss_scaling
    assert dev.memory_stats() == {"allocated": 100, "peak_allocated": 300, "reserved": 512}
    stand_in.npu.calls.clear()
    dev.synchronize()
    dev.empty_cache()
    dev.reset_peak_memory_stats()
    dev.set_current()
    assert stand_in.npu.calls == [("synchronize", 1), ("empty_cache",),
                                  ("reset_peak_memory_stats", 1), ("set_device", 1)]
    assert dev.npu_module() is torch_npu_api  # the one module that calls torch_npu
    assert dev.describe()["torch_npu"] == "2.13.0"


def test_npu_stand_in_910a_has_no_bf16(monkeypatch):
    _install_stand_in(monkeypatch, soc="Ascend910A", count=1)
    dev = get_device("npu")
    assert dev.supports_bf16 is False
    assert dev.compute_dtype == torch.float16
    assert dev.needs_loss_scaling is True


def test_npu_bf16_probe_preferred_over_soc_name(monkeypatch):
    _install_stand_in(monkeypatch, soc="Ascend910B3", count=1, bf16_probe=False)
    assert get_device("npu").supports_bf16 is False


def test_npu_index_out_of_range_names_the_variables(monkeypatch):
    _install_stand_in(monkeypatch, count=2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "0,1")
    with pytest.raises(DeviceError, match=r"index 3 is out of range.*ASCEND_RT_VISIBLE_DEVICES=0,1.*LOCAL_RANK=3"):
        get_device("npu")


def test_npu_present_but_no_device_visible(monkeypatch):
    _install_stand_in(monkeypatch, count=0)
    _no_cuda(monkeypatch)
    assert get_device("auto").type == "cpu"
    with pytest.raises(DeviceError, match="no NPU is visible"):
        get_device("npu")


def test_npu_seed_and_rng_state_include_the_device(monkeypatch):
    _install_stand_in(monkeypatch, count=1)
    dev = get_device("npu")
    dev.seed_everything(5)
    state = dev.rng_state()
    assert state["device"].tolist() == [5, 0]
    dev.seed_everything(9)
    dev.set_rng_state(state)
    assert dev.rng_state()["device"].tolist() == [5, 0]
    del state["device"]
    with pytest.raises(ValueError, match="saved on CPU"):
        dev.set_rng_state(state)



def test_npu_set_up_sets_the_device_before_any_probe_then_the_compile_mode(monkeypatch):
    """Probing asks only is_available/device_count; selecting sets the device first
    (so no call opens a context on NPU 0), then jit_compile=False, then reads the
    name and probes bf16 on that device."""
    stand_in = _install_stand_in(monkeypatch, soc="Ascend910B3", count=4, bf16_probe=True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    dev = get_device("npu")
    assert stand_in.npu.calls == [("is_available",), ("device_count",), ("set_device", 3),
                                  ("set_compile_mode", False), ("get_device_name", 3), ("is_bf16_supported",)]
    assert stand_in.npu.compile_mode is False and dev.supports_bf16 is True


def test_npu_auto_and_probe_open_no_device(monkeypatch):
    stand_in = _install_stand_in(monkeypatch, count=2, bf16_probe=True)
    from npu_rft.device import probe_all

    assert [p.detail for p in probe_all()][0] == "2 NPU(s) visible"
    assert stand_in.npu.calls == [("is_available",), ("device_count",)]
    stand_in.npu.calls.clear()
    get_device("auto", index=0)
    assert [c[0] for c in stand_in.npu.calls][:3] == ["is_available", "device_count", "set_device"]


def test_a_broken_torch_npu_import_names_its_root_cause(monkeypatch):
    """As torch_npu 2.13.0 fails without CANN when imported directly (autoload off):
    the probe's reason names the root cause, not only the top line."""
    class FailingFinder:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name != "torch_npu":
                return None
            try:
                raise ImportError("libhccl.so: cannot open shared object file: No such file or directory")
            except ImportError as inner:
                raise RuntimeError("stand-in wrapper of the failure") from inner

    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.setattr(sys, "meta_path", [FailingFinder] + sys.meta_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=r"root cause: ImportError: libhccl.so: cannot open shared object.*"
                                          r"`npu-rft doctor` explains the fix"):
        get_device("npu")
