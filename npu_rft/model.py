"""Loading the policy (and its reference) and the one forward the losses need.

``load_policy(cfg, device, need_reference)``:

- the tokenizer and model come from a local HF directory or a hub name;
  ``trust_remote_code`` only when the config sets it; the tokenizer must have a
  chat template;
- ``model.init_adapter`` (a PEFT adapter, e.g. from an SFT warm-up) is merged
  into the base weights, so the starting policy is also the reference;
- ``finetune: lora`` wraps the model with peft; ``full`` trains every weight;
- weights' dtype (``model.dtype: auto``): LoRA keeps the frozen base in the
  device's compute dtype (bf16; fp16 where there is no bf16; fp32 on CPU) and
  its adapters in fp32; full fine-tuning keeps fp32 master weights. Compute runs
  under the device's autocast; with fp16, the trainer scales the loss;
- the reference: with LoRA, the same weights with the adapter disabled (no
  second copy); with full fine-tuning, a frozen copy in the compute dtype; none
  when the algorithm needs none (GRPO with beta = 0).

``completion_hidden(model, batch)`` runs the decoder without its LM head and
returns the final hidden states that predict the completion tokens; with
``lm_head_weight(model)`` the kernels compute log-probs without ever building
``[tokens x vocab]`` logits (``head_problem`` says when a model's logits are
not that product).

The Hugging Face and peft plumbing that loading and sampling both need
(``base_model``, ``lm_head_weight``, ``head_problem``, ``merged_lora``,
``cache_kwarg``) lives in ``npu_rft.hf``, below both: loading a model knows
nothing of sampling.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from typing import Any, ContextManager, Iterator, Optional

import torch
from torch import nn

from npu_rft.config import ModelConfig
from npu_rft.hf import base_model, cache_kwarg, head_problem, lm_head_weight, merged_lora  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer, with a pad token (the EOS token when it has none) and a chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"model.name_or_path={name_or_path!r}: the tokenizer has no chat template; use a chat/instruct model, "
            "or add a chat_template to its tokenizer_config.json"
        )
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"model.name_or_path={name_or_path!r}: the tokenizer has neither a pad nor an EOS token; "
                             "set one in its tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("tokenizer has no pad token; padding with the EOS token %r", tokenizer.eos_token)
    tokenizer.padding_side = "left"
    return tokenizer


def weights_dtype(cfg: ModelConfig, device: Any) -> torch.dtype:
    if cfg.dtype == "auto":
        return device.compute_dtype if cfg.finetune == "lora" else torch.float32
    if cfg.dtype == "float16" and cfg.finetune == "full" and device.needs_loss_scaling:
        # torch's and torch_npu's GradScaler refuse to unscale fp16 gradients: the first step would fail
        raise ValueError("model.dtype: float16 with model.finetune: full on a device that computes in fp16: fp16 "
                         "compute needs a loss scaler, which cannot unscale fp16 gradients; set model.dtype: auto "
                         "(fp32 master weights), or train LoRA adapters (finetune: lora keeps them in fp32)")
    return _DTYPES[cfg.dtype]


@dataclass
class Policy:
    model: nn.Module  # the trained model (a PeftModel under LoRA)
    tokenizer: Any
    reference: Optional[nn.Module]  # a frozen copy (full fine-tuning), else None
    lora: bool

    def reference_mode(self) -> ContextManager[nn.Module]:
        """A context in which the returned module computes the reference policy."""
        if self.lora:
            return _disabled_adapter(self.model)
        if self.reference is None:
            raise RuntimeError("no reference model was loaded; load_policy(need_reference=True) keeps one")
        return contextlib.nullcontext(self.reference)


@contextlib.contextmanager
def _disabled_adapter(model):
    with model.disable_adapter():
        yield model


def load_policy(cfg: ModelConfig, device: Any, need_reference: bool, on_device: bool = True,
                read_weights: bool = True) -> Policy:
    """The policy on ``device``; ``on_device=False`` leaves it in host memory
    (FSDP2 then moves each rank's shards alone to the device).
    ``read_weights=False`` builds the same modules on the meta device without
    reading a weight (the fsdp2 ranks other than 0: ``npu_rft.sharding``
    fills their shards from rank 0's weights)."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(cfg.name_or_path, cfg.trust_remote_code)
    dtype = weights_dtype(cfg, device)
    if read_weights:
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, dtype=dtype,
                                                     trust_remote_code=cfg.trust_remote_code)
    else:
        model = _meta_model(cfg, dtype)
    check_fused_head(model, cfg.name_or_path)
    if on_device and read_weights:
        model.to(device.torch_device)
    # merging leaves the modules as they are: without weights there is nothing to merge (rank 0's merged
    # weights arrive with the shards)
    if cfg.init_adapter and read_weights:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, cfg.init_adapter).merge_and_unload()
        logger.info("merged the initial adapter %s into the base weights", cfg.init_adapter)
    logger.info(
        "model %s: weights %s, compute %s%s, %s",
        cfg.name_or_path,
        str(dtype).replace("torch.", ""),
        str(device.compute_dtype).replace("torch.", ""),
        " with dynamic loss scaling" if device.needs_loss_scaling else "",
        "LoRA" if cfg.finetune == "lora" else "full fine-tuning",
    )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    reference = None
    if cfg.finetune == "lora":
        from peft import get_peft_model

        model.requires_grad_(False)
        model = get_peft_model(model, peft_lora_config(cfg))
    else:
        model.requires_grad_(True)
        if need_reference:
            reference = copy.deepcopy(model).to(device.compute_dtype).eval().requires_grad_(False)
    if cfg.fused_op_names:  # before the MLP patches below, which wrap whatever forward the MLP has
        for m in (model, reference):
            if m is not None:
                device.hardware.apply_fused_ops(m, device, cfg.fused_op_names)
    if cfg.lean_swiglu:
        from npu_rft.lean_mlp import patch_lean_mlps

        logger.info("lean SwiGLU in %d MLP modules (2 of 3 activations kept for backward)", patch_lean_mlps(model))
    if cfg.recompute_mlp and not cfg.gradient_checkpointing:
        from npu_rft.lean_mlp import patch_recomputed_mlps

        logger.info("%d MLP modules recomputed in the backward (only their inputs kept)", patch_recomputed_mlps(model))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100.0 * trainable / max(total, 1))
    return Policy(model=model, tokenizer=tokenizer, reference=reference, lora=cfg.finetune == "lora")


def _meta_model(cfg: ModelConfig, dtype: torch.dtype) -> nn.Module:
    """The model ``from_pretrained`` would build, on the meta device: its modules,
    parameter shapes and dtypes, and its generation config, but no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code).to(dtype).eval()
    try:  # from_pretrained reads generation_config.json when there is one (its EOS ids end sampling)
        model.generation_config = GenerationConfig.from_pretrained(cfg.name_or_path)
    except OSError:
        pass
    return model


def peft_lora_config(cfg: ModelConfig) -> Any:
    """peft's ``LoraConfig`` of ``model.lora``."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")


def check_fused_head(model: nn.Module, where: str) -> None:
    """The fused losses compute ``hidden @ W^T``: refuse heads that do more."""
    problem = head_problem(model)
    if problem is not None:
        raise ValueError(f"{where}: {problem}, which the fused log-prob kernels do not support; "
                         "this model cannot be trained here")


def completion_hidden(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    share_prompts: bool = True,
) -> torch.Tensor:
    """Final hidden states ``[b, C, H]`` at the positions that predict
    ``completion_ids`` (positions ``P-1 .. P+C-2`` of prompt + completion).

    Runs the decoder only (no LM head). Position ids count real tokens, so a
    left-padded prompt is encoded as if unpadded.

    Rows that share a prompt (GRPO's K samples) share its computation: each
    distinct prompt runs once, its KV cache is indexed out to its rows, and
    only the completions run per row, so the prompt costs 1/K of its tokens,
    forward and backward (the indexing sums the gradients of the K rows).
    Gradient checkpointing drops the KV cache in training, so with it every
    row runs prompt + completion; so does ``share_prompts=False``, which
    calls the decoder exactly once whatever the batch (FSDP2's per-layer
    collectives follow the number of decoder calls, which must not differ
    between ranks).
    """
    p = prompt_ids.shape[1]
    if p == 0:
        raise ValueError("completion_hidden: the prompt is empty in every row; each row needs at least one prompt token")
    decoder = base_model(model).get_decoder()
    key = prompt_ids.masked_fill(~prompt_mask.bool(), -1)
    unique, inverse = torch.unique(key, dim=0, return_inverse=True)
    if (not share_prompts or unique.shape[0] == key.shape[0] or completion_ids.shape[1] == 0
            or _drops_cache(decoder)):
        return _hidden_unshared(decoder, prompt_ids, prompt_mask, completion_ids, completion_mask)
    return _hidden_shared(decoder, prompt_ids, prompt_mask, completion_ids, completion_mask, inverse)


def _drops_cache(decoder: nn.Module) -> bool:
    """True when gradient checkpointing is active (it turns the KV cache off)."""
    if not (decoder.training and torch.is_grad_enabled()):
        return False
    return any(getattr(m, "gradient_checkpointing", False) is True for m in decoder.modules())


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(dim=1) - 1).clamp_(min=0)


def _hidden_unshared(decoder, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    p, c = prompt_ids.shape[1], completion_ids.shape[1]
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, completion_mask], dim=1).long()
    out = decoder(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False)
    return out.last_hidden_state[:, p - 1 : p + c - 1]


def _hidden_shared(decoder, prompt_ids, prompt_mask, completion_ids, completion_mask, inverse) -> torch.Tensor:

    name = cache_kwarg(decoder)
    first = torch.zeros(int(inverse.max()) + 1, dtype=torch.long, device=inverse.device)
    first.scatter_(0, inverse.flip(0), torch.arange(len(inverse) - 1, -1, -1, device=inverse.device))
    u_mask = prompt_mask[first].long()
    out = decoder(input_ids=prompt_ids[first], attention_mask=u_mask, position_ids=_positions(u_mask), use_cache=True)
    cache = getattr(out, name)
    cache.batch_select_indices(inverse)
    last = out.last_hidden_state[:, -1][inverse]  # predicts each row's first completion token
    c = completion_ids.shape[1]
    if c == 1:
        return last[:, None]
    mask = torch.cat([prompt_mask, completion_mask], dim=1).long()[:, :-1]
    positions = prompt_mask.long().sum(dim=1, keepdim=True) + torch.arange(c - 1, device=mask.device)
    rest = decoder(input_ids=completion_ids[:, :-1], attention_mask=mask, position_ids=positions,
                   use_cache=True, **{name: cache})
    return torch.cat([last[:, None], rest.last_hidden_state], dim=1)


class CompletionHidden(nn.Module):
    """``completion_hidden`` as a module, so that DDP can wrap the forward the
    loss uses (and FSDP2 make it the root shard unit)."""

    def __init__(self, model: nn.Module, share_prompts: bool = True) -> None:
        super().__init__()
        self.model = model
        self.share_prompts = share_prompts

    def forward(self, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
        return completion_hidden(self.model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                 self.share_prompts)
