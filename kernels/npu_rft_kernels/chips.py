"""The Ascend chips and what each can do: the one table that ``npu_rft.device``,
the kernels' dispatch and the fused ops read.

Names are what ``torch_npu.npu.get_device_name()`` returns: torch_npu's SoC
names (``SocVersion`` in ``torch_npu/csrc/core/npu/NpuVariables.h``). Note that
``"Ascend910B"`` with no digit is a *first-generation* 910, while
``"Ascend910B1"``..``"Ascend910B4_1"`` are the second generation (Atlas A2):
never match the 910B range by prefix.

Capabilities, from torch_npu 2.13.0's documentation and sources:

* ``bf16``: no bf16 on the first-generation 910 nor on the 310 inference chips.
* ``online_max_sum``: ``npu_fused_linear_online_max_sum`` (bf16/fp16). Atlas
  A2/A3 with CANN >= 9.0 per torch_npu's online operator documentation; the
  2.13.0 wheel's own docstring names no chips.
* ``fused_ops``: ``npu_rms_norm``, ``npu_rotary_mul`` and ``npu_swiglu`` in
  bf16, used by ``model.npu_fused_ops``. The wheel documents ``npu_swiglu``
  for the Atlas A2 series only (``npu_rotary_mul`` for A2 and A3), so the three
  are enabled on the A2 alone; A3 and 950 wait for documentation or a run.
* ``float64_reduce``: HCCL all-reduces float64 (from Ascend950 on; earlier
  chips refuse it, so npu_rft never reduces float64 anyway).

The Ascend950 entries follow torch_npu's own name tests (``"Ascend950"`` and
``"Ascend910_95"`` prefixes). Nothing here has been checked on hardware.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class Chip:
    family: str                 # "910", "910B", "910_93", "950", "310"
    bf16: bool
    online_max_sum: bool
    fused_ops: bool
    float64_reduce: bool


FIRST_GEN_910 = Chip("910", bf16=False, online_max_sum=False, fused_ops=False, float64_reduce=False)
ATLAS_A2 = Chip("910B", bf16=True, online_max_sum=True, fused_ops=True, float64_reduce=False)
ATLAS_A3 = Chip("910_93", bf16=True, online_max_sum=True, fused_ops=False, float64_reduce=False)
ASCEND_950 = Chip("950", bf16=True, online_max_sum=False, fused_ops=False, float64_reduce=True)
INFERENCE_310 = Chip("310", bf16=False, online_max_sum=False, fused_ops=False, float64_reduce=False)

# Exact names first; then prefixes for the families whose names carry a suffix.
CHIPS = {
    **{n: FIRST_GEN_910 for n in ("Ascend910PremiumA", "Ascend910ProA", "Ascend910A", "Ascend910ProB", "Ascend910B")},
    **{n: ATLAS_A2 for n in ("Ascend910B1", "Ascend910B2", "Ascend910B2C", "Ascend910B3", "Ascend910B4",
                             "Ascend910B4_1")},
    **{n: ATLAS_A3 for n in ("Ascend910_9391", "Ascend910_9392", "Ascend910_9381", "Ascend910_9382",
                             "Ascend910_9372", "Ascend910_9362")},
}
PREFIXES: Tuple[Tuple[str, Chip], ...] = (
    ("Ascend950", ASCEND_950),
    ("Ascend910_95", ASCEND_950),
    ("Ascend910_93", ATLAS_A3),
    ("Ascend310", INFERENCE_310),
)


def lookup(name: str) -> Optional[Chip]:
    """The :class:`Chip` for a SoC name, or None for a name this table does not know."""
    name = name.strip()
    if name in CHIPS:
        return CHIPS[name]
    for prefix, chip in PREFIXES:
        if name.startswith(prefix):
            return chip
    return None


def capability(name: str, what: str) -> bool:
    """``lookup(name).<what>``; False for an unknown chip (nothing is assumed)."""
    chip = lookup(name)
    return bool(getattr(chip, what)) if chip is not None else False
