"""The Hugging Face and peft plumbing that loading (``npu_rft.model``) and
sampling (``npu_rft.rollout``) both need, below both of them.

* ``base_model`` / ``lm_head_weight``: the causal LM under a PeftModel, and
  its LM head weight (the kernels' ``W``).
* ``head_problem``: why a model's logits are not ``hidden @ W^T``, or None.
* ``merged_lora``: the no-grad context in which LoRA layers are plain linears
  with merged weights.
* ``cache_kwarg``: the name a decoder's forward takes its KV cache under.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator, Optional

import torch
from torch import nn


def base_model(model: nn.Module) -> nn.Module:
    """The HF causal LM under a PeftModel (LoRA layers stay injected)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lm_head_weight(model: nn.Module) -> torch.Tensor:
    return base_model(model).get_output_embeddings().weight


def head_problem(model: nn.Module) -> Optional[str]:
    """Why the model's logits are not ``hidden @ W^T`` with ``W = lm_head_weight(model)``
    and ``hidden`` its decoder's last hidden state, or None when they are."""
    inner = base_model(model)
    head = inner.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        return "the model has no linear LM head (get_output_embeddings())"
    if getattr(head, "bias", None) is not None:
        return "the LM head has a bias"
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(inner.config, attr, None) not in (None, 1, 1.0):
            return f"config.{attr} transforms the logits"
    return None


@contextlib.contextmanager
def merged_lora(model: nn.Module) -> Iterator[nn.Module]:
    """A context for no-grad passes in which each LoRA-adapted linear is
    replaced, in its parent module, by a plain ``nn.Linear`` with the merged
    weight ``W' = W + sum_a scaling_a * B_a @ A_a`` (over its active adapters)
    and the base bias: one GEMM per adapted layer instead of three, and no
    adapter code per call (in the decode loop: every adapted layer, every
    step). The result is the eval-mode forward (no dropout) up to the
    rounding of the merged product.

    The base weights are never written (peft's ``merge`` / ``unmerge`` add and
    subtract the delta in place, whose rounding drifts the frozen base over a
    run): ``W'`` is a new tensor, and on exit the LoRA layers are put back.
    Models without LoRA or with their adapters disabled (the reference), and
    LoRA that is not a plain linear delta (e.g. DoRA), pass through unchanged.
    """
    layers = _plain_lora_linears(model)
    if not layers:
        yield model
        return
    if torch.is_grad_enabled():
        raise RuntimeError("merged_lora() is for no-grad passes (the adapters get no gradient through it); "
                           "enter torch.no_grad() or torch.inference_mode() first")
    swapped = []
    try:
        for parent, name, layer in layers:
            base = layer.get_base_layer()
            delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
            merged = nn.Linear(base.in_features, base.out_features, bias=False, device="meta")
            merged.weight = nn.Parameter(base.weight + delta.to(base.weight.dtype), requires_grad=False)
            merged.bias = base.bias
            setattr(parent, name, merged)
            swapped.append((parent, name, layer))
        yield model
    finally:
        for parent, name, layer in swapped:
            setattr(parent, name, layer)


def _plain_lora_linears(model: nn.Module) -> list:
    """``(parent, attribute, layer)`` of every LoRA layer of the model when all
    are plain linear LoRA (an ``nn.Linear`` base, no variant) with their
    adapters enabled, else []."""
    if not hasattr(model, "disable_adapter"):
        return []
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    layers = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            if (type(module) is not LoraLinear or type(module.get_base_layer()) is not nn.Linear
                    or module.lora_variant or module.merged or module.disable_adapters):
                return []
            parent, _, attribute = name.rpartition(".")
            layers.append((model.get_submodule(parent), attribute, module))
    return layers


def cache_kwarg(module: Any) -> str:
    """The name under which ``module.forward`` (a decoder) takes and returns its
    KV cache (``cache`` in recent transformers, ``past_key_values`` before)."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
