"""The engine protocol's contract, with a fake engine (no vLLM): the order of
wake, sync, generate and sleep, the engine choice, and the start-up errors."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from npu_rft.config import RolloutConfig
from npu_rft.engines import EngineError, VllmConfig, make_engine, rollout
from npu_rft.engines.base import check_engine_available
from npu_rft.engines.native import NativeEngine
from npu_rft.hardware import hardware_for


class FakeEngine:
    """Records every call; generate fails when the engine is not fully awake."""

    returns_logprobs = True

    def __init__(self):
        self.calls = []
        self.sleeping = set()

    def sync_weights(self, model):
        assert "weights" not in self.sleeping, "weights synced into a sleeping engine"
        self.calls.append(("sync", model))

    def generate(self, prompt_ids, params, seed):
        assert not self.sleeping, f"generate while {sorted(self.sleeping)} sleep"
        self.calls.append(("generate", seed))
        return "samples"

    def sleep(self):
        self.sleeping = {"weights", "kv_cache"}
        self.calls.append(("sleep",))

    def wake(self, tags):
        self.sleeping -= set(tags)
        self.calls.append(("wake", tuple(tags)))


def test_rollout_wakes_weights_syncs_then_wakes_the_kv_cache_and_sleeps_after():
    engine = FakeEngine()
    engine.sleep()
    assert rollout(engine, "model", [[1]], None, seed=7) == "samples"
    assert engine.calls[1:] == [("wake", ("weights",)), ("sync", "model"), ("wake", ("kv_cache",)),
                                ("generate", 7), ("sleep",)]


def test_rollout_sleeps_even_when_generate_fails():
    engine = FakeEngine()

    def broken(*args):
        raise RuntimeError("engine died")

    engine.generate = broken
    with pytest.raises(RuntimeError, match="engine died"):
        rollout(engine, "model", [[1]], None, seed=0)
    assert engine.calls[-1] == ("sleep",)


class NoSleepEngine:
    """An engine without sleep/wake (both are optional)."""

    def __init__(self):
        self.calls = []

    sync_weights, generate = FakeEngine.sync_weights, FakeEngine.generate
    sleeping = frozenset()


def test_rollout_without_sleep_mode_syncs_and_generates():
    engine = NoSleepEngine()
    rollout(engine, "model", [[1]], None, seed=3)
    assert engine.calls == [("sync", "model"), ("generate", 3)]


def test_native_engine_is_the_configured_sampler_seeded_with_the_step_seed(monkeypatch):
    import torch

    from npu_rft import rollout as native

    seen = {}

    class Sampler:
        def sample(self, prompt_ids, params, generator=None):
            seen["draw"] = torch.rand(1, generator=generator).item()
            return "samples"

    monkeypatch.setattr(native, "make_sampler", lambda model, tok, device, kind, per_call: seen.update(
        kind=kind, per_call=per_call) or Sampler())
    device = SimpleNamespace(hardware=hardware_for("cpu"), torch_device=torch.device("cpu"))
    engine = make_engine(RolloutConfig(sampler="generate", prompts_per_call=2), "model", "tok", device)
    assert isinstance(engine, NativeEngine) and not engine.returns_logprobs
    assert rollout(engine, "model", [[1]], None, seed=11) == "samples"
    assert seen["kind"] == "generate" and seen["per_call"] == 2
    assert seen["draw"] == torch.rand(1, generator=torch.Generator().manual_seed(11)).item()


def test_vllm_without_the_package_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(EngineError, match="rollout.engine: vllm needs the vllm package.*make test-vllm"):
        check_engine_available("vllm", VllmConfig(), hardware_for("cpu"))


def test_sleep_mode_on_cpu_is_refused_in_one_line(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    with pytest.raises(EngineError, match="enable_sleep_mode: vLLM's sleep mode needs a CUDA or NPU device, "
                                          "this one is cpu; set rollout.vllm.enable_sleep_mode: false"):
        check_engine_available("vllm", VllmConfig(enable_sleep_mode=True), hardware_for("cpu"))
    check_engine_available("vllm", VllmConfig(enable_sleep_mode=True), hardware_for("cuda"))  # allowed there


@pytest.mark.parametrize("settings, message", [
    ({"engine": "native", "importance_correction": "mis"}, "needs the engine's log-probs"),
    ({"engine": "vllm_server"}, "vllm_server needs rollout.vllm.url"),
    ({"engine": "vllm", "importance_cap": 1.0}, "importance_cap=1.0: must be > 1"),
])
def test_rollout_config_refuses_what_cannot_run(settings, message):
    with pytest.raises(ValueError, match=message):
        RolloutConfig(**settings)


@pytest.mark.parametrize("settings, message", [
    ({"gpu_memory_utilization": 0.0}, "gpu_memory_utilization=0.0: must be in"),
    ({"kv_cache_gib": 0}, "kv_cache_gib=0: must be > 0"),
    ({"timeout": 0}, "timeout=0: seconds"),
    ({"retries": -1}, "retries=-1: must be >= 0"),
])
def test_vllm_config_validates(settings, message):
    with pytest.raises(ValueError, match=message):
        VllmConfig(**settings)
