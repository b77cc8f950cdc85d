"""The rollout engine protocol, its config, and the one place that picks an engine.

An engine turns prompts into completions and keeps its own copy of the policy
weights up to date:

    generate(prompt_ids, params, seed) -> Samples   (token ids; per-token log-probs where the engine has them)
    sync_weights(model)                              push the trainer's current weights into the engine
    sleep() / wake(tags)                             optional: free and restore the engine's memory between rollouts

``rollout(engine, model, ...)`` runs one rollout in the order that is safe on
every platform: wake the weights, sync them, wake the KV cache, generate,
sleep. Weights are never written into a sleeping engine (its weight memory is
unmapped; on Ascend such a write went to unmapped memory, and an engine that
skipped the write while asleep kept stale weights).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

ENGINES = ("native", "vllm", "vllm_server")


class EngineError(RuntimeError):
    """An engine cannot start or answer here; the message says what to install or change."""


@dataclass
class VllmConfig:
    gpu_memory_utilization: float = 0.3  # vllm: share of the accelerator's memory vLLM may take for weights and KV cache, beside the trainer (colocation); ignored on CPU (a vllm_server takes it as a rollout-server option)
    enable_sleep_mode: bool = False  # vllm: free vLLM's weights and KV cache between rollouts (CUDA, NPU; refused on CPU)
    kv_cache_gib: Optional[float] = None  # vllm: KV cache size in GiB (CPU: the whole cache; accelerators: instead of the share gpu_memory_utilization leaves); null = vLLM's default
    url: Optional[str] = None  # rollout.engine vllm_server: the server's base URL, e.g. http://127.0.0.1:8011
    timeout: float = 600.0  # vllm_server: seconds one request may take before it counts as failed
    retries: int = 2  # vllm_server: further tries of a failed request (connection refused, time-out) before the run stops
    weights_dir: Optional[str] = None  # vllm_server: directory, seen by the trainer and the server alike, where each step's weights are written for the server to load (null = a temporary directory: a server on this machine)

    def __post_init__(self) -> None:
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"rollout.vllm.gpu_memory_utilization={self.gpu_memory_utilization}: must be in (0, 1]")
        if self.kv_cache_gib is not None and not self.kv_cache_gib > 0:
            raise ValueError(f"rollout.vllm.kv_cache_gib={self.kv_cache_gib}: must be > 0, or null for vLLM's default")
        if not self.timeout > 0:
            raise ValueError(f"rollout.vllm.timeout={self.timeout}: seconds, must be > 0")
        if self.retries < 0:
            raise ValueError(f"rollout.vllm.retries={self.retries}: must be >= 0")


@runtime_checkable
class Engine(Protocol):
    """What the trainer needs from a rollout engine (see the module docstring)."""

    returns_logprobs: bool  # whether generate() fills Samples.logprobs

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: Any, seed: int) -> Any:
        """``npu_rft.rollout.Samples`` for ``params.num_samples`` completions per prompt, prompt-major;
        ``seed`` makes the draw reproducible (the step seed)."""

    def sync_weights(self, model: Any) -> None:
        """Make the engine generate with ``model``'s current weights (LoRA merged)."""


def rollout(engine: Engine, model: Any, prompt_ids: Sequence[Sequence[int]], params: Any, seed: int) -> Any:
    """One rollout with the current weights: wake the weights, sync, wake the KV cache, generate, sleep.
    Engines without ``sleep``/``wake`` just sync and generate."""
    sleeps = hasattr(engine, "sleep") and hasattr(engine, "wake")
    if sleeps:
        engine.wake(["weights"])
    engine.sync_weights(model)
    if sleeps:
        engine.wake(["kv_cache"])
    try:
        return engine.generate(prompt_ids, params, seed)
    finally:
        if sleeps:
            engine.sleep()


def check_engine_available(engine: str, vllm: VllmConfig, hardware: Any) -> None:
    """Raise :class:`EngineError` in one line when ``rollout.engine`` cannot run here."""
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise EngineError("rollout.engine: vllm needs the vllm package in this environment: install vLLM built for "
                          "your torch (CPU test vehicle: `make test-vllm` builds .venv-vllm), or set rollout.engine: "
                          "native (docs/rollout.md)")
    if engine == "vllm" and vllm.enable_sleep_mode and not hardware.engine_sleep:
        raise EngineError(f"rollout.vllm.enable_sleep_mode: vLLM's sleep mode needs a CUDA or NPU device, this one is "
                          f"{hardware.type}; set rollout.vllm.enable_sleep_mode: false")


def make_engine(config: Any, model: Any, tokenizer: Any, device: Any) -> Engine:
    """The engine ``config`` (a ``RolloutConfig``) selects, for ``model`` on ``device``."""
    check_engine_available(config.engine, config.vllm, device.hardware)
    if config.engine == "native":
        from npu_rft import rollout as native_rollout
        from npu_rft.engines.native import NativeEngine

        sampler = native_rollout.make_sampler(model, tokenizer, device, config.sampler, config.prompts_per_call)
        return NativeEngine(sampler, device)
    if config.engine == "vllm":
        from npu_rft.engines.vllm import VllmEngine

        return VllmEngine.for_policy(model, tokenizer, config.vllm)
    from npu_rft.engines.server import VllmServerEngine
    from npu_rft.rollout import eos_token_ids

    return VllmServerEngine(config.vllm.url, config.vllm, eos_token_ids(model, tokenizer))
