"""The Ascend chip table, and the NPU dispatch that reads it."""
from __future__ import annotations

import types

import pytest
import torch

from npu_rft_kernels import chips, dispatch, torch_npu_api

#            name               family   bf16  max_sum fused  f64
TABLE = [
    ("Ascend910PremiumA", "910", False, False, False, False),
    ("Ascend910ProA", "910", False, False, False, False),
    ("Ascend910A", "910", False, False, False, False),
    ("Ascend910ProB", "910", False, False, False, False),
    ("Ascend910B", "910", False, False, False, False),  # first generation despite the B
    ("Ascend910B1", "910B", True, True, True, False),
    ("Ascend910B2", "910B", True, True, True, False),
    ("Ascend910B2C", "910B", True, True, True, False),
    ("Ascend910B3", "910B", True, True, True, False),
    ("Ascend910B4", "910B", True, True, True, False),
    ("Ascend910B4_1", "910B", True, True, True, False),
    ("Ascend910_9391", "910_93", True, True, False, False),  # npu_swiglu is documented for A2 only
    ("Ascend910_9362", "910_93", True, True, False, False),
    ("Ascend950PR", "950", True, False, False, True),
    ("Ascend910_9579", "950", True, False, False, True),
    ("Ascend310P3", "310", False, False, False, False),
]


@pytest.mark.parametrize("name, family, bf16, max_sum, fused, f64", TABLE)
def test_the_chip_table(name, family, bf16, max_sum, fused, f64):
    chip = chips.lookup(name)
    assert chip is not None
    assert (chip.family, chip.bf16, chip.online_max_sum, chip.fused_ops, chip.float64_reduce) == (
        family, bf16, max_sum, fused, f64)


def test_unknown_chips_are_capable_of_nothing():
    assert chips.lookup("Ascend999X") is None
    assert not any(chips.capability("Ascend999X", w) for w in ("bf16", "online_max_sum", "fused_ops"))
    assert chips.lookup(" Ascend910B3 \n") is chips.ATLAS_A2  # as the driver may pad it


def test_device_bf16_fallback_reads_the_table():
    from npu_rft.device import soc_supports_bf16

    for name, _, bf16, *_ in TABLE:
        assert soc_supports_bf16(name) is bf16, name


class _NpuTensor:
    """Enough of an NPU tensor for the dispatch: a device."""

    def __init__(self):
        self.device = types.SimpleNamespace(type="npu", index=0)


@pytest.fixture
def stand_in_torch_npu(monkeypatch):
    import torch_npu_stand_in

    return torch_npu_stand_in.install(monkeypatch, count=1)


@pytest.mark.parametrize("name, family, bf16, max_sum, fused, f64", TABLE)
def test_npu_dispatch_follows_the_table(stand_in_torch_npu, name, family, bf16, max_sum, fused, f64):
    stand_in_torch_npu.npu.soc = name
    op = dispatch.npu_online_max_sum(_NpuTensor())
    assert (op is torch_npu_api.online_max_sum) is max_sum  # the API module's wrapper of the op, or None
    why = dispatch.npu_online_max_sum_problem(_NpuTensor())
    assert (why is None) is max_sum
    if not max_sum:
        assert why == f"the chip {name} does not run npu_fused_linear_online_max_sum (Atlas A2/A3 do)"


def test_npu_dispatch_without_the_op(stand_in_torch_npu):
    del stand_in_torch_npu.npu_fused_linear_online_max_sum
    assert dispatch.npu_online_max_sum(_NpuTensor()) is None
    assert dispatch.npu_online_max_sum_problem(_NpuTensor()) == "this torch_npu has no npu_fused_linear_online_max_sum"
    assert dispatch.auto_backend(_NpuTensor()) == "npu"
