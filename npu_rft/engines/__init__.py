"""Rollout engines: the native decode loop, vLLM in-process, vLLM as a server (docs/rollout.md)."""
from npu_rft.engines.base import ENGINES, Engine, EngineError, VllmConfig, make_engine, rollout

__all__ = ["ENGINES", "Engine", "EngineError", "VllmConfig", "make_engine", "rollout"]
