"""The training run's config: one typed dataclass per component.

A YAML file reads as a sentence of sections::

    run:        where the run directory goes, seed, device, logging cadence
    model:      which model, LoRA or full fine-tuning, dtype
    data:       train/eval JSONL and the prompt-length policy
    rollout:    how completions are sampled (K per prompt, temperature, ...)
    graders:    the reward: a list of {name, weight}
    algorithm:  grpo (the section of the same name holds its options)
    optim:      AdamW, gradient clipping, non-finite-loss tolerance
    schedule:   steps or epochs, LR schedule
    batch:      prompts per step, micro-batch size
    eval:       periodic evaluation
    checkpoint: cadence and retention
    kernels:    which kernel backend computes the losses
    parallel:   ddp or fsdp2 across ranks (``ParallelConfig`` in ``npu_rft/sharding.py``)

Each algorithm's options live in its own module (``GRPOConfig`` in
``npu_rft/algorithms/grpo.py``) and appear here as one field named after the
algorithm. Load with ``load_train_config(path, overrides)``; every problem in a
file is reported together (``npu_rft.config_base``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Dict, List, Literal, Optional, Sequence, Union

from npu_rft.algorithms import ALGORITHMS
from npu_rft.algorithms.dpo import DPOConfig
from npu_rft.algorithms.grpo import GRPOConfig
from npu_rft.algorithms.sft import SFTConfig
from npu_rft.config_base import load_config
from npu_rft.engines.base import VllmConfig
from npu_rft.sharding import ParallelConfig


@dataclass
class RunConfig:
    output_dir: str = "runs/default"  # the run directory (created; must be empty unless resuming)
    seed: int = 0  # seeds every RNG, the data order and each step's sampling
    device: str = "auto"  # auto | npu | cuda | cpu ($NPU_RFT_DEVICE fills it when the config leaves it unset)
    log_every: int = 1  # steps between metric records
    log_samples_every: int = 10  # steps between sample completions in samples.jsonl (0 = never)
    num_log_samples: int = 4  # completions written each time
    tensorboard: bool = True  # also write TensorBoard events to the run directory
    progress_bar: bool = True  # console bar with reward, loss, KL and seconds per step
    threads: Optional[int] = None  # torch CPU threads (null = torch's default); 1 is often fastest for tiny models on a busy CPU

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"run.threads={self.threads}: must be >= 1, or null for torch's default")
        if self.device not in ("auto", "npu", "cuda", "cpu"):
            raise ValueError(f"run.device={self.device!r}: must be auto, npu, cuda or cpu")
        if self.log_every < 1:
            raise ValueError(f"run.log_every={self.log_every}: must be >= 1")
        if self.log_samples_every < 0 or self.num_log_samples < 0:
            raise ValueError("run.log_samples_every and run.num_log_samples must be >= 0 (0 = off)")


@dataclass
class LoraConfig:
    r: int = 8  # LoRA rank
    alpha: float = 16.0  # LoRA scaling numerator: the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the LoRA input
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])  # module names to adapt

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"model.lora.r={self.r}: the LoRA rank must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout={self.dropout}: must be in [0, 1)")
        if not self.target_modules:
            raise ValueError("model.lora.target_modules is empty; name the modules to adapt, e.g. [q_proj, v_proj]")


@dataclass
class ModelConfig:
    name_or_path: str = ""  # a local HF model directory, or a hub name when online
    finetune: Literal["lora", "full"] = "lora"  # LoRA adapters through peft, or every weight
    lora: LoraConfig = field(default_factory=LoraConfig)
    init_adapter: Optional[str] = None  # a PEFT adapter merged into the base weights before training
    trust_remote_code: bool = False  # run the model repository's own Python code (only for sources you trust)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    recompute_mlp: bool = True  # each decoder MLP keeps only its input for backward and is recomputed there (bit-identical; one more MLP forward per layer): its [tokens, intermediate] activations are not held; off under gradient_checkpointing, which recomputes whole layers
    lean_swiglu: bool = False  # SiLU-gated MLPs (Qwen2, Llama) keep 2 of their 3 activations for backward and recompute the sigmoid: a third less MLP activation memory
    npu_fused_ops: Union[bool, List[Literal["rms_norm", "rotary", "swiglu"]]] = False  # Ascend: run RMSNorm, rotary embedding and SwiGLU through torch_npu's fused ops (true: all three; or a list of them); applied to this run's model only, on the Atlas A2 (Ascend910B1-B4) in bf16, else a log line says why not
    # Weights' dtype. auto: LoRA keeps the frozen base in the device's compute dtype
    # (bf16/fp16; fp32 on CPU) and trainable weights in fp32; full fine-tuning keeps fp32.
    # bfloat16 halves full fine-tuning's weights, gradients and AdamW moments (bf16 updates);
    # float16 with full fine-tuning is refused where compute is fp16 (its loss scaler needs fp32 gradients).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    def __post_init__(self) -> None:
        if not self.name_or_path:
            raise ValueError("model.name_or_path is required: a local HF model directory or a hub name")
        if "swiglu" in self.fused_op_names and self.lean_swiglu:
            raise ValueError("model.npu_fused_ops includes swiglu and model.lean_swiglu is on: both replace the MLP's "
                             "activation; drop one (lean_swiglu: false, or list npu_fused_ops without swiglu)")

    @property
    def fused_op_names(self) -> List[str]:
        """``npu_fused_ops`` as a list of op names (true: all three)."""
        if self.npu_fused_ops is True:
            return ["rms_norm", "rotary", "swiglu"]
        return list(self.npu_fused_ops or [])


@dataclass
class DataConfig:
    train: str = ""  # training JSONL ({system, context, target, meta} rows)
    eval: Optional[str] = None  # eval JSONL for periodic evaluation
    max_prompt_length: int = 1024  # tokens, after the chat template
    long_prompts: Literal["drop", "truncate_left"] = "drop"  # prompts over max_prompt_length: dropped (counted in the log) or cut from the left
    shuffle: bool = True  # reshuffle each epoch with the run seed

    def __post_init__(self) -> None:
        if not self.train:
            raise ValueError("data.train is required: the training JSONL")
        if self.max_prompt_length < 1:
            raise ValueError(f"data.max_prompt_length={self.max_prompt_length}: must be >= 1")


@dataclass
class RolloutConfig:
    engine: Literal["native", "vllm", "vllm_server"] = "native"  # native: our samplers (rollout.sampler); vllm: vLLM in this process, colocated; vllm_server: vLLM in another environment over HTTP (docs/rollout.md)
    sampler: Literal["auto", "loop", "generate"] = "auto"  # native engine: loop (our KV-cache loop), generate (HF generate), or auto
    num_samples: int = 8  # K completions per prompt
    max_new_tokens: int = 256  # completion length limit; longer completions are flagged as truncated
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass (1 = the full distribution)
    prompts_per_call: Optional[int] = None  # prompts decoded together (None = the whole step)
    importance_correction: Literal["none", "tis", "mis"] = "none"  # train-inference mismatch correction from the engine's log-probs: tis weights tokens by the capped ratio, mis masks tokens whose ratio leaves [1/cap, cap] (docs/algorithms.md)
    importance_cap: float = 2.0  # the cap of tis and mis (> 1)
    vllm: VllmConfig = field(default_factory=VllmConfig)

    def __post_init__(self) -> None:
        if self.engine == "vllm_server" and not self.vllm.url:
            raise ValueError("rollout.engine=vllm_server needs rollout.vllm.url, the base URL of a running "
                             "`npu-rft rollout-server` (e.g. http://127.0.0.1:8011)")
        if self.importance_correction != "none" and self.engine == "native":
            raise ValueError(f"rollout.importance_correction={self.importance_correction} needs the engine's log-probs, "
                             "which the native engine does not return; set rollout.engine: vllm, or "
                             "rollout.importance_correction: none")
        if not self.importance_cap > 1.0:
            raise ValueError(f"rollout.importance_cap={self.importance_cap}: must be > 1 (typical 2-10)")
        if self.num_samples < 1:
            raise ValueError(f"rollout.num_samples={self.num_samples}: must be >= 1")
        if self.max_new_tokens < 1:
            raise ValueError(f"rollout.max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"rollout.temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"rollout.top_p={self.top_p}: must be in (0, 1]")
        if self.prompts_per_call is not None and self.prompts_per_call < 1:
            raise ValueError(f"rollout.prompts_per_call={self.prompts_per_call}: must be >= 1, or null for all")


@dataclass
class GraderConfig:
    name: str  # a registered grader, or "package.module:function"
    weight: float = 1.0  # the reward is the weighted mean of the graders' scores; 0 = logged only

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"graders: weight {self.weight} for {self.name!r} must be >= 0")


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"  # the optimizer: AdamW, or plain SGD (with optional momentum)
    lr: float = 1e-5  # peak learning rate
    weight_decay: float = 0.0  # decoupled weight decay (AdamW), L2 penalty (SGD)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW moment decay rates (adamw only)
    eps: float = 1e-8  # AdamW denominator epsilon (adamw only)
    momentum: float = 0.0  # SGD momentum (sgd only)
    max_grad_norm: Optional[float] = 1.0  # null = no clipping
    max_nonfinite_in_row: int = 3  # stop after this many consecutive skipped steps

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr}: must be > 0")
        if self.name == "sgd" and (list(self.betas) != [0.9, 0.999] or self.eps != 1e-8):
            raise ValueError("optim.betas and optim.eps are AdamW's; with optim.name: sgd remove them (sgd takes momentum)")
        if self.name == "adamw" and self.momentum != 0.0:
            raise ValueError("optim.momentum is SGD's; set optim.name: sgd, or remove it (AdamW takes betas)")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"optim.momentum={self.momentum}: must be in [0, 1)")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas={self.betas}: two numbers in [0, 1), e.g. [0.9, 0.999]")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"optim.max_grad_norm={self.max_grad_norm}: must be > 0, or null for no clipping")
        if self.max_nonfinite_in_row < 1:
            raise ValueError(f"optim.max_nonfinite_in_row={self.max_nonfinite_in_row}: must be >= 1")


@dataclass
class ScheduleConfig:
    steps: Optional[int] = None  # training steps; set exactly one of steps and epochs
    epochs: Optional[float] = None  # passes over data.train
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after warm-up: flat, or cosine decay to min_lr_ratio
    warmup_steps: int = 0  # linear warm-up from 0 (both schedules)
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("schedule: set exactly one of steps and epochs")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"schedule.steps={self.steps}: must be >= 1")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"schedule.epochs={self.epochs}: must be > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps={self.warmup_steps}: must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"schedule.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")


@dataclass
class BatchConfig:
    prompts_per_step: int = 8  # training rows per step, over all ranks
    micro_batch_size: int = 8  # sequences per forward/backward on one rank

    def __post_init__(self) -> None:
        if self.prompts_per_step < 1 or self.micro_batch_size < 1:
            raise ValueError("batch.prompts_per_step and batch.micro_batch_size must be >= 1")


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0 = no periodic evaluation (needs data.eval otherwise)
    grader: str = "inverse_rank"  # grader whose parsed list gives Top@1 and the mean score
    max_new_tokens: Optional[int] = None  # null = rollout.max_new_tokens
    batch_size: int = 16  # prompts decoded together (greedy)
    max_examples: Optional[int] = None  # evaluate on the first N eval rows (null = all)

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"eval.every_steps={self.every_steps}: must be >= 0 (0 = off)")
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size={self.batch_size}: must be >= 1")


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0 = only at the end (and on SIGTERM)
    keep_last: int = 2  # newest checkpoints kept (older ones are deleted)
    keep_best: bool = True  # also keep the best checkpoint by eval Top@1

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"checkpoint.every_steps={self.every_steps}: must be >= 0 (0 = at the end only)")
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last={self.keep_last}: must be >= 1")


@dataclass
class KernelsConfig:
    backend: str = "auto"  # naive | torch | triton | npu, or auto: by device type (cpu: torch; cuda: triton if installed, else torch; npu: npu)
    tile_bytes: Optional[int] = None  # the tiled log-prob's logits-tile budget in bytes; null: 16 MiB on CPU, 256 MiB on accelerators; 0: the triton backend's streaming mode ($NPU_RFT_KERNELS_TILE_BYTES fills it when unset)

    def __post_init__(self) -> None:
        from npu_rft_kernels.dispatch import LOGPROB_BACKENDS

        if self.backend != "auto" and self.backend not in LOGPROB_BACKENDS:
            raise ValueError(f"kernels.backend={self.backend!r}: choose auto or one of {', '.join(sorted(LOGPROB_BACKENDS))}")
        if self.tile_bytes is not None and self.tile_bytes < 0:
            raise ValueError(f"kernels.tile_bytes={self.tile_bytes}: a byte count >= 0 (0: streaming mode), or null")


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    graders: List[GraderConfig] = field(default_factory=list)
    algorithm: str = "grpo"  # grpo | dpo (iterative) | sft; its options are the section of the same name
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(steps=100))
    batch: BatchConfig = field(default_factory=BatchConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # Where each value came from (filled by load_train_config; recorded in the run's environment.json).
    sources: Dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    # Environment variables that fill a key the config file and --set leave unset.
    ENV_KEYS: ClassVar[Dict[str, str]] = {"run.device": "NPU_RFT_DEVICE", "kernels.tile_bytes": "NPU_RFT_KERNELS_TILE_BYTES"}

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm={self.algorithm!r} is unknown; known algorithms: {', '.join(ALGORITHMS.names())}")
        for name in ALGORITHMS.names():
            section = getattr(self, name)
            if name != self.algorithm and section != ALGORITHMS.get(name).config_class():
                raise ValueError(
                    f"the {name!r} section is set but algorithm={self.algorithm!r}; "
                    f"remove the section or set algorithm: {name}"
                )
        if self.algorithm_class.uses_graders and not self.graders:
            raise ValueError(f"graders is empty but {self.algorithm} needs a reward; add e.g. graders: [{{name: inverse_rank}}]")
        if self.eval.every_steps and not self.data.eval:
            raise ValueError("eval.every_steps is set but data.eval is not; set data.eval or eval.every_steps: 0")

    @property
    def algorithm_class(self) -> type:
        return ALGORITHMS.get(self.algorithm)

    @property
    def algorithm_config(self):
        """The selected algorithm's section."""
        return getattr(self, self.algorithm)


def load_train_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """YAML file + ``--set key=value`` overrides -> a validated ``TrainConfig``."""
    return load_config(TrainConfig, path, overrides)

