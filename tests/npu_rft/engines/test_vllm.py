"""``VllmEngine`` without vLLM: seeds, and the sleep/sync guard, on a stand-in for ``vllm.LLM``.
tests/vllm/ runs the engine against the real package (``make test-vllm``)."""
from __future__ import annotations

import pytest

from npu_rft.engines.base import VllmConfig
from npu_rft.engines.vllm import VllmEngine, request_seeds


def test_request_seeds_keep_every_sample_of_a_step_distinct():
    seeds = request_seeds(10, num_prompts=3, num_samples=4)
    assert seeds == [10, 14, 18]
    samples = [s + k for s in seeds for k in range(4)]  # vLLM seeds sample k with seed + k
    assert len(set(samples)) == 12
    assert request_seeds(2**40, 1, 1)[0] < 2**31


class FakeLLM:
    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags):
        self.calls.append(("wake_up", tuple(tags)))

    def collective_rpc(self, method, kwargs=None):
        self.calls.append(("rpc", method if isinstance(method, str) else method.__name__))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


def _engine(sleep_mode: bool) -> VllmEngine:
    engine = object.__new__(VllmEngine)  # no vLLM here: the stand-in takes LLM's place
    engine.config, engine.llm, engine.sleeping = VllmConfig(enable_sleep_mode=sleep_mode), FakeLLM(), set()
    return engine


def test_sync_pushes_weights_refreshes_the_tied_head_and_drops_the_prefix_cache():
    engine = _engine(sleep_mode=False)
    engine.sync_weights(model=None)
    assert engine.llm.calls == [("rpc", "reload_weights"), ("rpc", "_refresh_tied_lm_head"), ("reset_prefix_cache",)]


def test_a_sleeping_engine_refuses_weights_until_they_are_woken():
    engine = _engine(sleep_mode=True)
    engine.sleep()
    with pytest.raises(RuntimeError, match=r"load_weights while the engine sleeps: wake\(\['weights'\]\) first"):
        engine.sync_weights(model=None)
    engine.wake(["weights"])
    engine.sync_weights(model=None)
    engine.wake(["kv_cache"])
    engine.wake(["kv_cache"])  # already awake: no call
    assert engine.llm.calls == [("sleep", 1), ("wake_up", ("weights",)), ("rpc", "reload_weights"),
                                ("rpc", "_refresh_tied_lm_head"), ("reset_prefix_cache",), ("wake_up", ("kv_cache",))]


def test_without_sleep_mode_sleep_and_wake_do_nothing():
    engine = _engine(sleep_mode=False)
    engine.sleep()
    engine.wake(["weights", "kv_cache"])
    assert engine.llm.calls == []
