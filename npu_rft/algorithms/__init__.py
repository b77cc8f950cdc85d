"""Training algorithms behind the ``Algorithm`` seam (see ``base.py``).

Importing this package registers every algorithm in ``ALGORITHMS``.
"""
from npu_rft.algorithms.base import ALGORITHMS, Algorithm, AlgorithmState, LossOutput, MicroBatch, StepContext, StepPlan
from npu_rft.algorithms import dpo  # noqa: F401  (registers "dpo")
from npu_rft.algorithms import grpo  # noqa: F401  (registers "grpo")
from npu_rft.algorithms import sft  # noqa: F401  (registers "sft")

__all__ = ["ALGORITHMS", "Algorithm", "AlgorithmState", "LossOutput", "MicroBatch", "StepContext", "StepPlan"]
