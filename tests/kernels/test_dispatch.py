"""Backend choice: auto by device, explicit names checked, the tile budget."""
from __future__ import annotations

import logging

import pytest
import torch

from npu_rft_kernels.dispatch import UnknownBackendError
from npu_rft_kernels import dispatch
from npu_rft_kernels.dispatch import BackendUnavailableError, available_backends, resolve_logprob, tile_budget


def test_auto_picks_torch_on_cpu_and_logs_once(caplog, monkeypatch):
    monkeypatch.setattr(dispatch, "_logged_auto", set())
    x = torch.zeros(2, 3)
    with caplog.at_level(logging.INFO, logger="npu_rft_kernels.dispatch"):
        assert resolve_logprob("auto", x).__name__ == "torch_logprob"
        resolve_logprob("auto", x)
    assert [r.getMessage() for r in caplog.records] == ["fused_logprob: backend 'auto' chose 'torch' for cpu tensors"]


def test_auto_on_accelerators(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_installed", lambda: True)
    assert dispatch.auto_backend(torch.empty(0, device="meta")) == "torch"
    fake_cuda = type("T", (), {"device": torch.device("cuda", 0)})()
    assert dispatch.auto_backend(fake_cuda) == "triton"
    monkeypatch.setattr(dispatch, "triton_installed", lambda: False)
    assert dispatch.auto_backend(fake_cuda) == "torch"


def test_unavailable_backend_lists_the_available_ones(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="available here: naive, torch"):
        resolve_logprob("npu", torch.zeros(1))
    assert available_backends(torch.zeros(1)) == ["naive", "torch"]
    with pytest.raises(UnknownBackendError, match="known logprob backends: naive, npu, torch, triton"):
        resolve_logprob("cuda", torch.zeros(1))


def test_tile_budget_argument_env_and_defaults(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.delenv(dispatch.TILE_BYTES_ENV, raising=False)
    assert tile_budget(x) == dispatch.CPU_TILE_BYTES
    assert tile_budget(x, 1234) == 1234
    monkeypatch.setenv(dispatch.TILE_BYTES_ENV, "4096")
    assert tile_budget(x) == 4096
    monkeypatch.setenv(dispatch.TILE_BYTES_ENV, "lots")
    with pytest.raises(ValueError, match="NPU_RFT_KERNELS_TILE_BYTES='lots'"):
        tile_budget(x)
    with pytest.raises(ValueError, match="positive"):
        tile_budget(x, -1)
    assert tile_budget(x, 0) == 0  # the triton backend's streaming mode


def test_triton_serves_npu_tensors_only_with_triton_ascend(monkeypatch):
    npu_tensor = type("T", (), {"device": torch.device("meta")})()
    npu_tensor.device = type("D", (), {"type": "npu", "index": 0})()
    monkeypatch.setattr(dispatch, "triton_installed", lambda: True)
    monkeypatch.setattr(dispatch, "triton_ascend_installed", lambda: False)
    assert "triton-ascend" in dispatch.get_backend("triton").unavailable(npu_tensor)
    monkeypatch.setattr(dispatch, "triton_ascend_installed", lambda: True)
    assert dispatch.get_backend("triton").unavailable(npu_tensor) is None
    assert dispatch.auto_backend(npu_tensor) == "npu"  # auto keeps the npu backend; triton is asked for by name
