"""parallel.* config validation and the torch floor of fsdp2 (the sharded runs
themselves are in test_multiprocess.py: they need torchrun)."""
from __future__ import annotations

import sys

import pytest

from npu_rft.sharding import ParallelConfig, require_fsdp2


def test_parallel_config_names_the_choices_and_the_fix():
    assert ParallelConfig().strategy == "ddp"
    with pytest.raises(ValueError, match="choose one of ddp, fsdp2"):
        ParallelConfig(strategy="zero3")
    with pytest.raises(ValueError, match="set parallel.strategy: fsdp2"):
        ParallelConfig(strategy="ddp", cpu_offload=True)
    assert ParallelConfig(strategy="fsdp2", cpu_offload=True).cpu_offload


def test_fsdp2_on_a_torch_without_fully_shard_says_what_is_needed(monkeypatch):
    require_fsdp2()  # this torch has it
    monkeypatch.setitem(sys.modules, "torch.distributed.fsdp", None)  # as if torch < 2.6
    with pytest.raises(RuntimeError, match=r"needs torch >= 2\.6 .*set parallel.strategy: ddp"):
        require_fsdp2()
