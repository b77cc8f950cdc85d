"""The policy's weights as an engine loads them: Hugging Face checkpoint names, LoRA merged.

PEFT wraps the causal LM and its adapted layers, so its parameter names differ
from the checkpoint's that vLLM's ``load_weights`` understands::

    base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight  ->  model.layers.0.self_attn.q_proj.weight
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight  ->  (not pushed: merged into the above)

``engine_weight_name`` is that mapping, a pure function; ``engine_weights``
yields ``(name, tensor)`` pairs with each adapter merged into its base weight
(``W + scaling * B @ A``, the ``npu_rft.hf.merged_lora`` product), one tensor
at a time. Under FSDP2 each sharded tensor is gathered (``full_tensor()``) as
it is yielded, so at most one full parameter is held beyond the shards.
"""
from __future__ import annotations

import re
from typing import Any, Iterator, Optional, Tuple

import torch

PEFT_PREFIX = "base_model.model."
# PEFT's adapter tensors: lora_A/lora_B (per adapter name), embeddings' lora_embedding_A/B, DoRA's magnitude.
_ADAPTER_PART = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(\.|$)")


def engine_weight_name(name: str) -> Optional[str]:
    """The checkpoint name of a (PEFT-wrapped) parameter, or None for an adapter
    tensor, which is pushed merged into its base weight instead."""
    if _ADAPTER_PART.search(name):
        return None
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX):]
    return name.replace(".base_layer.", ".")


def engine_weights(model: Any) -> Iterator[Tuple[str, torch.Tensor]]:
    """``model``'s weights under checkpoint names, LoRA merged, detached; for a
    ``reload_weights``-style loader. Consume it inside ``torch.no_grad()`` (merging needs no-grad)."""
    from npu_rft.hf import merged_lora

    with merged_lora(model) as merged:
        for name, param in merged.named_parameters():
            target = engine_weight_name(name)
            if target is None:
                raise ValueError(
                    f"{name}: this adapter cannot be merged into its base weight for the engine (only plain linear "
                    "LoRA with enabled adapters merges; DoRA and LoRA on other layer types do not); use "
                    "rollout.engine: native, or plain LoRA on linear layers")
            tensor = param.detach()
            if hasattr(tensor, "full_tensor"):  # an FSDP2 shard: gather this one parameter
                tensor = tensor.full_tensor()
            yield target, tensor
