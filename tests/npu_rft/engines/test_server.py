"""``vllm_server`` over HTTP on localhost, with a stand-in engine behind the real
server code (no vLLM): the round trip, weights through a file, and the
failures: a dead server, a slow one, an error it reports."""
from __future__ import annotations

import threading
import time
from http.server import HTTPServer

import pytest
import torch

from npu_rft.engines import EngineError, VllmConfig, rollout
from npu_rft.engines.server import VllmServerEngine, make_handler
from npu_rft.rollout import Samples, SamplingParams


class StandInEngine:
    """Answers generate from the prompt ids; records what was loaded."""

    def __init__(self, delay: float = 0.0):
        self.loaded, self.delay, self.eos_token_ids = {}, delay, None

    def generate(self, prompt_ids, params, seed):
        time.sleep(self.delay)
        if seed < 0:
            raise RuntimeError("out of KV cache")
        ids = [[seed + sum(p) + k] for p in prompt_ids for k in range(params.num_samples)]
        return Samples([i for i in range(len(prompt_ids)) for _ in range(params.num_samples)], ids,
                       [True] * len(ids), [[-0.5]] * len(ids))

    def load_weights(self, weights):
        self.loaded = {name: tensor.clone() for name, tensor in weights}


@pytest.fixture
def server():
    engine = StandInEngine()
    httpd = HTTPServer(("127.0.0.1", 0), make_handler(engine, "tiny"))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield engine, f"http://127.0.0.1:{httpd.server_port}", httpd
    httpd.shutdown()
    httpd.server_close()


def test_round_trip_generates_and_pushes_weights_through_a_file(server, tmp_path):
    engine, url, _ = server
    client = VllmServerEngine(url, VllmConfig(url=url, weights_dir=str(tmp_path)), eos_token_ids=[9])
    model = torch.nn.Linear(3, 2)
    samples = rollout(client, model, [[1, 2], [3]], SamplingParams(max_new_tokens=4, num_samples=2), seed=10)
    assert samples.prompt_index == [0, 0, 1, 1]
    assert samples.completion_ids == [[13], [14], [13], [14]]
    assert samples.logprobs == [[-0.5]] * 4 and samples.truncated == [True] * 4
    assert engine.eos_token_ids == [9]
    assert set(engine.loaded) == {"weight", "bias"} and torch.equal(engine.loaded["weight"], model.weight.detach())
    assert (tmp_path / "policy.safetensors").is_file()


def test_an_error_the_server_reports_is_not_retried(server, tmp_path):
    _, url, _ = server
    client = VllmServerEngine(url, VllmConfig(url=url, weights_dir=str(tmp_path), retries=3), eos_token_ids=[9])
    start = time.monotonic()
    with pytest.raises(EngineError, match=r"/generate answered 500: RuntimeError: out of KV cache"):
        client.generate([[1]], SamplingParams(max_new_tokens=2), seed=-1)
    assert time.monotonic() - start < 1.0  # no retries, no back-off


def test_a_dead_server_is_a_clear_error_naming_its_url(server, tmp_path):
    _, url, httpd = server
    client = VllmServerEngine(url, VllmConfig(url=url, weights_dir=str(tmp_path), retries=1), eos_token_ids=[9])
    httpd.shutdown()
    httpd.server_close()  # the server dies mid-run
    with pytest.raises(EngineError, match=rf"no answer from {url}/generate after 2 tries .*npu-rft rollout-server"):
        client.generate([[1]], SamplingParams(max_new_tokens=2), seed=1)
    with pytest.raises(EngineError, match=rf"no answer from {url}/health after 1 tries"):
        VllmServerEngine(url, VllmConfig(url=url, retries=0), eos_token_ids=[9])  # and at start-up


def test_a_server_slower_than_the_time_out_fails_within_tries_times_the_time_out(tmp_path):
    httpd = HTTPServer(("127.0.0.1", 0), make_handler(StandInEngine(delay=3.0), "tiny"))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_port}"
    try:
        client = VllmServerEngine(url, VllmConfig(url=url, weights_dir=str(tmp_path), timeout=0.5, retries=0),
                                  eos_token_ids=[9])
        start = time.monotonic()
        with pytest.raises(EngineError, match=r"/generate after 1 tries .*time-out 0.5 s each"):
            client.generate([[1]], SamplingParams(max_new_tokens=2), seed=1)
        assert time.monotonic() - start < 2.0
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_bad_requests_and_routes_are_answered_with_errors(server, tmp_path):
    import json
    import urllib.error
    import urllib.request

    _, url, _ = server
    request = urllib.request.Request(url + "/generate", data=json.dumps({"prompt_ids": [[1]]}).encode(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    assert info.value.code == 400 and "max_new_tokens" in json.loads(info.value.read())["error"]
    client = VllmServerEngine(url, VllmConfig(url=url, weights_dir=str(tmp_path)), eos_token_ids=[9])
    with pytest.raises(EngineError, match="does not exist here; rollout.vllm.weights_dir must be storage"):
        client._request("POST", "/load_weights", {"path": str(tmp_path / "missing.safetensors")})
