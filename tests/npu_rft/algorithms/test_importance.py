"""The train-inference mismatch metrics and the tis/mis weights, against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from npu_rft.algorithms.importance import (
    importance_weights,
    mismatch_metrics,
    mismatch_sums,
    pad_logprobs,
)

LN2, LN4 = math.log(2.0), math.log(4.0)


def _case():
    # trainer log-probs -1 everywhere; the engine's make the ratios exp(p - e) = 2, 0.25, 1 (row 0)
    # and 1 then padding (row 1)
    trainer = torch.full((2, 3), -1.0)
    engine = torch.tensor([[-1.0 - LN2, -1.0 + LN4, -1.0], [-1.0, 5.0, 5.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    return trainer, engine, mask


def test_mismatch_sums_and_metrics_by_hand():
    trainer, engine, mask = _case()
    sums = mismatch_sums(engine, trainer, mask)
    assert sums["tokens"] == 4
    assert sums["abs_sum"] == pytest.approx(LN2 + LN4)
    assert sums["abs_max"] == pytest.approx(LN4)
    # k3 = rho - log(rho) - 1: (2 - ln2 - 1) + (0.25 + ln4 - 1) + 0 + 0
    assert sums["kl_sum"] == pytest.approx((1 - LN2) + (LN4 - 0.75))
    metrics = mismatch_metrics([sums, {"tokens": 1, "abs_sum": 3.0, "abs_max": 3.0, "kl_sum": 0.5}])
    assert metrics == pytest.approx({"mismatch/abs_mean": (LN2 + LN4 + 3.0) / 5, "mismatch/abs_max": 3.0,
                                     "mismatch/kl": ((1 - LN2) + (LN4 - 0.75) + 0.5) / 5})


def test_mismatch_is_zero_when_the_engine_agrees():
    trainer, _, mask = _case()
    assert mismatch_metrics([mismatch_sums(trainer.clone(), trainer, mask)]) == {
        "mismatch/abs_mean": 0.0, "mismatch/abs_max": 0.0, "mismatch/kl": 0.0}
    assert mismatch_metrics([]) == {"mismatch/abs_mean": 0.0, "mismatch/abs_max": 0.0, "mismatch/kl": 0.0}


def test_tis_caps_the_ratio_and_mis_masks_tokens_outside_the_band():
    trainer, engine, mask = _case()
    tis = importance_weights(trainer, engine, "tis", cap=1.5)
    assert tis[0].tolist() == pytest.approx([1.5, 0.25, 1.0])  # min(2, 1.5), min(0.25, 1.5), min(1, 1.5)
    mis = importance_weights(trainer, engine, "mis", cap=3.0)
    assert mis[0].tolist() == [1.0, 0.0, 1.0]  # 0.25 < 1/3 leaves the band [1/3, 3]
    sums = mismatch_sums(engine, trainer, mask, mis)
    assert mismatch_metrics([sums])["mismatch/weight_mean"] == pytest.approx(3 / 4)  # row 1's one token is kept


def test_importance_weights_reject_bad_settings():
    trainer, engine, _ = _case()
    with pytest.raises(ValueError, match="must be tis or mis"):
        importance_weights(trainer, engine, "none", cap=2.0)
    with pytest.raises(ValueError, match="must be > 1"):
        importance_weights(trainer, engine, "tis", cap=1.0)


def test_pad_logprobs_left_aligns_rows():
    assert pad_logprobs([[-1.0, -2.0], [], [-3.0]], 3).tolist() == [[-1.0, -2.0, 0.0], [0.0, 0.0, 0.0],
                                                                     [-3.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="row 0 has 2 engine log-probs"):
        pad_logprobs([[-1.0, -2.0]], 1)
