"""npu_rft_kernels: the fused log-prob and the GRPO/DPO losses built on it.

``fused_logprob`` computes per-token log-probabilities (and entropy) from
hidden states and the LM head without materialising the [tokens, vocab]
logits; ``grpo_loss``/``dpo_loss`` are the plain losses on log-probs and the
``fused_linear_*`` versions compute them from hidden states. Backends
(naive, torch, triton, npu) are chosen in ``npu_rft_kernels.dispatch``.
"""
from npu_rft_kernels.dispatch import BackendUnavailableError, available_backends
from npu_rft_kernels.logprob import fused_logprob
from npu_rft_kernels.losses import dpo_loss, fused_linear_dpo_loss, fused_linear_grpo_loss, grpo_loss

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "dpo_loss",
    "fused_linear_dpo_loss",
    "fused_linear_grpo_loss",
    "fused_logprob",
    "grpo_loss",
]
