"""``rollout.engine: native``: our own samplers (``npu_rft.rollout``) behind the engine protocol.

The sampler runs on the policy module itself, so there are no weights to sync
and nothing to sleep; it returns no log-probs. Each rollout draws from a
generator on the device seeded with the step seed, exactly as the samplers did
before engines existed, so runs and resumes stay bit-identical.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch


class NativeEngine:
    returns_logprobs = False

    def __init__(self, sampler: Any, device: Any) -> None:
        self.sampler = sampler
        self.device = device

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: Any, seed: int) -> Any:
        generator = torch.Generator(device=self.device.torch_device)
        generator.manual_seed(seed)
        return self.sampler.sample(prompt_ids, params, generator=generator)

    def sync_weights(self, model: Any) -> None:
        """Nothing to do: the sampler decodes with the policy module itself."""
