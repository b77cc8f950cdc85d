"""Graders: pure ``(completion, example) -> Grade`` functions, and the reward that combines them."""
from npu_rft.graders.base import GRADERS, Grade, Grader, get_grader, topk_hit, validate_examples
from npu_rft.graders import clean_end, exact_match, inverse_rank, json_format  # noqa: F401  (register the built-ins)
from npu_rft.graders.reward import GraderSpec, Reward, RewardResult
from npu_rft.graders.weighted import weighted

__all__ = [
    "GRADERS", "Grade", "Grader", "GraderSpec", "Reward", "RewardResult",
    "get_grader", "topk_hit", "validate_examples", "weighted",
]
