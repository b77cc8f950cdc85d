"""Tests for npu_rft/distributed.py: the single-process paths.

Multi-process runs (torchrun, gloo) are tested with the trainer.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from npu_rft import distributed
from npu_rft.device import get_device


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "NPU_RFT_DEVICE"):
        monkeypatch.delenv(var, raising=False)
    yield
    distributed.destroy()


def test_without_torchrun_is_single_process():
    info = distributed.init_distributed(get_device("cpu"))
    assert info == distributed.DistInfo(rank=0, world_size=1, local_rank=0, is_main=True)
    assert not dist.is_initialized()


def test_world_size_one_is_single_process(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_distributed(get_device("cpu")).world_size == 1
    assert not dist.is_initialized()


def test_collectives_without_a_group_are_identities():
    tensor = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(tensor) is tensor
    assert distributed.all_reduce_sum(2.5) == 2.5
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    distributed.barrier()
    distributed.destroy()


def test_only_a_group_made_here_is_owned(monkeypatch):
    cpu = get_device("cpu")
    assert not distributed.init_distributed(cpu).owns_group  # no group at all
    assert distributed.init_distributed(cpu, single_process_group=True).owns_group
    distributed.destroy()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # the caller's own
    assert not distributed.init_distributed(cpu, single_process_group=True).owns_group
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.setenv(var, "2" if var == "WORLD_SIZE" else "0")
    assert not distributed.init_distributed(cpu).owns_group  # torchrun's variables, the group already made
    assert dist.is_initialized()


def test_missing_rank_variables_say_how_to_launch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="RANK is not set; fix: launch with torchrun"):
        distributed.init_distributed(get_device("cpu"))


def test_collectives_in_a_one_rank_gloo_group():
    # a real process group of one rank runs the same collective calls as N ranks
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    tensor = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(tensor).tolist() == [1.0, 2.0]
    total = distributed.all_reduce_sum(0.1)
    assert isinstance(total, float) and total == pytest.approx(0.1, rel=1e-7)  # summed as float32
    count = distributed.all_reduce_count(2**40 + 1)  # beyond float32's exact integers
    assert isinstance(count, int) and count == 2**40 + 1
    assert distributed.all_gather_object(("x", 3)) == [("x", 3)]
    distributed.barrier()
    distributed.destroy()
    assert not dist.is_initialized()


def test_reductions_use_dtypes_hccl_reduces(monkeypatch):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    seen = []
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, **kw: (seen.append(t.dtype), real(t, **kw))[1])
    try:
        distributed.all_reduce_sum(1.5)
        distributed.all_reduce_count(3)
        distributed.all_reduce_sum(torch.ones(2, dtype=torch.bfloat16))
        assert seen == [torch.float32, torch.int64, torch.bfloat16]
        assert set(seen) <= distributed.HCCL_REDUCE_DTYPES
        with pytest.raises(TypeError, match="HCCL reduces only .*fix: reduce counts as int64"):
            distributed.all_reduce_sum(torch.ones(2, dtype=torch.float64))
        with pytest.raises(ValueError, match="integer count"):
            distributed.all_reduce_count(2.5)
        assert len(seen) == 3  # the refused tensor never reached the collective
    finally:
        distributed.destroy()
