"""Per-device memory of a training run before it is launched: ``npu-rft doctor --plan``.

``plan_memory(shape, ...)`` adds up, per device, in bytes (P parameters,
S = the number of ranks under ``parallel.strategy: fsdp2``, 1 under ddp;
c = the compute dtype's bytes, 2 for bf16; w = the weights' bytes, from
``model.dtype``: under ``auto`` 4 for full fine-tuning, c for LoRA's frozen base):

==========================  ============================================================
parameters                  full fine-tuning: w P / S (fp32 master weights under auto);
                            LoRA: w P / S (the frozen base) + 4 per adapter parameter
gradients                   full: w P / S; LoRA: 4 per adapter parameter (peft keeps
                            adapters in fp32)
optimizer state             AdamW: 2 w P / S (two moments in the weights' dtype);
                            SGD with momentum: w P / S; LoRA: 8 or 4 per adapter parameter
DDP gradient buckets        ddp with 2 ranks or more, full: w P (a flat copy of the gradients)
reference copy              full fine-tuning when the algorithm needs one: c P / S
rollout gather              fsdp2: c P, the whole policy gathered for sampling (and, at
                            another time, the whole reference for its log-prob pass)
KV cache                    2 x layers x kv_heads x head_dim x c bytes per token of the
                            rank's rollout (prompts per call x K x (prompt + completion))
==========================  ============================================================

With ``parallel.cpu_offload`` the parameters, gradients, optimizer state and
reference shards live in host memory instead. The peak per device is the
resident part plus the rollout's gather and KV cache. Activations are
estimated apart: about ``(16 h + 8 i) x layers`` bytes per token of a training
micro-batch in bf16 without recomputation, ``2 h x layers`` plus one layer's
with ``model.gradient_checkpointing``.

The parameters, gradients and optimizer rows are what the trainer logs as
``memory/param_bytes``, ``memory/grad_bytes`` and ``memory/optimizer_bytes``
(this rank's local shards); ``tests/npu_rft/test_multiprocess.py`` checks the
formula against them on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

GB = 1e9

# Qwen2.5 shapes (config.json of the Instruct models), for planning without the weights.
QWEN25_SHAPES: Dict[str, Dict[str, Any]] = {
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "14B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    "32B": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
}


@dataclass(frozen=True)
class ModelShape:
    params: int
    layers: int
    hidden: int
    intermediate: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_hf_config(cls, config: Any) -> "ModelShape":
        """Counted exactly, by building the model on the meta device (no memory)."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        params = sum(p.numel() for p in model.parameters())
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(params=params, layers=config.num_hidden_layers, hidden=config.hidden_size,
                   intermediate=config.intermediate_size,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim)

    @classmethod
    def qwen25(cls, size: str) -> "ModelShape":
        from transformers import Qwen2Config

        return cls.from_hf_config(Qwen2Config(**QWEN25_SHAPES[size]))


@dataclass
class MemoryPlan:
    rows: List[Tuple[str, float, str]] = field(default_factory=list)  # (what, bytes, "device" | "host")
    activation_bytes_per_token: float = 0.0
    micro_batch_tokens: int = 0
    device_bytes: Optional[float] = None  # one device's memory, when known

    def total(self, where: str = "device") -> float:
        return sum(b for _, b, w in self.rows if w == where)

    def get(self, name: str) -> float:
        return sum(b for n, b, _ in self.rows if n == name)

    @property
    def activations(self) -> float:
        return self.activation_bytes_per_token * self.micro_batch_tokens

    def format_text(self) -> str:
        lines = [f"  {name:<22} {human(b):>10}  ({where})" for name, b, where in self.rows]
        lines.append(f"  {'peak per device':<22} {human(self.total()):>10}  before activations")
        lines.append(f"  {'activations':<22} {human(self.activations):>10}  "
                     f"({human(self.activation_bytes_per_token)} per token x {self.micro_batch_tokens} tokens "
                     "of a micro-batch)")
        if self.device_bytes:
            room = self.device_bytes - self.total() - self.activations
            verdict = "fits" if room >= 0 else "does NOT fit"
            lines.append(f"  {verdict} in {self.device_bytes / GB:.0f} GB ({room / GB:+.1f} GB left)")
        return "\n".join(lines)


def human(n: float) -> str:
    """Bytes in GB, MB or KB (powers of 1000)."""
    for unit, size in (("GB", GB), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def plan_memory(shape: ModelShape, *, strategy: str, nproc: int, cpu_offload: bool = False,
                finetune: str = "full", optimizer: str = "adamw", momentum: float = 0.0,
                reference: bool = False, compute_bytes: int = 2, weight_bytes: Optional[int] = None,
                adapter_params: int = 0, rollout_tokens: int = 0, micro_batch_tokens: int = 0,
                gradient_checkpointing: bool = False, device_bytes: Optional[float] = None) -> MemoryPlan:
    """The per-device memory of one rank (module docstring). ``weight_bytes``:
    the weights' bytes (``model.dtype``); None is ``auto``."""
    p, c = shape.params, compute_bytes
    s = nproc if strategy == "fsdp2" else 1
    resident = "host" if cpu_offload else "device"
    plan = MemoryPlan(device_bytes=device_bytes, micro_batch_tokens=micro_batch_tokens)
    full = finetune == "full"
    w = weight_bytes if weight_bytes is not None else (4 if full else c)
    # what is trained: every weight (sharded) in the weights' dtype, or the fp32 adapters (replicated)
    trained_bytes = w * p / s if full else 4 * adapter_params
    plan.rows.append(("parameters", w * p / s if full else w * p / s + 4 * adapter_params, resident))
    plan.rows.append(("gradients", trained_bytes, resident))
    moments = 2 if optimizer == "adamw" else (1 if momentum else 0)
    plan.rows.append(("optimizer state", moments * trained_bytes, resident))
    if strategy == "ddp" and nproc > 1 and full:
        plan.rows.append(("DDP gradient buckets", w * p, "device"))
    if reference and full:
        plan.rows.append(("reference copy", c * p / s, resident))
    if strategy == "fsdp2":
        plan.rows.append(("rollout gather", c * p, "device"))
    plan.rows.append(("KV cache", 2 * shape.layers * shape.kv_heads * shape.head_dim * c * rollout_tokens, "device"))
    h, i, layers = shape.hidden, shape.intermediate, shape.layers
    per_token = 2 * h * layers + (16 * h + 8 * i) if gradient_checkpointing else (16 * h + 8 * i) * layers
    plan.activation_bytes_per_token = per_token * c / 2
    return plan


def plan_for_config(config: Any, nproc: int, device_gb: Optional[float] = None) -> MemoryPlan:
    """``plan_memory`` for a ``TrainConfig`` on ``nproc`` ranks: the model's
    shape from its ``config.json``, the batch from the config, the weights'
    bytes from ``model.dtype`` (bf16 compute, fp32 on a CPU run)."""
    import torch
    from transformers import AutoConfig

    if nproc < 1:
        raise ValueError(f"--nproc {nproc}: the number of ranks must be >= 1")
    model_cfg = config.model
    hf_config = AutoConfig.from_pretrained(model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code)
    shape = ModelShape.from_hf_config(hf_config)
    algorithm = config.algorithm_class(config.algorithm_config, config)
    prompts = config.rollout.prompts_per_call or max(1, config.batch.prompts_per_step // nproc)
    length = config.data.max_prompt_length + config.rollout.max_new_tokens
    adapter = 0
    if model_cfg.finetune == "lora":  # A [r, in] and B [out, r] per adapted linear of every layer: r (in + out)
        adapter = _lora_params(hf_config, model_cfg.lora.r, model_cfg.lora.target_modules)
    return plan_memory(
        shape, strategy=config.parallel.strategy, nproc=nproc, cpu_offload=config.parallel.cpu_offload,
        finetune=model_cfg.finetune, optimizer=config.optim.name, momentum=config.optim.momentum,
        reference=algorithm.needs_reference, compute_bytes=4 if config.run.device == "cpu" else 2,
        weight_bytes=None if model_cfg.dtype == "auto" else getattr(torch, model_cfg.dtype).itemsize,
        adapter_params=adapter, rollout_tokens=prompts * config.rollout.num_samples * length,
        micro_batch_tokens=config.batch.micro_batch_size * length,
        gradient_checkpointing=model_cfg.gradient_checkpointing,
        device_bytes=device_gb * GB if device_gb else None)


def _lora_params(hf_config: Any, r: int, targets) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in set(targets):
            total += r * (module.in_features + module.out_features)
    return total
